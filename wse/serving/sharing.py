"""Micro-batches sharing a wafer's regions, simulated cycle by cycle (docs/serving.md, "Several
micro-batches in the pipeline").

The serving pipeline (sim.Tandem) lets each region hold one micro-batch at a time, from the
hand-off it receives to the hand-off it makes: the composed stage simulations' anchors. On the
fabric nothing stops a region's PEs that have finished one micro-batch from starting the next
while the region's other PEs still drain the last, nor the hand-offs of two micro-batches from
contending for the same lanes. Here a wafer's whole decode step is simulated with m
micro-batches passing its regions back to back (every program repeated m times) and compared
with the tandem over the same regions' hold times.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import WseError
from ..trace import Trace


def repeated(t: Trace, times: int) -> Trace:
    """The trace run `times` times back to back: every program's ops repeated, routes unchanged.
    A decode step's trace repeated is that many micro-batches passing its regions one after
    another, each region starting the next as soon as its own program has finished the last (the
    first region's input always ready)."""
    if times < 1:
        raise WseError(f"a trace repeated {times} times")
    idx = np.concatenate([np.tile(np.arange(s, s + n, dtype=np.int64), times)
                          for s, n in zip(t.prog_start.tolist(), t.prog_len.tolist())] or [np.zeros(0, np.int64)])
    lens = (t.prog_len.astype(np.int64) * times).astype(np.int32)
    starts = (np.cumsum(lens, dtype=np.int64) - lens).astype(np.int32)
    return dataclasses.replace(t, ops={k: v[idx] for k, v in t.ops.items()}, prog_start=starts, prog_len=lens,
                               meta={**t.meta, "repeated": str(times)}, tags=list(t.tags))


@dataclasses.dataclass
class SharingCheck:
    """m micro-batches through one wafer's decode step: simulated against the tandem's figure."""

    wafer: int
    micro_batches: int
    single_cycles: int  # one micro-batch, simulated (equals the composed step)
    simulated_cycles: int  # m micro-batches back to back, simulated
    tandem_cycles: int  # the same from the regions' hold times (sim.Tandem, all ready at once)
    busiest_hold_cycles: int

    @property
    def error(self) -> float:
        """The tandem's figure over the simulated one, minus 1 (> 0: the tandem is slower)."""
        return self.tandem_cycles / self.simulated_cycles - 1

    @property
    def period_cycles(self) -> float:
        """Simulated cycles per further micro-batch (the tandem's: the busiest hold)."""
        return (self.simulated_cycles - self.single_cycles) / max(self.micro_batches - 1, 1)


def tandem_cycles(holds: list[int], m: int) -> int:
    """When the m-th of m identical items, all ready at 0, leaves a chain of stages holding each
    for `holds` cycles (sim.Tandem; in closed form sum(holds) + (m - 1) max(holds))."""
    from .sim import Tandem
    line = Tandem(len(holds))
    h = np.asarray(holds, dtype=float)
    out = 0.0
    for _ in range(m):
        out = line.enter(0.0, h, 0.0)
    return int(round(out))


def check_sharing(plans: list, holds: list[list[int]], simulate, m: int) -> SharingCheck:
    """Simulate the wafer whose busiest region sets the pipeline's period (the busiest among the
    wafers whose step starts at a layer boundary: a leading part's stand-in needs its delta) with
    m micro-batches back to back; `holds` are each wafer's composed region hold times."""
    from ..workload.chain import chain_of
    from ..workload.stages import full_trace
    if m < 2:
        raise WseError(f"--sharing-check {m}: at least 2 micro-batches")
    whole = [w for w, p in enumerate(plans) if chain_of(p).standin is None]
    if not whole:
        raise WseError("--sharing-check: every wafer continues a layer cut at its experts; not simulated")
    w = max(whole, key=lambda i: max(holds[i]))
    trace, _ = full_trace(plans[w])
    one = simulate(trace).total_cycles
    many = simulate(repeated(trace, m)).total_cycles
    return SharingCheck(w, m, int(one), int(many), tandem_cycles(holds[w], m), int(max(holds[w])))
