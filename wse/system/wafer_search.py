"""`--wafers cheapest`: the wafer count of least cost per token at the deepest pipeline its KV
SRAM allows (docs/system.md, "The cheapest wafer count").

The fewest wafers that hold a model (`--wafers auto`) can leave its layer regions SRAM for few
KV caches, so few micro-batches in flight, while one wafer more holds many more; and more
wafers give larger slots, so faster layer regions, whose time is most of the token's latency
and the longest pipeline stage. The search simulates the fewest count n0 whole. For each count
n >= n0 it plans the wafers (placement and SRAM: the micro-batches its layer regions' KV SRAM
holds, kv(n)) and simulates the representative layer region alone (mla_groups: seconds to a
minute), r(n) cycles. Its estimate of count n is the pipeline of its *base* b, the largest count
below it simulated whole, with every layer region's stage moved by r(n) - r(b) [U] (expert
regions, links and the other stages kept as b's): the latency, the longest stage, the depth
that fills the pipeline F(n), the micro-batches in flight min(kv(n), F(n)), and from those the
cost per token as `wafers.pipeline_point` computes it. A scan upward from the base stops at the
first count that no estimate can make cheaper than the best (its wafers x the longest stage the
estimate keeps from the base), or after PATIENCE counts in a row that do not place or run a full
pipeline and are no cheaper than the best [U]. If the cheapest count is then an estimate, it is
simulated whole, becomes the base of the counts above it (re-estimated from it: its stages the
estimate keeps are those of its own slots) and the scan goes on from it, each simulated count it
passes the base of those above that; the search ends when the cheapest count is one simulated
whole, whose simulation the run reports.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from ..errors import WseError
from ..trace import Trace
from ..workload.models import ModelSpec
from ..workload.params import DecodeParams
from .config import SystemConfig
from .mla_groups import layer_region_trace, region_cycles, representative
from .pool import Fanout
from .wafers import SystemDecode, extra_in_flight_of, fill_depth, pipeline_point, wafer_plans

MOST_WAFERS = 4096  # (as fewest_wafers)
PATIENCE = 2  # counts in a row, full or not placing and no cheaper than the best, that end the search [U]
WHAT = "--wafers cheapest"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One wafer count the search planned, and its estimate (all zero where it does not place)."""

    wafers: int
    slot: tuple[int, int]  # P x Q of its layer slots (the first wafer's)
    kv_in_flight: int  # micro-batches whose KV caches every layer region holds (0: it does not place)
    layer_cycles: int = 0  # its representative layer region simulated alone
    # latency, longest stage and depth: the whole simulation's where it was simulated, else estimated
    latency_s: float = 0.0  # one token through the chain
    longest_s: float = 0.0  # the longest pipeline stage
    in_flight: int = 0  # min(kv_in_flight, micro-batches that fill the pipeline)
    usd_per_mtok: float = float("inf")  # estimated cost per token at that depth
    base: int = 0  # the count simulated whole it was estimated from
    simulated_usd_per_mtok: float = math.nan  # its own whole simulation's, where it was simulated

    @property
    def full(self) -> bool:
        """It places, and its KV room fills the pipeline (more room would not help)."""
        return self.kv_in_flight > 0 and self.in_flight == fill_depth(self.latency_s, self.longest_s)

    @property
    def simulated(self) -> bool:
        return not math.isnan(self.simulated_usd_per_mtok)

    @property
    def cost(self) -> float:
        """Its cost per token: simulated where it was, else estimated."""
        return self.simulated_usd_per_mtok if self.simulated else self.usd_per_mtok


