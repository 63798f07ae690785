"""`wse system --mla-groups auto`: latent attention's row groups chosen by simulation.

Row groups (workload/mla.py, `mla_split`) cut the flash blocks each PE runs by G and pay for it
with the groups' repeated work (each group's latent of the new token, absorbed query and output
accumulators, the merge down the columns) and with SRAM (G copies of the replicated latent
weights). Which G is fastest depends on the context, the slot and the model, so `auto` does not
guess: on the wafer plans each G gets, it simulates the representative layer region alone (the
first MoE layer's, else the first layer's: attention, router and shared expert; its lanes left
out) for G = 1, 2, ... and keeps the fewest cycles. The search stops at the first G whose
plans do not fit and at the first G slower than the one before (the saving shrinks as 1/G while
the price grows with G). The simulations go through the fanout and its cache like the stages.
`--wafers cheapest` (wafer_search.py) simulates the same representative region alone per count.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..errors import WseError
from ..trace import Trace
from ..workload.decode import ModelPlan, layer_plan
from ..workload.layer import decode_layer
from ..workload.mesh import MeshBuilder, Region
from ..workload.models import ModelSpec
from ..workload.params import DecodeParams
from ..workload.region import Lanes
from .cache import content_key
from .config import SystemConfig
from .pool import Fanout, Work, _simulate_trace
from .wafers import fewest_wafers, wafer_plans

AUTO = 0  # run_system's mla_groups for --mla-groups auto


@dataclasses.dataclass
class GroupChoice:
    """What `auto` chose: the groups, and the representative layer region's cycles per G tried."""

    groups: int
    cycles: dict[int, int]
    layer: int  # the layer whose region was simulated
    slot: tuple[int, int]  # its P x Q (the first such wafer's)
    wafers: int | None = None  # the wafers the candidates were planned on

    def describe(self) -> str:
        head = f"latent attention in {self.groups} row group{'s' * (self.groups > 1)} (--mla-groups auto: "
        if not self.cycles:
            return head + f"2 groups do not place on these {self.slot[0]}x{self.slot[1]} slots)"
        tried = " / ".join(f"{c:,}" for c in self.cycles.values())
        return head + (f"layer {self.layer}'s region on {self.slot[0]}x{self.slot[1]} alone took {tried} cycles "
                       f"at G = {' / '.join(map(str, self.cycles))})")


def layer_region_trace(plan: ModelPlan) -> tuple[Trace, int]:
    """(trace, layer) of the plan's representative layer region alone on a P x Q mesh: its first
    MoE layer's, else its first layer's (the region's whole program; no lanes in or out)."""
    layers = [s.index for s in plan.slots if s.kind == "layer"]
    if not layers:
        raise WseError("--mla-groups auto: the wafer holds no layer region")
    layer = next((i for i in layers if plan.spec.is_moe_layer(i)), layers[0])
    builder = MeshBuilder(plan.P, plan.Q, 1, model=plan.spec.name, layer=str(layer))
    decode_layer(layer_plan(plan, layer), Region(0, 0, plan.P, plan.Q), builder, Lanes(None, {}, None, {}))
    return builder.build(), layer


def representative(plans: list[ModelPlan], what: str = "--mla-groups auto") -> ModelPlan:
    """The first wafer with a MoE layer region (else with any layer region)."""
    def moe(p: ModelPlan) -> bool:
        return any(s.kind == "layer" and p.spec.is_moe_layer(s.index) for s in p.slots)
    with_layers = [p for p in plans if any(s.kind == "layer" for s in p.slots)]
    if not with_layers:
        raise WseError(f"{what}: no wafer holds a layer region")
    return next((p for p in with_layers if moe(p)), with_layers[0])


def region_cycles(trace: Trace, layer: int, cfg, simulate: Callable[[Trace], object], fanout: Fanout,
                  what: str) -> int:
    """Cycles of a layer region simulated alone (layer_region_trace), through the fanout and its
    cache like the stages; one error line if it does not finish."""
    work = Work(content_key("layer-region", trace.content_hash(), cfg), lambda: (simulate(trace), {}),
                _simulate_trace, (trace, cfg, fanout.worker_threads()))
    result = next(iter(fanout.run([work])))[1]
    if not result.complete:
        raise WseError(f"{what}: layer {layer}'s region did not finish ({result.stop_name})")
    return int(result.total_cycles)


def choose_groups(spec: ModelSpec, system: SystemConfig, params: DecodeParams, wafers: int | None,
                  simulate: Callable[[Trace], object], fanout: Fanout | None = None) -> GroupChoice:
    """The row groups `auto` takes for this run (1 for a model without latent attention), with
    the cycles behind the choice; wafers None: the fewest that hold the model with one group."""
    if spec.mla is None or params.attention != "flash":
        return GroupChoice(1, {}, -1, (0, 0))
    n = wafers or fewest_wafers(spec, system, dataclasses.replace(params, mla_groups=1))
    fanout = fanout or Fanout()
    cfg = system.wafer_config

    def region(G: int) -> tuple[Trace, int, ModelPlan] | None:
        """G's representative layer region, or None where G's plans do not place (its rows, SRAM)."""
        try:
            plan = representative(wafer_plans(spec, system, dataclasses.replace(params, mla_groups=G), n))
            return (*layer_region_trace(plan), plan)
        except WseError:
            if G == 1:
                raise
            return None

    first = region(1)
    nxt = region(2)
    if nxt is None:  # one candidate: nothing to simulate
        return GroupChoice(1, {}, first[1], (first[2].P, first[2].Q), n)
    cycles: dict[int, int] = {}
    G, now = 1, first
    while True:
        trace, layer, _ = now
        cycles[G] = region_cycles(trace, layer, cfg, simulate, fanout, f"--mla-groups auto with {G} groups")
        if G > 1 and cycles[G] >= cycles[G - 1]:
            break
        G += 1
        now = nxt if G == 2 else region(G)  # (built only once the search goes on to it)
        if now is None:
            break
    best = min(cycles, key=lambda g: (cycles[g], g))
    return GroupChoice(best, cycles, first[1], (first[2].P, first[2].Q), n)
