"""`--wafers cheapest`: the wafer count of least estimated cost per token at the deepest
pipeline its KV SRAM allows (docs/system.md, "The cheapest wafer count").

The fewest wafers that hold a model (`--wafers auto`) can leave its layer regions SRAM for few
KV caches, so few micro-batches in flight, while one wafer more holds many more; and more
wafers give larger slots, so faster layer regions, whose time is most of the token's latency
and the longest pipeline stage. The search simulates the fewest count n0 whole. For each count
n >= n0 it plans the wafers (placement and SRAM: the micro-batches its layer regions' KV SRAM
holds, kv(n)) and simulates the representative layer region alone (mla_groups: seconds to a
minute), r(n) cycles. Its estimate of count n is n0's simulated pipeline with every layer
region's stage moved by r(n) - r(n0) [U] (expert regions, links and the other stages kept as
n0's): the latency, the longest stage, the depth that fills the pipeline F(n), the micro-batches
in flight min(kv(n), F(n)), and from those the cost per token as `wafers.pipeline_point` computes
it — for n0 exactly its simulated figure. The search stops at the first count that no estimate
can make cheaper than the best (its wafers x the longest stage the estimate leaves unchanged),
or after PATIENCE counts in a row that do not place or run a full pipeline and are no cheaper
than the best [U]; the chosen count is then simulated whole.
"""
from __future__ import annotations

import dataclasses
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
    latency_s: float = 0.0  # estimated: one token through the chain
    longest_s: float = 0.0  # estimated: the longest pipeline stage
    in_flight: int = 0  # min(kv_in_flight, micro-batches that fill the estimated pipeline)
    usd_per_mtok: float = float("inf")  # estimated cost per token at that depth

    @property
    def full(self) -> bool:
        """It places, and its KV room fills the estimated pipeline (more room would not help)."""
        return self.kv_in_flight > 0 and self.in_flight == fill_depth(self.latency_s, self.longest_s)


@dataclasses.dataclass
class WaferSearch:
    """What `--wafers cheapest` planned, and what it chose."""

    fewest: int
    candidates: list[Candidate]
    chosen: int
    stop: str = ""  # why the search ended where it did

    def describe(self) -> str:
        pick = next(c for c in self.candidates if c.wafers == self.chosen)
        first = self.candidates[0]
        last = self.candidates[-1].wafers
        tail = "" if pick.wafers == first.wafers else (
            f"; the fewest, {first.wafers}, hold {first.kv_in_flight} (${first.usd_per_mtok:,.3g}/Mtok simulated)")
        return (f"wafers: --wafers cheapest planned {first.wafers}..{last} and chose {pick.wafers} on "
                f"{pick.slot[0]}x{pick.slot[1]} slots: layer region alone {pick.layer_cycles:,} cycles, "
                f"{pick.in_flight} micro-batches in flight (KV room {pick.kv_in_flight}), estimated "
                f"${pick.usd_per_mtok:,.3g}/Mtok{tail}; {self.stop}")

    def table(self) -> dict[str, np.ndarray]:
        c = self.candidates
        return {"wafers": np.array([x.wafers for x in c], dtype=np.int64),
                "slot_columns": np.array([x.slot[0] for x in c], dtype=np.int64),
                "slot_rows": np.array([x.slot[1] for x in c], dtype=np.int64),
                "kv_in_flight": np.array([x.kv_in_flight for x in c], dtype=np.int64),
                "layer_region_cycles": np.array([x.layer_cycles for x in c], dtype=np.int64),
                "latency_s": np.array([x.latency_s for x in c], dtype=np.float64),
                "longest_stage_s": np.array([x.longest_s for x in c], dtype=np.float64),
                "in_flight": np.array([x.in_flight for x in c], dtype=np.int64),
                "estimated_usd_per_mtok": np.array([x.usd_per_mtok for x in c], dtype=np.float64),
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
    `cycles` - `cycles0` (its and n0's layer region alone)."""
    layer, other = stage_seconds(first)
    delta = (cycles - cycles0) / first.clock_hz
    latency = first.latency_s + len(layer) * delta
    longest = max([t + delta for t in layer] + other)
    m = min(kv, fill_depth(latency, longest))
    at = dataclasses.replace(first, wafers=wafers, latency_s=latency, bottleneck_s=longest)
    point = pipeline_point(at, system, m)
    return Candidate(wafers, slot, kv, cycles, latency, longest, m, point.usd_per_mtok)


def usd_floor(first: SystemDecode, system: SystemConfig, wafers: int, longest_s: float) -> float:
    """The least cost per token of `wafers` whose longest stage is at least `longest_s` (a full
    pipeline: one micro-batch each longest stage)."""
    return pipeline_point(dataclasses.replace(first, wafers=wafers, latency_s=longest_s, bottleneck_s=longest_s),
                          system, 1).usd_per_mtok


def search(spec: ModelSpec, system: SystemConfig, params: DecodeParams, first: SystemDecode,
           simulate: Callable[[Trace], object], fanout: Fanout | None = None, most: int = MOST_WAFERS,
           patience: int = PATIENCE) -> WaferSearch:
    """The count of least estimated cost per token from `first`, the simulated fewest count
    (module docstring); counts that do not place are kept with kv_in_flight 0."""
    fanout = fanout or Fanout()
    cfg = system.wafer_config

    def layer_cycles(plans: list) -> int:
        trace, layer = layer_region_trace(representative(plans, WHAT))
        return region_cycles(trace, layer, cfg, simulate, fanout, WHAT)

    n0 = first.wafers
    plans = wafer_plans(spec, system, params, n0)  # (the plans `first` simulated)
    cycles0 = layer_cycles(plans)
    found = [estimate(first, system, n0, (plans[0].P, plans[0].Q), kv_in_flight(plans), cycles0, cycles0)]
    floor = max(stage_seconds(first)[1], default=0.0)  # the longest stage no estimate moves
    best, misses, n, stop = found[0], 0, n0 + 1, f"stopped at {most} wafers"
    while n <= most:
        if floor > 0 and usd_floor(first, system, n, floor) >= best.usd_per_mtok:
            stop = f"no count from {n} on can be cheaper (its longest stage at least the stages the estimate keeps)"
            break
        try:
            plans = wafer_plans(spec, system, params, n)
        except WseError:  # (a count may fail to place where a larger one places)
            found.append(Candidate(n, (0, 0), 0))
        else:
            found.append(estimate(first, system, n, (plans[0].P, plans[0].Q), kv_in_flight(plans),
                                  layer_cycles(plans), cycles0))
        c = found[-1]
        if c.usd_per_mtok < best.usd_per_mtok:
            best, misses = c, 0
        elif c.kv_in_flight == 0 or c.full:
            misses += 1
            if misses >= patience:
                stop = f"{patience} counts in a row no cheaper, at a full pipeline or not placing"
                break
        else:  # KV-bound: a count more may hold more
            misses = 0
        n += 1
    return WaferSearch(n0, found, best.wafers, stop)
