"""`--wafers cheapest`: the wafer count of least estimated cost per token at the deepest
pipeline its KV SRAM allows (docs/system.md, "The cheapest wafer count").

The fewest wafers that hold a model (`--wafers auto`) can leave its layer regions SRAM for few
KV caches, so few micro-batches in flight, while one wafer more holds many more. The cost per
token at the deepest pipeline is n x (price of a wafer-second) x period / (micro-batches in
flight), with the period the token's latency while the pipeline is not full. The search
simulates the fewest count n0 and takes from it the latency and the depth that fills its
pipeline, F = ceil(latency / longest stage); it then plans each count n >= n0 (placement and
SRAM only, no simulation) for the micro-batches its layer regions' KV SRAM holds, kv(n), and
estimates the cost per token as proportional to n / min(kv(n), F): the latency and F of every
count taken as n0's [U] (more wafers change the slot shapes, so both move by some percent). It
stops at the first count whose n / F is no less than the best estimate, since no larger
count can then be cheaper under the estimate.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import WseError
from ..workload.decode import ModelPlan
from ..workload.models import ModelSpec
from ..workload.params import DecodeParams
from .config import SystemConfig
from .wafers import SystemDecode, extra_in_flight_of, fill_depth, wafer_plans

MOST_WAFERS = 4096  # (as fewest_wafers)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One wafer count the search planned."""

    wafers: int
    slot: tuple[int, int]  # P x Q of its layer slots (the first wafer's)
    kv_in_flight: int  # micro-batches whose KV caches every layer region holds (0: it does not place)
    estimate: float  # relative cost per token: wafers / min(kv_in_flight, full depth); inf if it does not place


@dataclasses.dataclass
class WaferSearch:
    """What `--wafers cheapest` planned, and what it chose."""

    fewest: int
    full_depth: int  # F: micro-batches that fill the fewest count's pipeline (its simulation)
    candidates: list[Candidate]
    chosen: int

    def describe(self) -> str:
        pick = next(c for c in self.candidates if c.wafers == self.chosen)
        first = self.candidates[0]
        last = self.candidates[-1].wafers
        tail = "" if pick.wafers == first.wafers else (
            f"; the fewest, {first.wafers}, hold {first.kv_in_flight} ({first.estimate / pick.estimate:.2g}x the "
            f"estimated cost per token)")
        return (f"wafers: --wafers cheapest planned {first.wafers}..{last} and chose {pick.wafers} on "
                f"{pick.slot[0]}x{pick.slot[1]} slots, whose layer regions hold {pick.kv_in_flight} micro-batches' "
                f"KV caches where {self.full_depth} fill the pipeline (simulated on the fewest){tail}")

    def table(self) -> dict[str, np.ndarray]:
        c = self.candidates
        return {"wafers": np.array([x.wafers for x in c], dtype=np.int64),
                "slot_columns": np.array([x.slot[0] for x in c], dtype=np.int64),
                "slot_rows": np.array([x.slot[1] for x in c], dtype=np.int64),
                "kv_in_flight": np.array([x.kv_in_flight for x in c], dtype=np.int64),
                "relative_cost": np.array([x.estimate for x in c], dtype=np.float64),
                "chosen": np.array([x.wafers == self.chosen for x in c], dtype=bool)}


def full_depth(first: SystemDecode) -> int:
    """Micro-batches that fill a simulated chain's pipeline (as wafers.pipeline_depth counts them)."""
    return fill_depth(first.latency_s, first.bottleneck_s)


def kv_in_flight(plans: list[ModelPlan]) -> int:
    """Micro-batches whose KV caches every layer region of the plans holds."""
    return 1 + min(extra_in_flight_of(p) for p in plans)


def search(spec: ModelSpec, system: SystemConfig, params: DecodeParams, first: SystemDecode,
           most: int = MOST_WAFERS) -> WaferSearch:
    """The count of least estimated cost per token from `first`, the simulated fewest count
    (module docstring); counts that do not place are kept with kv_in_flight 0."""
    n0, F = first.wafers, full_depth(first)
    depth0 = 1 + min(s.extra_in_flight for s in first.steps)
    first_slot = (first.steps[0].slot, first.steps[0].slot_rows)
    found = [Candidate(n0, first_slot, depth0, n0 / min(depth0, F))]
    n = n0 + 1
    while n <= most and n / F < min(c.estimate for c in found):
        try:
            plans = wafer_plans(spec, system, params, n)
        except WseError:  # (a count may fail to place where a larger one places)
            found.append(Candidate(n, (0, 0), 0, math.inf))
        else:
            kv = kv_in_flight(plans)
            found.append(Candidate(n, (plans[0].P, plans[0].Q), kv, n / min(kv, F)))
        n += 1
    best = min(found, key=lambda c: (c.estimate, c.wafers))
    return WaferSearch(n0, F, found, best.wafers)