@dataclasses.dataclass
class WaferSearch:
    """What `--wafers cheapest` planned and simulated, and what it chose."""

    fewest: int
    candidates: list[Candidate]
    chosen: int
    stop: str = ""  # why the last scan ended where it did
    decodes: dict[int, SystemDecode] = dataclasses.field(default_factory=dict)  # the counts simulated whole

    def describe(self) -> str:
        pick = next(c for c in self.candidates if c.wafers == self.chosen)
        first = self.candidates[0]
        last = self.candidates[-1].wafers
        sims = ", ".join(str(c.wafers) for c in self.candidates if c.simulated)
        figure = (f"${pick.simulated_usd_per_mtok:,.3g}/Mtok simulated (estimated ${pick.usd_per_mtok:,.3g})"
                  if pick.simulated and pick.base != pick.wafers else f"${pick.cost:,.3g}/Mtok "
                  + ("simulated" if pick.simulated else "estimated"))
        tail = "" if pick.wafers == first.wafers else (
            f"; the fewest, {first.wafers}, hold {first.kv_in_flight} (${first.cost:,.3g}/Mtok simulated)")
        sims = f", simulated {sims} whole" if sims else ""
        return (f"wafers: --wafers cheapest planned {first.wafers}..{last}{sims} and chose {pick.wafers} on "
                f"{pick.slot[0]}x{pick.slot[1]} slots: layer region alone {pick.layer_cycles:,} "
                f"cycles, {pick.in_flight} micro-batches in flight (KV room {pick.kv_in_flight}), {figure}{tail}; "
                f"{self.stop}")

    def table(self) -> dict[str, np.ndarray]:
        c = self.candidates
        return {"wafers": np.array([x.wafers for x in c], dtype=np.int64),
                "slot_columns": np.array([x.slot[0] for x in c], dtype=np.int64),
                "slot_rows": np.array([x.slot[1] for x in c], dtype=np.int64),
                "kv_in_flight": np.array([x.kv_in_flight for x in c], dtype=np.int64),
                "layer_region_cycles": np.array([x.layer_cycles for x in c], dtype=np.int64),
                "estimated_from": np.array([x.base for x in c], dtype=np.int64),
                "latency_s": np.array([x.latency_s for x in c], dtype=np.float64),
                "longest_stage_s": np.array([x.longest_s for x in c], dtype=np.float64),
                "in_flight": np.array([x.in_flight for x in c], dtype=np.int64),
                "estimated_usd_per_mtok": np.array([x.usd_per_mtok for x in c], dtype=np.float64),
                "simulated_usd_per_mtok": np.array([x.simulated_usd_per_mtok for x in c], dtype=np.float64),
                "chosen": np.array([x.wafers == self.chosen for x in c], dtype=bool)}


def kv_in_flight(plans: list) -> int:
    """Micro-batches whose KV caches every layer region of the plans holds."""
    return 1 + min(extra_in_flight_of(p) for p in plans)


def stage_seconds(first: SystemDecode) -> tuple[list[float], list[float]]:
    """The simulated chain's pipeline stages in seconds: its layer regions', and the others
    (other regions and the links), as wafers.run_decode lists them."""
    layer, other = [], []
    for s in first.steps:
        for c, info in zip(s.region_cycles, s.regions):
            (layer if info.kind == "layer" else other).append(c / first.clock_hz)
    return layer, other + list(first.ledger.busy.values())


def estimate(first: SystemDecode, system: SystemConfig, wafers: int, slot: tuple[int, int], kv: int,
             cycles: int, cycles0: int) -> Candidate:
    """Count `wafers` as the simulated `first` with every layer region's stage moved by
    `cycles` - `cycles0` (its and `first`'s layer region alone)."""
    layer, other = stage_seconds(first)
    delta = (cycles - cycles0) / first.clock_hz
    latency = first.latency_s + len(layer) * delta
    longest = max([t + delta for t in layer] + other)
    m = min(kv, fill_depth(latency, longest))
    at = dataclasses.replace(first, wafers=wafers, latency_s=latency, bottleneck_s=longest)
    point = pipeline_point(at, system, m)
    return Candidate(wafers, slot, kv, cycles, latency, longest, m, point.usd_per_mtok, first.wafers)


def usd_floor(first: SystemDecode, system: SystemConfig, wafers: int, longest_s: float) -> float:
    """The least cost per token of `wafers` whose longest stage is at least `longest_s` (a full
    pipeline: one micro-batch each longest stage)."""
    return pipeline_point(dataclasses.replace(first, wafers=wafers, latency_s=longest_s, bottleneck_s=longest_s),
                          system, 1).usd_per_mtok


