"""A whole model's decode step on one wafer: sizing, traces, exact stage composition.

`plan_model` picks the slot size P (the largest that places the chain and fits every region's
SRAM), `full_trace` builds one trace with every region and lane, and `stage_traces` builds the
small traces that compose to the same cycle count:

Every region ends with a hand-off barrier whose anchor PE fires once; all that follows in the
region, and everything the next region does, is a pure time shift of that anchor (the next
region sits idle until its lanes arrive). So with a_k the cycle at which region k's anchor
fires (measured by the anchor PE's finish_cycle when the barrier is its last op):

    a_0          = finish(anchor_0)  in  A_0 = region 0 alone
    a_{k+1}      = a_k + finish(anchor_{k+1}) in S_k  -  finish(anchor_k) in B_k
    total cycles = a_{n-2} + total(S_{n-2}) - finish(anchor_{n-2}) in B_{n-2}

where B_k is region k running only its barrier, and S_k is region k running its barrier and
its lane sends into region k+1 running its whole program (without its own lane sends). S_k and
B_k depend only on the kinds of regions k, k+1 and the direction between them, so a model with
identical layers needs a handful of distinct small simulations. `--full` simulates the one big
trace instead; the two agree exactly (tests/test_decode.py).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..errors import WseError
from ..hardware import WaferConfig
from ..trace import Trace
from .experts import decode_experts, dispatch_parts, most_experts, plan_experts
from .ffn import moe_experts
from .layer import LayerPlan, decode_layer, most_rows, plan_layer
from .params import DecodeParams
from .region import Lanes, RegionBuild
from .tables import embedding, embedding_memory, lm_head, lm_memory, token_column
from .mesh import ALIGN_BYTES, X, Y, MeshBuilder, Region, split, split_ranges
from .models import ModelSpec
from .placement import (PlacementError, Slot, add_lane_routes, direction, lane_sources, lane_targets,
                        serpentine, transfer_color)
from .plan import DIAG_BCAST, ROW_BCAST, FitError, check_colors, usable_sram

ELEM = 2
SEND_FROM = 128  # SRAM address the lane sends of a stage trace read (the barrier uses 0 and 64)


@dataclasses.dataclass
class ModelPlan:
    spec: ModelSpec
    cfg: WaferConfig
    params: DecodeParams
    P: int
    n_layers: int
    slots: list[Slot]
    token_col: int
    first_layer: int = 0  # a wafer's group of layers starts here (multi-wafer systems)
    embed: bool = True  # the plan holds the embedding
    head: bool = True  # the plan holds the LM head
    experts_per_region: int = 0  # expert regions: the most routed experts one holds
    expert_regions: bool = False  # MoE layers keep router and shared experts only; routed experts in expert regions
    units: tuple[int, int] | None = None  # a wafer's share as a range of model_units (expert regions)
    Q: int = 0  # rows of a layer or expert slot (0: P, square slots)

    def __post_init__(self) -> None:
        self.Q = self.Q or self.P

    @property
    def width(self) -> int:
        return max(s.region.x0 + s.region.width for s in self.slots)

    @property
    def height(self) -> int:
        return max(s.region.y0 + s.region.height for s in self.slots)


def layer_plan(plan: ModelPlan, layer: int) -> LayerPlan:
    """The layer's plan on the model plan's slot size and MoE mapping."""
    return plan_layer(plan.spec, layer, plan.P, plan.cfg, plan.params, routed=not plan.expert_regions, Q=plan.Q)


def chain_elements(spec: ModelSpec, first_layer: int, n_layers: int, experts_per_region: int
                   ) -> list[tuple[str, int, tuple[int, int] | None]]:
    """The one-slot elements of the chain, (kind, layer, experts): each layer, and with expert
    parallelism (experts_per_region > 0) each MoE layer followed by its expert regions, the
    routed experts split into the fewest groups of at most experts_per_region (sizes differing
    by at most one)."""
    return units_chain(model_units(spec, first_layer, n_layers, bool(experts_per_region)), experts_per_region)


def model_units(spec: ModelSpec, first_layer: int = 0, n_layers: int | None = None, experts: bool = True
                ) -> list[tuple[int, int]]:
    """The model's chain (or layers first_layer.. of it) in the units a multi-wafer split with
    expert regions cuts it at: (layer, -1) for a layer region, (layer, e) for routed expert e
    of a MoE layer (none with experts=False)."""
    out: list[tuple[int, int]] = []
    for layer in range(first_layer, spec.layers if n_layers is None else first_layer + n_layers):
        out.append((layer, -1))
        if experts and spec.is_moe_layer(layer):
            out.extend((layer, e) for e in range(spec.moe.experts))
    return out


def unit_bytes(spec: ModelSpec, params: DecodeParams, unit: tuple[int, int]) -> int:
    """16-bit weights (and, for a layer region, the KV cache) of one unit."""
    layer, e = unit
    if e >= 0:
        return ELEM * spec.expert_params()
    routed = spec.moe.experts * spec.expert_params() if spec.is_moe_layer(layer) else 0
    return ELEM * (spec.layer_params(layer) - routed) + spec.kv_cache_width * params.context * params.batch * ELEM


def units_chain(units: list[tuple[int, int]], experts_per_region: int
                ) -> list[tuple[str, int, tuple[int, int] | None]]:
    """Chain elements of a run of units: each layer region, and each layer's run of routed
    experts cut into the fewest groups of at most experts_per_region (sizes within one)."""
    out: list[tuple[str, int, tuple[int, int] | None]] = []
    run: list[tuple[int, int]] = []

    def flush() -> None:
        if run:
            layer, e0, n = run[0][0], run[0][1], len(run)
            out.extend(("experts", layer, (e0 + r.start, e0 + r.stop))
                       for r in split_ranges(n, -(-n // experts_per_region)))
            run.clear()

    for layer, e in units:
        if e < 0 or (run and run[0][0] != layer):
            flush()
        if e < 0:
            out.append(("layer", layer, None))
        else:
            run.append((layer, e))
    flush()
    return out


def _table_slots(spec: ModelSpec, P: int, cfg: WaferConfig, head: bool, params: DecodeParams,
                 most: int) -> int:
    """Fewest P x P slots (at most `most`) a vocab x hidden table needs (embedding or LM head)."""
    for k in range(1, most + 1):
        try:
            (lm_memory if head else embedding_memory)(spec, k * P, P, cfg, params)
            return k
        except FitError:
            continue
    raise PlacementError(f"the {'LM head' if head else 'embedding'} does not fit in {most} slots of {P}x{P}")


def plan_model(spec: ModelSpec, cfg: WaferConfig, params: DecodeParams, n_layers: int | None = None,
               P: int | None = None, first_layer: int = 0, embed: bool = True, head: bool = True,
               Q: int | None = None) -> ModelPlan:
    """Slot size and placement. With P=None the largest slot that places and fits is chosen:
    square (params.slot_shape "square") or P columns by Q >= P rows ("tall": the largest area).

    first_layer, embed and head describe one wafer's share of a model split over several
    wafers: layers first_layer .. first_layer + n_layers - 1, with or without the embedding
    and the LM head.
    """
    check_colors(cfg)
    n_layers = spec.layers - first_layer if n_layers is None else n_layers
    if not 0 <= first_layer < spec.layers or not 1 <= n_layers <= spec.layers - first_layer:
        raise WseError(f"--layers must be in [1, {spec.layers - first_layer}] for {spec.name}")
    need = bytes_needed(spec, params, n_layers, first_layer, embed, head)
    have = usable_sram(cfg) * cfg.mesh_width * cfg.mesh_height
    if need > have:
        raise _does_not_fit(spec, cfg, params, n_layers, None, first_layer, embed, head)
    if params.moe_mapping == "regions" and not spec.moe:
        raise WseError(f"--moe-mapping regions: {spec.name} has no MoE layer")
    mappings = {"auto": ("local", "regions"), "local": ("local",), "regions": ("regions",)}[params.moe_mapping]
    if not any(spec.is_moe_layer(layer) for layer in range(first_layer, first_layer + n_layers)):
        mappings = ("local",)  # a group of dense layers (e.g. DeepSeek-V3's first three)
    last_error: Exception | None = None
    for mapping in mappings:
        try:
            return _place(spec, cfg, params, n_layers, P, first_layer, embed, head, mapping == "regions", Q=Q)
        except (PlacementError, FitError) as e:
            last_error = e
    raise _does_not_fit(spec, cfg, params, n_layers, last_error, first_layer, embed, head)


def plan_units(spec: ModelSpec, cfg: WaferConfig, params: DecodeParams, u0: int, u1: int, embed: bool,
               head: bool, P: int | None = None, Q: int | None = None) -> ModelPlan:
    """A wafer's share cut from model_units [u0, u1): whole layers and runs of a layer's
    routed experts, every MoE layer with expert regions (a layer's experts may continue on the
    next wafer)."""
    check_colors(cfg)
    units = model_units(spec)
    if not 0 <= u0 < u1 <= len(units):
        raise WseError(f"units {u0}..{u1 - 1} are outside {spec.name}'s {len(units)} units")
    share = units[u0:u1]
    need = sum(unit_bytes(spec, params, u) for u in share) + _table_bytes(spec, embed, head)
    have = usable_sram(cfg) * cfg.mesh_width * cfg.mesh_height
    what = f"{spec.name} units {u0}..{u1 - 1} (layers {share[0][0]}..{share[-1][0]})"
    if need > have:
        raise FitError(f"{what}: {need:,} B of weights and KV cache, {have:,} B usable")
    try:
        plan = _place(spec, cfg, params, share[-1][0] - share[0][0] + 1, P, share[0][0], embed, head, True, share,
                      Q)
    except (PlacementError, FitError) as e:
        raise FitError(f"{what} found no slot size that places every region and fits its SRAM ({e})") from None
    plan.units = (u0, u1)
    return plan


def _table_bytes(spec: ModelSpec, embed: bool, head: bool) -> int:
    return ELEM * ((spec.embedding_params() if embed else 0)
                   + (spec.lm_head_params() + spec.hidden_size if head else 0))


def _place(spec: ModelSpec, cfg: WaferConfig, params: DecodeParams, n_layers: int, P: int | None,
           first_layer: int, embed: bool, head: bool, expert_regions: bool,
           units: list[tuple[int, int]] | None = None, Q: int | None = None) -> ModelPlan:
    """The largest slot (or P x Q) that places the chain and fits every region; `units` cuts
    the chain at routed experts (plan_units) instead of whole layers."""
    if units is None:
        layer_ids = list(range(first_layer, first_layer + n_layers))
        expert_layers = [layer for layer in layer_ids if spec.is_moe_layer(layer)] if expert_regions else []
    else:
        layer_ids = [layer for layer, e in units if e < 0]
        expert_layers = sorted({layer for layer, e in units if e >= 0})
    W, Hm = cfg.mesh_width, cfg.mesh_height
    # one slot per layer region and at least one per layer's run of experts bounds the side
    least = len(layer_ids) + len(expert_layers) + embed + head
    area_bound = int((W * Hm / least) ** 0.5)
    top = min(W, Hm, spec.hidden_size, area_bound)
    first_error: Exception | None = None  # at the largest slot: what the smaller ones only repeat
    placed_error: Exception | None = None  # at the largest slot that placed the chain

    def chain_for(p: int, q: int) -> tuple[list, int]:
        per_region = 0
        if expert_layers:
            per_region = most_experts(spec, expert_layers[0], p, cfg, params, q)
            if not per_region:
                raise FitError(f"not one routed expert of {spec.name} fits a {p}x{q} region")
            per_region = min(per_region, params.experts_per_region or per_region)
        chain = chain_elements(spec, first_layer, n_layers, per_region) if units is None \
            else units_chain(units, per_region)
        return chain, per_region

    def tables(p: int) -> tuple[int, int]:
        k_e = _table_slots(spec, p, cfg, False, params, W // p - 1) if embed else 0
        k_h = _table_slots(spec, p, cfg, True, params, W // p) if head else 0
        return k_e, k_h

    def attempt(p: int, q: int) -> ModelPlan:
        nonlocal first_error, placed_error
        placed = False
        try:
            chain, per_region = chain_for(p, q)
            k_e, k_h = tables(p)
            slots = serpentine(len(chain), k_e, k_h, p, W, Hm, first_layer, chain, q)
            placed = True
            kinds = {layer_ids[0], layer_ids[-1]} if layer_ids else set()
            if spec.moe and spec.moe.dense_layers in layer_ids:
                kinds.add(spec.moe.dense_layers)
            for layer in sorted(kinds):
                plan_layer(spec, layer, p, cfg, params, routed=not expert_regions, Q=q)
            token_col = token_column(spec, k_e * p, params.token) if embed else 0
            return ModelPlan(spec, cfg, params, p, n_layers, slots, token_col, first_layer, embed, head, per_region,
                             expert_regions and bool(spec.moe), Q=q)
        except (PlacementError, FitError) as e:
            first_error = first_error or e
            if placed and placed_error is None:
                placed_error = e
            raise

    def failed() -> Exception:
        return placed_error or first_error or PlacementError("no slot size to try")

    if P or params.slot_shape == "square":
        for p, q in ([(P, Q or P)] if P else [(p, p) for p in range(top, 0, -1)]):
            try:
                return attempt(p, q)
            except (PlacementError, FitError):
                continue
        raise failed()
    # tall slots: for each width P, as many rows as leave bands for every slot of the chain;
    # the largest area wins
    q_cap = min(Hm, most_rows(spec))
    best: ModelPlan | None = None
    for p in range(min(top, q_cap), 0, -1):  # Q >= P
        if best and p * q_cap <= best.P * best.Q:
            break
        nx, q = W // p, q_cap
        try:
            k_e, k_h = tables(p)
            for _ in range(16):  # rows shrink as the chain (more expert regions) grows
                n = len(chain_for(p, q)[0]) + k_e + k_h
                q_next = min(q_cap, Hm // -(-n // nx))
                if q_next >= q or q_next < p:
                    q = min(q, q_next)
                    break
                q = q_next
            if q < p:
                continue
        except (PlacementError, FitError) as e:
            first_error = first_error or e
            continue
        for q_try in sorted({q, Hm // (Hm // q + 1)}, reverse=True):  # one band more if the head needs it
            if q_try < p:
                continue
            try:
                plan = attempt(p, q_try)
            except (PlacementError, FitError):
                continue
            if best is None or p * q_try > best.P * best.Q:
                best = plan
            break
    if best is None:
        raise failed()
    return best


def bytes_needed(spec: ModelSpec, params: DecodeParams, n_layers: int, first_layer: int = 0,
                 embed: bool = True, head: bool = True) -> int:
    """16-bit weights of the mapped layers (and the embedding and head when held), plus their
    KV cache."""
    weights = ELEM * ((spec.embedding_params() if embed else 0) + (spec.lm_head_params() + spec.hidden_size
                      if head else 0) + sum(spec.layer_params(i) for i in range(first_layer, first_layer + n_layers)))
    return weights + spec.kv_cache_width * params.context * params.batch * ELEM * n_layers


def _does_not_fit(spec: ModelSpec, cfg: WaferConfig, params: DecodeParams, n_layers: int,
                  cause: Exception | None, first_layer: int = 0, embed: bool = True, head: bool = True) -> WseError:
    """The error for a model that does not fit: bytes missing and wafers needed."""
    frac = n_layers / spec.layers
    need = bytes_needed(spec, params, n_layers, first_layer, embed, head)
    kv = spec.kv_cache_width * params.context * params.batch * ELEM * n_layers
    weights = need - kv
    have = usable_sram(cfg) * cfg.mesh_width * cfg.mesh_height
    wafers = -(-need // have)
    detail = f" ({cause})" if cause else ""
    what = spec.name if frac == 1 else f"{spec.name} ({n_layers} of {spec.layers} layers)"
    if need > have:
        return FitError(f"{what} does not fit on one {cfg.name} wafer: weights {weights:,} B + KV cache "
                        f"{kv:,} B = {need:,} B, usable SRAM {have:,} B; {need - have:,} B missing; "
                        f"it needs at least {wafers} wafers{detail}")
    return FitError(f"{what} ({need:,} B of weights and KV cache, {have:,} B usable) found no slot size "
                    f"that places every region and fits its SRAM{detail}")


# ---- traces ------------------------------------------------------------------------------------


def _build_region(plan: ModelPlan, slot: Slot, region: Region, builder: MeshBuilder, lanes: Lanes) -> RegionBuild:
    if slot.kind == "embedding":
        return embedding(plan.spec, region, builder, plan.cfg, plan.params, lanes)
    if slot.kind == "lm_head":
        return lm_head(plan.spec, region, builder, plan.cfg, plan.params, lanes)
    if slot.kind == "experts":
        ep = plan_experts(plan.spec, slot.index, slot.experts, plan.P, plan.cfg, plan.params, plan.Q)
        return decode_experts(ep, region, builder, lanes)
    return decode_layer(layer_plan(plan, slot.index), region, builder, lanes)


def _lanes_between(plan: ModelPlan, k: int) -> tuple[dict, dict]:
    a, b = plan.slots[k], plan.slots[k + 1]
    src = lane_sources(a, plan.P, plan.token_col)
    return src, lane_targets(a, b, src, plan.P)


def _spread(slot: Slot) -> tuple:
    return (X, ROW_BCAST) if slot.kind == "lm_head" else (Y, DIAG_BCAST)


def full_trace(plan: ModelPlan) -> tuple[Trace, list[RegionBuild]]:
    """One trace holding every region and lane of the decode step."""
    b = MeshBuilder(plan.width, plan.height, 4, model=plan.spec.name, phase="decode", P=plan.P,
                    batch=plan.params.batch, context=plan.params.context, layers=plan.n_layers)
    builds = []
    n = len(plan.slots)
    lanes_io = [_lanes_between(plan, k) for k in range(n - 1)]
    for k, slot in enumerate(plan.slots):
        c_in = transfer_color(k - 1) if k > 0 else None
        c_out = transfer_color(k) if k < n - 1 else None
        spread, bc = _spread(slot)
        lanes = Lanes(c_in, lanes_io[k - 1][1] if k > 0 else {}, c_out, lanes_io[k][0] if k < n - 1 else {},
                      spread, bc)
        builds.append(_build_region(plan, slot, slot.region, b, lanes))
    for k in range(n - 1):
        add_lane_routes(b, plan.slots[k], plan.slots[k + 1], *lanes_io[k], transfer_color(k))
    return b.build(), builds


@dataclasses.dataclass
class StageTrace:
    key: tuple
    trace: Trace
    anchor: tuple[int, int] | None  # mesh (x, y) whose finish_cycle marks the anchor of interest


def region_key(plan: ModelPlan, slot: Slot) -> tuple:
    """Regions with equal keys run identical programs."""
    spec = plan.spec
    if slot.kind == "experts":  # whether it is its layer's last, the experts it runs
        ep = plan_experts(spec, slot.index, slot.experts, plan.P, plan.cfg, plan.params, plan.Q)
        use = ep.local_experts()
        period = bank_period(plan.cfg)
        if all(ep.shapes[k].tile_bytes() % period == 0 for k in ("gate_up", "down")) \
                and ALIGN_BYTES % period == 0:
            # expert copies, and the weight blocks of regions holding more or fewer experts,
            # differ only by addresses the bank-conflict rule cannot tell apart (the payload
            # buffers sit below the weights), so neither the region's size nor which experts
            # run matters, only how many sequences each chosen expert serves
            return ("experts", ep.last, "users", tuple(use.values()))
        return ("experts", slot.experts[1] - slot.experts[0], ep.last, tuple(use.items()))
    if slot.kind != "layer":
        return (slot.kind, slot.region.width, slot.region.height)
    moe = spec.is_moe_layer(slot.index)
    if moe and plan.expert_regions:  # router and shared experts only: the same in every MoE layer
        return ("layer", moe, "expert-regions")
    return ("layer", moe, tuple(moe_experts(spec, slot.index, plan.params.batch, plan.params.expert_skew).items())
            if moe else ())


def bank_period(cfg: WaferConfig) -> int:
    """Bytes by which shifting both operands' start addresses never changes the engine's bank
    conflict rule ((address // word) % banks % modulus)."""
    w, banks, m = cfg.sram_bank_word_bytes, cfg.sram_banks, cfg.sram_bank_conflict_modulus
    return w * (m if banks % m == 0 else banks)


def key_A0(plan: ModelPlan) -> tuple:
    return ("A", plan.P, plan.Q, region_key(plan, plan.slots[0]))


def key_B(plan: ModelPlan, k: int) -> tuple:
    """Stage B_k runs only region k's barrier: its size is all that matters."""
    r = plan.slots[k].region
    return ("B", r.width, r.height)


def sender_key(plan: ModelPlan, k: int) -> tuple:
    """What of region k a stage S_k depends on: it runs only its barrier and its lane sends
    (from the token's table column or the diagonal, the payload set by region k+1's kind)."""
    s = plan.slots[k]
    table = s.kind == "embedding"
    return (table, s.region.width, s.region.height, plan.token_col if table else -1)


def key_S(plan: ModelPlan, k: int) -> tuple:
    """Stage S_k's key: the slot shape, the sender, region k+1's key and the direction between
    them (keys are equal only for identical traces: region k+1 runs without onward sends in
    every S stage, so whether it ends the chain does not matter)."""
    a, nxt = plan.slots[k], plan.slots[k + 1]
    return ("S", plan.P, plan.Q, sender_key(plan, k), region_key(plan, nxt), direction(a.region, nxt.region))


def _sub(plan: ModelPlan, slots: list[Slot]) -> tuple[int, int, int, int]:
    x0 = min(s.region.x0 for s in slots)
    y0 = min(s.region.y0 for s in slots)
    x1 = max(s.region.x0 + s.region.width for s in slots)
    y1 = max(s.region.y0 + s.region.height for s in slots)
    return x0, y0, x1 - x0, y1 - y0


def _shift(r: Region, ox: int, oy: int) -> Region:
    return Region(r.x0 - ox, r.y0 - oy, r.width, r.height)


def stage_A0(plan: ModelPlan) -> StageTrace:
    """Region 0 alone, its lane sends omitted."""
    s = plan.slots[0]
    ox, oy, w, h = _sub(plan, [s])
    b = MeshBuilder(w, h, 4, stage="A0")
    rb = _build_region(plan, s, _shift(s.region, ox, oy), b, Lanes(None, {}, None, {}))
    ax, ay = rb.anchor
    return StageTrace(key_A0(plan), b.build(), (rb.region.x0 + ax, rb.region.y0 + ay))


def stage_B(plan: ModelPlan, k: int) -> StageTrace:
    """Region k running only its hand-off barrier."""
    from .region import handoff, reducers, THREADS
    from .mesh import RegionProgram
    s = plan.slots[k]
    ox, oy, w, h = _sub(plan, [s])
    b = MeshBuilder(w, h, 4, stage="B")
    region = _shift(s.region, ox, oy)
    red = reducers(region, b, plan.params)
    prog = RegionProgram(region, THREADS)
    prog.add_roles(X, [red[X].role(i) for i in range(region.width)])
    prog.add_roles(Y, [red[Y].role(j) for j in range(region.height)])
    prog.add(lambda xr, yr, sp: handoff(red, xr[0], yr[0], 0, 64))
    prog.program_ids(b)
    ax, ay = red[X].final_root, red[Y].final_root
    return StageTrace(key_B(plan, k), b.build(), (region.x0 + ax, region.y0 + ay))


def stage_S(plan: ModelPlan, k: int) -> StageTrace:
    """Region k's barrier and lane sends into region k+1's whole program (no onward sends)."""
    from .region import handoff, reducers, THREADS, merge
    from .mesh import RegionProgram
    a, nxt = plan.slots[k], plan.slots[k + 1]
    ox, oy, w, h = _sub(plan, [a, nxt])
    b = MeshBuilder(w, h, 4, stage="S")
    src, dst = _lanes_between(plan, k)
    color = transfer_color(k)
    ra = _shift(a.region, ox, oy)
    red = reducers(ra, b, plan.params)
    prog = RegionProgram(ra, THREADS)
    prog.add_roles(X, [red[X].role(i) for i in range(ra.width)])
    prog.add_roles(Y, [(red[Y].role(j),) for j in range(ra.height)])
    lanes_a = Lanes(None, {}, color, src)
    lanes_a.install(b, prog)
    chunks = split(plan.spec.hidden_size, plan.P)
    dispatch = nxt.kind == "experts"  # region k sends the FFN input, residual stream and gate values
    B = plan.params.batch

    t_hand = b.tag("handoff", -1, "barrier")

    def body(xr, yr, sp):
        out = handoff(red, xr[0], yr[0][0], 0, 64)
        if "out" in sp:
            hi = chunks[sp["out"]]
            parts = dispatch_parts(plan.spec, hi, B, {"xn": SEND_FROM, "h": SEND_FROM, "gates": SEND_FROM}) \
                if dispatch else [(hi * B, SEND_FROM)]
            merge(out, lanes_a.send_parts(sp, parts))
        return {t: [op._replace(tag=t_hand) for op in ops] for t, ops in out.items()}

    prog.add(body)
    prog.program_ids(b)
    spread, bc = _spread(nxt)
    rb = _build_region(plan, nxt, _shift(nxt.region, ox, oy), b, Lanes(color, dst, None, {}, spread, bc))
    add_lane_routes(b, a, nxt, src, dst, color, ox, oy)
    anchor = (rb.region.x0 + rb.anchor[0], rb.region.y0 + rb.anchor[1])  # (the chain's last region: unused)
    return StageTrace(key_S(plan, k), b.build(), anchor)


@dataclasses.dataclass
class DecodeResult:
    total_cycles: int
    anchors: list[int]  # a_k per region (the last region has none)
    stage_cycles: dict[tuple, int]  # distinct simulation key -> its total cycles
    simulations: int
    results: dict[tuple, object]  # key -> EngineResult of each distinct simulation
    terms: list[tuple[int, tuple]] = dataclasses.field(default_factory=list)  # (sign, key): sums to the step

    def total(self, counter: str) -> int:
        """A PE counter summed over the whole step (e.g. flops): the signed sum of the stages'
        totals, which counts every region's program and every lane transfer exactly once."""
        return int(sum(sign * int(self.results[key].pe(counter).sum()) for sign, key in self.terms))

    def link_total(self, counter: str) -> int:
        """A link counter (e.g. wavelets: wavelet-hops) summed over the whole step."""
        return int(sum(sign * int(self.results[key].link(counter).sum()) for sign, key in self.terms))


def stages(plan: ModelPlan) -> list[tuple[tuple, str, int]]:
    """The stage simulations the plan's composition needs, in order, as (key, kind, k) with
    kind "A0", "S" or "B" (build_stage builds one): A0, then S_k and B_k for each hand-off."""
    out = [(key_A0(plan), "A0", 0)]
    for k in range(len(plan.slots) - 1):
        out += [(key_S(plan, k), "S", k), (key_B(plan, k), "B", k)]
    return out


def build_stage(plan: ModelPlan, kind: str, k: int) -> StageTrace:
    """The trace of one stage listed by stages()."""
    return {"A0": lambda: stage_A0(plan), "S": lambda: stage_S(plan, k), "B": lambda: stage_B(plan, k)}[kind]()


def checked_stage(key: tuple, result):
    """The stage's result, or a WseError if the stage did not run to completion."""
    if not result.complete:
        raise WseError(f"stage {key} did not complete ({result.stop_name}): " + "; ".join(result.stuck[:3]))
    return result


def compose(plan: ModelPlan, simulate: Callable[[Trace], object],
            shared: dict[tuple, tuple[object, tuple[int, int] | None]] | None = None) -> DecodeResult:
    """Cycles of the decode step from the distinct stage simulations (see module docstring).

    Stages with equal keys are identical traces: each distinct one is built and simulated once,
    also across the plans of one system when they pass the same `shared` dict (key -> result,
    anchor; it may arrive filled, e.g. by worker processes); `simulations` counts the ones this
    call ran.
    """
    store = {} if shared is None else shared
    ran = 0
    listed = stages(plan)
    for key, kind, k in listed:
        if key not in store:
            st = build_stage(plan, kind, k)
            store[key] = (checked_stage(key, simulate(st.trace)), st.anchor)
            ran += 1
    cache = {key: store[key][0] for key, _, _ in listed}  # the stages this plan uses

    def finish(key: tuple) -> int:
        r, (x, y) = store[key]
        return int(r.pe("finish_cycle")[y, x])

    a0 = listed[0][0]
    S = [key for key, kind, _ in listed if kind == "S"]
    B = [key for key, kind, _ in listed if kind == "B"]
    # every region's work once: A0, then each S_k less its B_k (region k's barrier twice)
    terms = [(1, a0)] + [(1 if kind == "S" else -1, key) for key, kind, _ in listed[1:]]
    stage_cycles = {k: r.total_cycles for k, r in cache.items()}
    if not S:  # one region (a wafer holding one layer): it runs alone
        return DecodeResult(cache[a0].total_cycles, [], stage_cycles, ran, cache, terms)
    anchors = [finish(a0)]
    for s_k, b_k in zip(S[:-1], B[:-1]):
        anchors.append(anchors[-1] + finish(s_k) - finish(b_k))
    total = anchors[-1] + cache[S[-1]].total_cycles - finish(B[-1])
    return DecodeResult(total, anchors, stage_cycles, ran, cache, terms)
