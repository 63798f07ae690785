"""Engine driver: builds state, steps the Numba kernel in chunks, stops, reports stuck PEs."""
from __future__ import annotations

import time
from typing import Callable

import numba
import numpy as np

from .. import isa
from ..hardware import WaferConfig
from ..trace import Trace, validate
from . import kernels
from .result import EngineResult
from . import layout as L
from .state import MAX_CHUNK_CYCLES, N_CLASSES, N_OP_COUNTERS, Consts, Flat, State, build_state, flat

# Below this many PEs the serial kernel is used unless parallel stepping is forced.
PARALLEL_MIN_PES = 4096
# The parallel kernel steps PEs in contiguous blocks, this many per Numba thread.
BLOCKS_PER_THREAD = 4

ProgressFn = Callable[[int, int], None]  # (cycles simulated, max cycles)


def simulate(trace: Trace, cfg: WaferConfig, *, threads: int | None = None,
             parallel: bool | None = None, progress: ProgressFn | None = None,
             validated: bool = False) -> EngineResult:
    """Run a trace to completion (or deadlock / max_cycles) and return its counters.

    threads: Numba threads for the parallel kernel (default: all). parallel: force the
    parallel (True) or serial (False) kernel; by default meshes of PARALLEL_MIN_PES or more
    PEs step in parallel. Results are identical either way.
    """
    if not validated:
        validate(trace, cfg)
    S, C, ot = build_state(trace, cfg)
    F = flat(S, ot)
    P = trace.n_pes
    if parallel is None:
        parallel = P >= PARALLEL_MIN_PES and (threads is None or threads > 1)
    n_threads = threads if threads is not None else numba.config.NUMBA_NUM_THREADS
    kernel = kernels.run_cycles_parallel if parallel else kernels.run_cycles_serial
    n_blocks = BLOCKS_PER_THREAD * max(1, n_threads) if parallel else 1
    C = C._replace(blocks=np.linspace(0, P, n_blocks + 1).astype(np.int64))
    _call(kernel, 0, 0, -1, F, C, cfg)  # zero cycles: loads or compiles the kernel untimed
    t0 = time.perf_counter()
    previous_threads = numba.get_num_threads()
    if parallel:
        numba.set_num_threads(max(1, min(n_threads, numba.config.NUMBA_NUM_THREADS)))
    pe_cnt = np.zeros((P, isa.N_PE_COUNTERS), dtype=np.int64)
    link_cnt = np.zeros((P, isa.N_LINK_PORTS, isa.N_LINK_COUNTERS), dtype=np.int64)
    tx = S.rt[:, :, L.RT_TX].astype(np.int64)

    def fold() -> None:
        # the 32-bit per-chunk counters into the 64-bit totals
        pe_cnt[:, :N_CLASSES] += S.cyc.T
        S.cyc[:] = 0
        link_cnt[:] += np.moveaxis(S.link_acc, 0, 2)
        S.link_acc[:] = 0
        grants = S.q[:, :, L.Q_GRANTS].astype(np.int64)
        for port in range(isa.N_LINK_PORTS):
            link_cnt[:, port, isa.L_WAVELETS] += (grants * (tx >> port & 1)).sum(axis=1)
        S.q[:, :, L.Q_GRANTS] = 0

    try:
        total, stop = _step(kernel, S, C, F, cfg, progress, fold)
    finally:
        numba.set_num_threads(previous_threads)
    pe_cnt[:, isa.C_FLOPS:isa.C_OPS + 1] = (S.acc + _in_progress(S, ot)).T
    pe_cnt[:, isa.C_FINISH] = S.finish
    pe_cnt[:, isa.C_PEAK_QUEUE] = S.pe[:, L.PE_PEAK]
    wall = time.perf_counter() - t0
    H, W = trace.mesh_height, trace.mesh_width
    stuck = [] if stop == isa.STOP_COMPLETE else stuck_report(trace, S, ot)
    return EngineResult(
        total_cycles=total, stop=stop,
        pe_counters=pe_cnt.reshape(H, W, isa.N_PE_COUNTERS),
        link_counters=link_cnt.reshape(H, W, isa.N_LINK_PORTS, isa.N_LINK_COUNTERS),
        stuck=stuck, wall_seconds=wall, threads=n_threads if parallel else 1,
    )