def search(spec: ModelSpec, system: SystemConfig, params: DecodeParams, first: SystemDecode,
           simulate: Callable[[Trace], object], fanout: Fanout | None = None, most: int = MOST_WAFERS,
           patience: int = PATIENCE, run: Callable[[int], SystemDecode] | None = None) -> WaferSearch:
    """The count of least cost per token from `first`, the simulated fewest count (module
    docstring); counts that do not place are kept with kv_in_flight 0. `run` simulates a count
    whole (wafers.run_decode); without it the search ends at its first scan's least estimate."""
    fanout = fanout or Fanout()
    cfg = system.wafer_config

    def layer_cycles(plans: list) -> int:
        trace, layer = layer_region_trace(representative(plans, WHAT))
        return region_cycles(trace, layer, cfg, simulate, fanout, WHAT)

    def simulated(dec: SystemDecode, c: Candidate) -> Candidate:
        """c with its whole simulation's figures (the estimate's cost kept beside them)."""
        return dataclasses.replace(c, latency_s=dec.latency_s, longest_s=dec.bottleneck_s,
                                   in_flight=dec.max_in_flight, simulated_usd_per_mtok=dec.curve[-1].usd_per_mtok)

    n0 = first.wafers
    plans = wafer_plans(spec, system, params, n0)  # (the plans `first` simulated)
    cycles0 = layer_cycles(plans)
    found = {n0: simulated(first, estimate(first, system, n0, (plans[0].P, plans[0].Q), kv_in_flight(plans),
                                           cycles0, cycles0))}
    decodes = {n0: first}
    base, stop = found[n0], ""
    while True:
        stop = _scan(spec, system, params, decodes, base, found, layer_cycles, most, patience)
        best = min(found.values(), key=lambda c: (c.cost, c.wafers))
        if best.simulated or run is None:
            break
        decodes[best.wafers] = run(best.wafers)  # the cheapest is an estimate: simulate it, rebase on it
        found[best.wafers] = simulated(decodes[best.wafers], best)
        base = found[best.wafers]
    out = [found[n] for n in sorted(found)]
    return WaferSearch(n0, out, best.wafers, stop, decodes)


def _scan(spec: ModelSpec, system: SystemConfig, params: DecodeParams, decodes: dict[int, SystemDecode],
          base: Candidate, found: dict[int, Candidate], layer_cycles: Callable[[list], int], most: int,
          patience: int) -> str:
    """Estimate the counts above `base` from it — from each count simulated whole (`decodes`) the
    scan passes, the counts above that — those planned before again, planning the others, until a
    stop rule ends the scan (module docstring); estimates beyond that from another base than the
    largest simulated count below them are dropped. Returns why the scan ended."""
    dec = decodes[base.wafers]
    floor = _kept(dec)
    best = min((c for n, c in found.items() if n <= base.wafers), key=lambda c: (c.cost, c.wafers))
    misses, n, stop = 0, base.wafers + 1, f"stopped at {most} wafers"
    while n <= most:
        if floor > 0 and usd_floor(dec, system, n, floor) >= best.cost:
            stop = (f"no count from {n} on can be cheaper (its longest stage at least the stages the estimate "
                    f"keeps from {base.wafers})")
            n -= 1
            break
        c = found.get(n)
        if c is None:
            try:
                plans = wafer_plans(spec, system, params, n)
            except WseError:  # (a count may fail to place where a larger one places)
                c = Candidate(n, (0, 0), 0)
            else:
                c = Candidate(n, (plans[0].P, plans[0].Q), kv_in_flight(plans), layer_cycles(plans))
        if c.kv_in_flight > 0 and not c.simulated:
            c = estimate(dec, system, n, c.slot, c.kv_in_flight, c.layer_cycles, base.layer_cycles)
        found[n] = c
        if c.simulated:  # the base of the counts above it
            base, dec = c, decodes[n]
            floor = _kept(dec)
        if c.cost < best.cost:
            best, misses = c, 0
        elif c.kv_in_flight == 0 or c.full:
            misses += 1
            if misses >= patience:
                stop = f"{patience} counts in a row no cheaper, at a full pipeline or not placing"
                break
        else:  # KV-bound: a count more may hold more
            misses = 0
        n += 1
    for k in [k for k, c in found.items() if k > n and not c.simulated and c.base != max(b for b in decodes if b < k)]:
        del found[k]
    return stop


def _kept(dec: SystemDecode) -> float:
    """The longest stage no estimate from `dec` moves (the floor's stage)."""
    return max(stage_seconds(dec)[1], default=0.0)
