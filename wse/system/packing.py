"""Wafer shares filled by slot count: a MoE model cut between whole expert regions.

The split by bytes (wafers.balanced) cuts a model with expert regions at any routed expert, so a
layer's experts may end a wafer in a part-filled expert region and begin the next in another,
and each wafer's share is as near the mean of the bytes as the units allow. On large slots,
where a wafer holds a couple of layers in 20-odd slots, those part-filled regions and the
uneven region counts of byte-equal shares decide whether a slot size places: Kimi K2 with its
weight tiles by output needs 33 CS-3 (108x130 slots) split by bytes, 32 (152x234) filled.

Here the whole model's chain is laid out on one slot shape first (model_units cut into expert
regions of the most experts a region of that shape holds, decode.units_chain), and each wafer
takes a run of its elements, cut only before a layer region or an expert region (a layer's
FFN region stays with it): the last wafer first, its share of the whole or the most it places
beside the LM head (whose rows take a band), then each other wafer its share of what is left,
ceil(left / wafers left) elements, or the most it places (the embedding's rows take a band).
Every wafer is planned on that shape (decode.plan_units), so the result is checked as every split
is. Slot shapes are tried largest first.
"""
from __future__ import annotations

from typing import Callable

from ..workload.decode import ModelPlan, ffn_layers, model_units, plan_units, splits_ffn, unit_bytes, units_chain
from ..workload.experts import most_experts
from ..workload.layer_sizes import most_rows
from ..workload.models import ModelSpec
from ..workload.params import DecodeParams
from ..workload.plan import FitError, usable_sram

Shares = list[tuple[int, int]]


def _split(spec: ModelSpec, params: DecodeParams) -> frozenset[int]:
    """The layers whose FFN takes a region of its own after the layer's, with expert regions."""
    return ffn_layers(spec, range(spec.layers), splits_ffn(spec, params, True))


def cut_points(spec: ModelSpec, params: DecodeParams, per_region: int) -> tuple[int, dict[int, int]]:
    """The whole model's chain on regions of `per_region` routed experts: (its element count,
    element index -> model_units index for each element a wafer may begin with)."""
    units = model_units(spec)
    first = {u: i for i, u in enumerate(units)}
    cuts: dict[int, int] = {}
    chain = units_chain(units, per_region, _split(spec, params))
    for k, (kind, layer, experts) in enumerate(chain):
        if kind == "layer":
            cuts[k] = first[layer, -1]
        elif kind == "experts":
            cuts[k] = first[layer, experts[0]]
    cuts[len(chain)] = len(units)
    return len(chain), cuts


def regions(spec: ModelSpec, params: DecodeParams) -> Callable[[int], int]:
    """Elements of the whole model's chain (what cut_points counts) as a function of the routed
    experts a region holds, by arithmetic."""
    moe = sum(spec.is_moe_layer(layer) for layer in range(spec.layers))
    fixed = spec.layers + len(_split(spec, params))
    return lambda per_region: fixed + moe * -(-spec.moe.experts // per_region)


def slot_shapes(spec: ModelSpec, cfg, more_than: int = 0) -> list[tuple[int, int]]:
    """Tall slot shapes P x Q (Q >= P, Q the most rows that give a whole number of bands),
    largest area first, of more than `more_than` PEs."""
    W, H = cfg.mesh_width, cfg.mesh_height
    q_cap = min(H, most_rows(spec))
    out = {(P, min(q_cap, H // bands)) for P in range(1, min(W, spec.hidden_size) + 1)
           for bands in range(1, H // P + 1)}
    return sorted(((P, Q) for P, Q in out if Q >= P and P * Q > more_than), key=lambda s: (-s[0] * s[1], -s[1]))


def filled_shares(spec: ModelSpec, cfg, params: DecodeParams, wafers: int, P: int, Q: int,
                  count: Callable[[int], int] | None = None) -> tuple[Shares, list[ModelPlan]]:
    """Shares of model_units, each wafer's run of the chain on P x Q slots cut between whole
    regions (module docstring), and their plans on P x Q; FitError if the model does not fit
    `wafers` wafers that way. `count`: regions(spec, params), if already made."""
    count = count or regions(spec, params)
    cols, bands = cfg.mesh_width // P, cfg.mesh_height // Q
    most = wafers * cols * bands
    moe = next(layer for layer in range(spec.layers) if spec.is_moe_layer(layer))
    expert = unit_bytes(spec, params, (moe, 0))
    if count(max(1, P * Q * usable_sram(cfg) // expert)) > most:  # (SRAM alone bounds a region)
        raise FitError(f"{spec.name} on {P}x{Q} slots: {wafers} wafers hold at most {most} regions, fewer than "
                       f"it needs even with as many experts a region as its SRAM holds")
    per = most_experts(spec, moe, P, cfg, params, Q)
    per = min(per, params.experts_per_region or per)
    if not per:
        raise FitError(f"not one routed expert of {spec.name} fits a {P}x{Q} region")
    if count(per) > most:
        raise FitError(f"{spec.name} on {P}x{Q} slots: {wafers} wafers hold at most {most} regions, fewer than "
                       f"its {count(per)}")
    n, cuts = cut_points(spec, params, per)
    starts = sorted(cuts)

    def place(a: int, e: int, w: int) -> ModelPlan | None:
        try:
            return plan_units(spec, cfg, params, cuts[a], cuts[e], w == 0, w == wafers - 1, P, Q)
        except FitError:
            return None

    # the last wafer (its LM head takes rows) first: its share of the whole, or the most it places
    tail = [e for e in starts if wafers - 1 <= e < n and e >= n - -(-n // wafers)][:cols + 2] if wafers > 1 else [0]
    for z in tail:
        end_plan = place(z, n, wafers - 1)
        if end_plan is not None:
            break
    else:
        raise FitError(f"{spec.name} on {P}x{Q} slots: the last of {wafers} wafers places none of its regions")
    shares: Shares = []
    plans: list[ModelPlan] = []
    a = 0
    for w in range(wafers - 1):  # the others share what is left, each its part or the most it places
        target = a + -(-(z - a) // (wafers - 1 - w))
        ends = [z] if w == wafers - 2 else \
            [e for e in starts if a < e <= target and z - e >= wafers - 2 - w][::-1][:cols + 2]
        for e in ends:
            plan = place(a, e, w)
            if plan is not None:
                shares.append((cuts[a], cuts[e]))
                plans.append(plan)
                a = e
                break
        else:
            raise FitError(f"{spec.name} on {P}x{Q} slots: wafer {w} of {wafers} places no run of the chain's "
                           f"regions from {a} of {n} (at most {target - a})")
    return shares + [(cuts[z], cuts[n])], plans + [end_plan]


def filled_plans(spec: ModelSpec, cfg, params: DecodeParams, wafers: int, more_than: int = 0
                 ) -> tuple[Shares, list[ModelPlan]] | None:
    """The largest slot shape of more than `more_than` PEs whose filled shares (filled_shares)
    place the model on `wafers` wafers, with those shares and plans; None if none does."""
    count = regions(spec, params)
    for P, Q in slot_shapes(spec, cfg, more_than):
        try:
            return filled_shares(spec, cfg, params, wafers, P, Q, count)
        except FitError:
            continue
    return None
