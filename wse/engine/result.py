"""What an engine run returns: the counters, the cycle count and why it stopped."""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import isa


@dataclasses.dataclass
class EngineResult:
    """Counters of one run. Both engines (Numba and reference) return this."""

    total_cycles: int
    stop: int  # isa.STOP_*
    # int64, or the narrowest signed integer type that holds the values where the result came
    # from another process or the stage cache (narrowed()); pe(), link() and idle_cycles() give
    # int64 either way
    pe_counters: np.ndarray  # [H, W, isa.N_PE_COUNTERS]
    link_counters: np.ndarray  # [H, W, 4, isa.N_LINK_COUNTERS]
    stuck: list[str] = dataclasses.field(default_factory=list)  # deadlock / max-cycles report
    wall_seconds: float = 0.0
    threads: int = 1
    timeline: dict[str, np.ndarray] | None = None  # sampled activity (engine/run.py _Timeline)
    ops: dict[str, np.ndarray] | None = None  # per-tag table of completed ops
    events: dict[str, np.ndarray] | None = None  # op timelines of sampled PEs
    # engine work (exact skipping, docs/model.md): PE-cycles stepped on the full path, cycles
    # the kernel stepped, cycles it jumped over because every PE was quiet
    stepped_pe_cycles: int = 0
    stepped_cycles: int = 0
    jumped_cycles: int = 0
    # functional runs: every PE's SRAM bytes at the end (uint8 [P, bytes]); None: timing only
    sram: np.ndarray | None = None
    raced: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # PEs whose values raced

    @property
    def complete(self) -> bool:
        return self.stop == isa.STOP_COMPLETE

    @property
    def stop_name(self) -> str:
        return isa.STOP_NAMES[self.stop]

    def pe(self, name: str) -> np.ndarray:
        """One per-PE counter as an [H, W] int64 array."""
        return self.pe_counters[:, :, isa.PE_COUNTER_NAMES.index(name)].astype(np.int64, copy=False)

    def link(self, name: str) -> np.ndarray:
        """One per-link counter as an [H, W, 4] int64 array (ports north, south, east, west)."""
        return self.link_counters[:, :, :, isa.LINK_COUNTER_NAMES.index(name)].astype(np.int64, copy=False)

    def idle_cycles(self) -> np.ndarray:
        """Per PE: cycles in none of the busy / setup / stall classes."""
        classes = self.pe_counters[:, :, isa.C_BUSY:isa.C_STALL_SYNC + 1].sum(axis=2, dtype=np.int64)
        return self.total_cycles - classes

    def narrowed(self) -> "EngineResult":
        """The same result with its counters in the narrowest integer types that hold them: what
        a pool worker sends back (a group stage's 75 MB of int64 counters are 19 MB so) and the
        stage cache stores."""
        return dataclasses.replace(self, pe_counters=narrowest(self.pe_counters),
                                   link_counters=narrowest(self.link_counters))


def narrowest(a: np.ndarray) -> np.ndarray:
    """An integer array in the narrowest signed integer type that holds its values (a itself
    where none is narrower)."""
    if a.dtype.kind not in "iu" or a.size == 0:
        return a
    lo, hi = int(a.min()), int(a.max())
    for dt in (np.int8, np.int16, np.int32):
        if np.dtype(dt).itemsize < a.dtype.itemsize and np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return a.astype(dt)
    return a