def _step(kernel, S: State, C: Consts, F: Flat, cfg: WaferConfig,
          progress: ProgressFn | None, fold: Callable[[], None]) -> tuple[int, int]:
    """Call the kernel in chunks sized to about a quarter second each."""
    if int(S.pe[:, L.PE_LIVE].sum()) == 0:
        return 0, isa.STOP_COMPLETE
    t, last_progress, chunk = 0, -1, 64
    max_cycles = cfg.max_cycles
    while True:
        t_stop = min(t + min(chunk, MAX_CHUNK_CYCLES), max_cycles)
        c0 = time.perf_counter()
        t, stop, last_progress = _call(kernel, t, t_stop, last_progress, F, C, cfg)
        dt = time.perf_counter() - c0
        fold()
        if progress is not None:
            progress(t, max_cycles)
        if stop != kernels.RUNNING:
            return t, stop
        if t >= max_cycles:
            return t, isa.STOP_MAX_CYCLES
        chunk = int(min(max(chunk * min(4.0, 0.25 / max(dt, 1e-6)), 16), 1 << 24))


def _in_progress(S: State, ot: np.ndarray) -> np.ndarray:
    """Per-op counters [N_OP_COUNTERS, P] of the finished elements of ops still in progress.

    The kernel counts an op's elements when it completes; a run that stops early adds these.
    """
    out = np.zeros((N_OP_COUNTERS, S.th.shape[0]), dtype=np.int64)
    live = (S.th[:, :, L.TH_CTRL] & L.CTRL_CODE) != L.CODE_DONE
    if not live.any() or not len(ot):
        return out
    row = ot[np.where(live, S.th[:, :, L.TH_OP], 0)]
    n = np.where(live, row[:, :, L.OT_LENGTH] - S.th[:, :, L.TH_LEFT], 0)
    for a, col in ((L.A_FLOPS, L.OT_FLOPS), (L.A_SRAM_READ, L.OT_RBYTES), (L.A_SRAM_WRITE, L.OT_WBYTES),
                   (L.A_SENT, L.OT_SEND), (L.A_RECEIVED, L.OT_RECV)):
        out[a] = (n * row[:, :, col]).sum(axis=1)
    return out


def _call(kernel, t: int, t_stop: int, last_progress: int, F: Flat, C: Consts,
          cfg: WaferConfig) -> tuple[int, int, int]:
    return kernel(t, t_stop, last_progress, cfg.watchdog_cycles, F, C.blocks, C.mesh_width, C.n_routes,
                  C.n_threads, C.n_colors, C.depth, C.link_capacity, C.hop_latency, C.ramp_latency,
                  C.read_ports, C.write_ports)


def stuck_report(trace: Trace, S: State, ot: np.ndarray, limit: int = 20) -> list[str]:
    """Human-readable lines naming unfinished threads and queues that still hold wavelets."""
    W = trace.mesh_width
    lines: list[str] = []
    for p in np.nonzero(S.pe[:, L.PE_LIVE])[0]:
        for h in range(S.th.shape[1]):
            rec = S.th[p, h]
            if rec[L.TH_CTRL] & L.CTRL_CODE != L.CODE_DONE:
                lines.append(f"PE ({p % W}, {p // W}) thread {h}: {_waiting_on(trace, S, ot, int(p), rec)}")
    colors = np.full(S.q.shape[:2], -1, dtype=np.int64)
    pp, cc = np.nonzero(S.color_slot >= 0)
    colors[pp, S.color_slot[pp, cc]] = cc
    for p, k in zip(*np.nonzero((S.q[:, :, L.Q_OCC] > 0) | (S.q[:, :, L.CQ_OCC] > 0))):
        where = f"PE ({p % W}, {p // W}) color {colors[p, k]}"
        if S.q[p, k, L.Q_OCC]:
            lines.append(f"{where}: {S.q[p, k, L.Q_OCC]} wavelet(s) in the router queue")
        if S.q[p, k, L.CQ_OCC]:
            lines.append(f"{where}: {S.q[p, k, L.CQ_OCC]} wavelet(s) not taken by the CE")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def _waiting_on(trace: Trace, S: State, ot: np.ndarray, p: int, rec: np.ndarray) -> str:
    op = int(rec[L.TH_OP])
    row = ot[op]
    desc = f"op {op - int(trace.prog_start[np.searchsorted(trace.prog_start, op, 'right') - 1])} " \
           f"({trace.op(op).describe()})"
    if rec[L.TH_SETUP] > 0:
        return f"{desc} in setup"
    if row[L.OT_CODE] == isa.OP_WAIT:
        sem = trace.op(op).sem
        return f"{desc} waits on semaphore {sem} (value {S.sem[p, sem]})"
    if row[L.OT_RECV] and S.q[p, rec[L.TH_IN], L.CQ_READY] == 0:
        return f"{desc} waits for wavelets on color {row[L.OT_CIN]} ({rec[L.TH_LEFT]} elements left)"
    if row[L.OT_SEND]:
        return f"{desc} blocked sending on color {row[L.OT_COUT]} (queue full)"
    return f"{desc} with {rec[L.TH_LEFT]} elements left"
