"""Engine driver: builds state, steps the Numba kernel in chunks, samples a timeline, stops,
attributes results to the trace's tags, and reports stuck PEs."""
from __future__ import annotations

import signal
import threading
import time
from typing import Callable

import numba
import numpy as np

from .. import isa
from ..hardware import WaferConfig
from ..op_codes import row_codes
from ..runs import positions
from ..trace import Trace
from ..trace_check import validate
from . import accounting, kernels
from . import layout as L
from .result import EngineResult
from .state import (MAX_CHUNK_CYCLES, N_OP_COUNTERS, State, build_state, flat, release_buffer,
                    make_ins, make_tiles, slot_owners)

# Below this many PEs the serial kernel is used unless parallel stepping is forced.
PARALLEL_MIN_PES = 4096
# The kernels step PEs in tiles of TILE_ROWS x TILE_COLS (a tile with nothing to do costs a few
# loads; rows stream through memory best), dealt in runs of consecutive tiles round-robin to
# GROUPS_PER_THREAD groups per Numba thread in the parallel kernel: each thread then gets tiles
# from all over the mesh, busy regions and quiet ones alike. A big mesh has about RUNS_PER_GROUP
# runs per group, each long enough to stream; a small one deals single tiles.
TILE_ROWS = 1
TILE_COLS = 128
GROUPS_PER_THREAD = 8
RUNS_PER_GROUP = 32
# Timeline: first sampling interval and the most samples kept (intervals double beyond it).
TIMELINE_START_CYCLES = 64
TIMELINE_MAX_SAMPLES = 1024
# A coarse timeline for stage simulations (composed steps use their counters, not the timeline):
# every sample ends a kernel call with a fold, which a fine timeline pays ~175 times per 11k cycles.
STAGE_TIMELINE = (1024, 16)
# Decode stages are sparse (lanes, diagonals, a few busy regions): stepped on one thread they run
# 17-22% faster in 8 x 8 tiles than in rows of 128, which suit dense traffic (27% slower in 8 x 8);
# measured on the VM, docs/performance.md. Results never depend on the tile shape.
STAGE_TILE_SERIAL = (8, 8)

# Op timelines are recorded for this many sampled PEs, at most this many ops each.
TRACED_PES = 16
MAX_EVENTS = 4096
# Sleeping CEs in a stall are counted when they wake or in a full fold; a full fold at least this
# often keeps the 32-bit per-chunk cycle counters they are added to from overflowing.
FULL_FOLD_CYCLES = 1 << 29

ProgressFn = Callable[[int, float], None]  # (cycles simulated, fraction of ops completed)
SnapshotFn = Callable[[EngineResult], None]


def stage_options(threads: int | None) -> dict:
    """simulate() options for a decode stage simulation on `threads` Numba threads."""
    return {"timeline": STAGE_TIMELINE, "tile": STAGE_TILE_SERIAL if threads == 1 else None}


def simulate(trace: Trace, cfg: WaferConfig, *, threads: int | None = None,
             parallel: bool | None = None, progress: ProgressFn | None = None,
             validated: bool = False, snapshot: SnapshotFn | None = None,
             snapshot_seconds: float = 30.0, dense: bool = False,
             tile: tuple[int, int] | None = None,
             timeline: tuple[int, int] = (TIMELINE_START_CYCLES, TIMELINE_MAX_SAMPLES),
             functional: bool = False, sram: np.ndarray | None = None) -> EngineResult:
    """Run a trace to completion (or deadlock / max_cycles) and return its counters.

    threads: Numba threads for the parallel kernel (default: numba.get_num_threads(), all cores
    unless lowered with numba.set_num_threads). parallel: force the
    parallel (True) or serial (False) kernel; by default meshes of PARALLEL_MIN_PES or more
    PEs step in parallel. Results are identical either way. `progress` is called after every
    chunk. `snapshot` is called with the measurements so far (stop "running") every
    `snapshot_seconds` of wall time; Ctrl-C ends the run early and returns them (stop
    "interrupted"). dense=True steps every PE every cycle (no exact skipping): same results,
    slower; tests compare the two. tile: (rows, cols) of the PE tiles whose activity the
    kernels track (default TILE_ROWS x TILE_COLS); results do not depend on it. timeline: the
    activity timeline's first sampling interval in cycles and the most samples it keeps (each
    sample ends a kernel call; STAGE_TIMELINE for simulations whose timeline nobody plots); every
    counter is the same whatever it is. functional: a completed run also computes values
    (engine/functional.py) from the initial SRAM bytes `sram` (uint8 [P, bytes]; default zeros)
    and returns every PE's SRAM at the end in `sram`, with the PEs whose values raced in `raced`;
    the counters are the timing run's.
    """
    if not validated:
        validate(trace, cfg)
    res = _Run(trace, cfg, threads, parallel, not dense, tile, timeline).run(progress, snapshot, snapshot_seconds)
    if functional and res.complete:
        from .functional import evaluate
        v = evaluate(trace, sram)
        res.sram, res.raced = v.sram, v.raced
    return res


class _Run:
    """One simulation: engine state, 64-bit totals, the timeline and the tag statistics."""

    def __init__(self, trace: Trace, cfg: WaferConfig, threads: int | None, parallel: bool | None, skip: bool,
                 tile: tuple[int, int] | None = None,
                 timeline: tuple[int, int] = (TIMELINE_START_CYCLES, TIMELINE_MAX_SAMPLES)):
        self.trace, self.cfg, self.skip = trace, cfg, skip
        S, C, ot, omap = build_state(trace, cfg)
        self.S, self.ot, self.omap, self.F = S, ot, omap, flat(S, ot, omap)
        P = self.P = trace.n_pes
        # default: the Numba threads in force (numba.set_num_threads lowers it, e.g. for test
        # workers sharing the cores: a parallel kernel's per-cycle barrier on oversubscribed
        # cores waits for descheduled threads)
        self.n_threads = threads if threads is not None else numba.get_num_threads()
        if parallel is None:
            parallel = P >= PARALLEL_MIN_PES and self.n_threads > 1
        self.parallel = parallel
        self.kernel = kernels.run_cycles_parallel if parallel else kernels.run_cycles_serial
        self.n_groups = GROUPS_PER_THREAD * max(1, self.n_threads) if parallel else 1
        self.C = C
        rows, cols = tile or (TILE_ROWS, TILE_COLS)
        n_tiles = -(-trace.mesh_width // cols) * -(-trace.mesh_height // rows)
        run = max(1, n_tiles // (self.n_groups * RUNS_PER_GROUP))
        self.A = make_tiles(S, trace.mesh_width, trace.mesh_height, rows, cols, run)
        self.n_tags = len(trace.tags)
        self.traced = sample_pes(trace, TRACED_PES)
        S.pe[self.traced, L.PE_TRACE] = np.arange(len(self.traced))
        self.I = make_ins(P, trace.threads, self.n_groups, self.n_tags, len(self.traced), MAX_EVENTS)
        self.pe_cnt = np.zeros((P, isa.N_PE_COUNTERS), dtype=np.int64)
        self.link_cnt = np.zeros((P, isa.N_LINK_PORTS, isa.N_LINK_COUNTERS), dtype=np.int64)
        self.full_at = 0  # cycle of the last full fold
        self.classes = _class_tags(trace)
        self.region_names, self.region_of = pe_regions(trace, self.classes)
        self.region_busy = np.zeros(len(self.region_names), dtype=np.int64)  # busy PE-cycles so far
        self.timeline = _Timeline(len(self.region_names), *timeline)
        self.t = 0
        pp = trace.pe_program[trace.pe_program >= 0]
        self.total_ops = int(trace.prog_len[pp].astype(np.int64).sum()) if len(pp) else 0

    def call(self, t: int, t_stop: int, last_progress: int) -> tuple[int, int, int]:
        C, cfg = self.C, self.cfg
        return self.kernel(t, t_stop, last_progress, cfg.watchdog_cycles, self.F, self.I, self.A, self.n_tags,
                           MAX_EVENTS, self.n_groups, C.mesh_width, C.n_threads, C.n_colors, C.depth, C.link_capacity,
                           C.hop_latency, C.ramp_latency, C.read_ports, C.write_ports, self.skip)

    def fold(self, full: bool) -> None:
        """The 32-bit per-chunk counters into the 64-bit totals and the tiles' timeline figures
        up to date (sleeping CEs accounted as if they had been stepped: all of them when full,
        else those whose busy cycles the timeline counts; they stay asleep)."""
        accounting.fold(self.t, self.F, self.I, self.A, self.n_tags, MAX_EVENTS, self.C.n_threads, self.C.n_colors,
                        self.pe_cnt, self.link_cnt, self.region_of, self.region_busy, full)
        if full:
            self.full_at = self.t

    def op_counters(self) -> np.ndarray:
        """[N_OP_COUNTERS, P]: completed ops' counters plus the finished part of ops in progress."""
        return self.S.acc + _in_progress(self.S, self.ot, self.omap)

    def sample(self) -> None:
        flops, in_flight = accounting.totals(self.A)
        self.timeline.add(self.t, self.region_busy, int(flops), int(in_flight))

    def run(self, progress: ProgressFn | None, snapshot: SnapshotFn | None, snapshot_seconds: float) -> EngineResult:
        self.call(0, 0, -1)  # zero cycles: loads or compiles the kernel untimed
        t0 = time.perf_counter()
        previous_threads = numba.get_num_threads()
        if self.parallel:
            numba.set_num_threads(max(1, min(self.n_threads, numba.config.NUMBA_NUM_THREADS)))
        self.sample()
        # Ctrl-C sets a flag that the chunk loop checks (the run then ends at a chunk boundary,
        # never inside a kernel call or a snapshot write); a second Ctrl-C interrupts at once
        self.interrupted = False
        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                if self.interrupted:
                    raise KeyboardInterrupt
                self.interrupted = True
            previous_handler = signal.signal(signal.SIGINT, on_sigint)
        try:
            stop = self._step(progress, snapshot, snapshot_seconds, t0)
        except KeyboardInterrupt:  # a second Ctrl-C
            stop = isa.STOP_INTERRUPTED
        finally:
            numba.set_num_threads(previous_threads)
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        if self.full_at != self.t:  # an interrupt can come between a chunk and its full fold
            self.fold(full=True)
        res = self.result(stop, time.perf_counter() - t0, final=True)
        release_buffer(self.S)  # the result holds copies: the next run here reuses the memory
        self.S = self.F = None
        return res

    def _step(self, progress, snapshot, snapshot_seconds: float, t0: float) -> int:
        """Call the kernel in chunks (about a quarter second each) that end on sample points."""
        if int(self.S.pe[:, L.PE_LIVE].sum()) == 0:
            return isa.STOP_COMPLETE
        last_progress, chunk = -1, 64
        max_cycles = self.cfg.max_cycles
        last_snapshot = time.perf_counter()
        while True:
            t_stop = min(self.t + min(chunk, MAX_CHUNK_CYCLES), max_cycles, self.timeline.next_sample(self.t))
            c0 = time.perf_counter()
            t, stop, last_progress = self.call(self.t, t_stop, last_progress)
            self.t = t
            dt = time.perf_counter() - c0
            snap_due = snapshot is not None and time.perf_counter() - last_snapshot >= snapshot_seconds
            self.fold(full=stop != kernels.RUNNING or self.t >= max_cycles or self.interrupted or snap_due
                      or self.t - self.full_at >= FULL_FOLD_CYCLES)
            if (self.t >= self.timeline.next_sample(self.t - 1) or stop != kernels.RUNNING or self.t >= max_cycles
                    or self.interrupted):  # a run's last, partial interval is sampled too
                self.sample()
            if progress is not None:
                done = int(self.S.acc[L.A_OPS].sum())
                progress(self.t, done / self.total_ops if self.total_ops else 1.0)
            if stop != kernels.RUNNING:
                return stop
            if self.t >= max_cycles:
                return isa.STOP_MAX_CYCLES
            if self.interrupted:
                return isa.STOP_INTERRUPTED
            if snap_due:
                snapshot(self.result(isa.STOP_RUNNING, time.perf_counter() - t0))
                last_snapshot = time.perf_counter()
            chunk = int(min(max(chunk * min(4.0, 0.25 / max(dt, 1e-6)), 16), 1 << 24))

    def result(self, stop: int, wall: float, final: bool = False) -> EngineResult:
        """The measurements so far; final: the run's last, which takes the 64-bit totals
        themselves instead of copies (a group stage's are ~45 MB; nothing counts into them after)."""
        S, trace = self.S, self.trace
        H, W = trace.mesh_height, trace.mesh_width
        pe_cnt = self.pe_cnt if final else self.pe_cnt.copy()
        pe_cnt[:, isa.C_FLOPS:isa.C_OPS + 1] = self.op_counters().T
        pe_cnt[:, isa.C_FINISH] = S.finish
        pe_cnt[:, isa.C_PEAK_QUEUE] = S.pe[:, L.PE_PEAK]
        stuck = [] if stop == isa.STOP_COMPLETE else stuck_report(trace, S, self.ot, self.omap)
        return EngineResult(
            total_cycles=self.t, stop=stop,
            pe_counters=pe_cnt.reshape(H, W, isa.N_PE_COUNTERS),
            link_counters=self.link_cnt.reshape(H, W, isa.N_LINK_PORTS, isa.N_LINK_COUNTERS)
            if final else self.link_cnt.reshape(H, W, isa.N_LINK_PORTS, isa.N_LINK_COUNTERS).copy(),
            stuck=stuck, wall_seconds=wall, threads=self.n_threads if self.parallel else 1,
            timeline=self.timeline.arrays(self.region_names), ops=self.ops_table(), events=self.event_log(),
            stepped_pe_cycles=int(self.I.work[0]), stepped_cycles=int(self.I.work[1]), jumped_cycles=int(self.I.work[2]))

    def ops_table(self) -> dict[str, np.ndarray]:
        """Columnar per-tag table: time span, ops, PEs, FLOPs, bytes, wavelets (completed ops)."""
        st = self.I.tagstat.reshape(-1, self.n_tags, L.TS_FIELDS)
        first = st[:, :, L.TS_FIRST].min(axis=0)
        last = st[:, :, L.TS_LAST].max(axis=0)
        sums = st.sum(axis=0)
        pes = tag_pe_counts(self.trace, self.classes)
        keep = [k for k in range(self.n_tags) if sums[k, L.TS_OPS] > 0]
        tags = self.trace.tags
        return {
            "tag": np.array(keep, dtype=np.int64),
            "name": np.array([tags[k].name for k in keep], dtype=object),
            "layer": np.array([tags[k].layer for k in keep], dtype=np.int64),
            "kind": np.array([tags[k].kind for k in keep], dtype=object),
            "start_cycle": first[keep].astype(np.int64),
            "end_cycle": last[keep].astype(np.int64),
            "ops": sums[keep, L.TS_OPS],
            "pes": pes[keep],
            "flops": sums[keep, L.TS_FLOPS],
            "sram_bytes": sums[keep, L.TS_BYTES],
            "wavelets": sums[keep, L.TS_WAVELETS],
        }

    def event_log(self) -> dict[str, np.ndarray]:
        """Op timelines of the sampled PEs: one row per completed op."""
        ev = self.I.events.reshape(-1, MAX_EVENTS, L.EVENT_FIELDS)
        rows = []
        W = self.trace.mesh_width
        for s, p in enumerate(self.traced):
            n = int(min(self.I.ev_count[s], MAX_EVENTS))
            for op, thread, start, end in ev[s, :n]:
                rows.append((p % W, p // W, thread, op, start, end))
        a = np.array(rows, dtype=np.int64).reshape(-1, 6)
        tag = self.trace.ops["tag"][a[:, 3]] if len(a) else np.zeros(0, np.int64)
        return {"x": a[:, 0], "y": a[:, 1], "thread": a[:, 2], "op": a[:, 3], "tag": tag.astype(np.int64),
                "start_cycle": a[:, 4], "end_cycle": a[:, 5]}


class _Timeline:
    """Samples taken at interval ends; intervals double (merging pairs) beyond the maximum."""

    def __init__(self, n_regions: int, start_cycles: int = TIMELINE_START_CYCLES,
                 max_samples: int = TIMELINE_MAX_SAMPLES):
        if start_cycles < 1 or max_samples < 2:
            raise ValueError(f"timeline ({start_cycles}, {max_samples}): an interval of 1 cycle or more and "
                             "2 samples or more")
        self.interval, self.max_samples = start_cycles, max_samples
        self.cycle: list[int] = []
        self.busy: list[float] = []
        self.flops: list[int] = []
        self.in_flight: list[int] = []
        self.regions: list[np.ndarray] = []
        self.n_regions = n_regions
        self._prev_busy: np.ndarray | None = None
        self._prev_flops = 0

    def next_sample(self, t: int) -> int:
        return (t // self.interval + 1) * self.interval

    def add(self, t: int, region_busy: np.ndarray, total_flops: int, in_flight: int) -> None:
        """A sample at cycle t from the running totals (busy PE-cycles per region, FLOPs)."""
        if self._prev_busy is None:  # the state at cycle 0
            self._prev_busy, self._prev_flops = region_busy.copy(), total_flops
            return
        if self.cycle and t <= self.cycle[-1]:
            return
        d_busy = region_busy - self._prev_busy
        self.cycle.append(t)
        self.busy.append(int(d_busy.sum()))
        self.flops.append(total_flops - self._prev_flops)
        self.in_flight.append(in_flight)
        self.regions.append(d_busy)
        self._prev_busy, self._prev_flops = region_busy.copy(), total_flops
        if len(self.cycle) > self.max_samples:
            self._merge()

    def _merge(self) -> None:
        """Double the interval: pairs of intervals become one (sums add; in-flight is the later)."""
        self.interval *= 2
        keep = [i for i in range(len(self.cycle)) if self.cycle[i] % self.interval == 0 or i == len(self.cycle) - 1]
        cyc, busy, flops, infl, reg = [], [], [], [], []
        acc_b, acc_f, acc_r = 0, 0, np.zeros(self.n_regions, np.int64)
        for i in range(len(self.cycle)):
            acc_b += self.busy[i]
            acc_f += self.flops[i]
            acc_r = acc_r + self.regions[i]
            if i in keep:
                cyc.append(self.cycle[i]); busy.append(acc_b); flops.append(acc_f)  # noqa: E702
                infl.append(self.in_flight[i]); reg.append(acc_r)  # noqa: E702
                acc_b, acc_f, acc_r = 0, 0, np.zeros(self.n_regions, np.int64)
        self.cycle, self.busy, self.flops, self.in_flight, self.regions = cyc, busy, flops, infl, reg

    def arrays(self, region_names: list[str]) -> dict[str, np.ndarray]:
        n = len(self.cycle)
        return {
            "cycle": np.array(self.cycle, dtype=np.int64),
            "busy_pe_cycles": np.array(self.busy, dtype=np.int64),
            "flops": np.array(self.flops, dtype=np.int64),
            "wavelets_in_flight": np.array(self.in_flight, dtype=np.int64),
            "region_busy_pe_cycles": np.array(self.regions, dtype=np.int64).reshape(n, self.n_regions),
            "region_names": np.array(region_names, dtype=object),
        }


def sample_pes(trace: Trace, n: int) -> np.ndarray:
    """PEs whose op timelines are recorded: up to n PEs with programs, spread over the mesh."""
    has = np.nonzero((trace.pe_program >= 0).any(axis=2).reshape(-1))[0]
    if len(has) <= n:
        return has
    return has[np.linspace(0, len(has) - 1, n).round().astype(np.int64)]


def _pe_program_classes(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """The distinct per-PE program rows (one program id or -1 per thread) and each PE's row."""
    rows = trace.pe_program.reshape(trace.n_pes, trace.threads)
    _, first, inverse = np.unique(row_codes(list(rows.T)), return_index=True, return_inverse=True)
    return rows[first], inverse.reshape(-1)


def _expand(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The indices start .. start + count - 1 of every (start, count) pair, one run after another."""
    return np.repeat(starts, counts) + positions(counts)


def _class_tags(trace: Trace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PE classes (distinct per-PE program rows) and their tags: (each PE's class, PEs per class,
    class, tag) with one (class, tag) pair for each tag some op of the class's programs carries."""
    uniq, inverse = _pe_program_classes(trace)
    weight = np.bincount(inverse, minlength=len(uniq)).astype(np.int64)
    n_tags = max(1, len(trace.tags))
    cls, thread_pid = np.nonzero(uniq >= 0)
    pid = uniq[cls, thread_pid].astype(np.int64)
    used = np.unique(pid)
    lens = trace.prog_len[used].astype(np.int64)
    op_tags = trace.ops["tag"][_expand(trace.prog_start[used].astype(np.int64), lens)].astype(np.int64)
    codes = np.repeat(np.arange(len(used), dtype=np.int64), lens) * n_tags + op_tags
    keep = np.ones(len(codes), dtype=bool)  # (a program's ops come in runs of one tag)
    keep[1:] = codes[1:] != codes[:-1]
    pairs = np.unique(codes[keep])
    p_prog, p_tag = pairs // n_tags, pairs % n_tags  # (program's index in used, tag), sorted
    p_start = np.searchsorted(p_prog, np.arange(len(used)))
    p_count = np.bincount(p_prog, minlength=len(used))
    k = np.searchsorted(used, pid)
    sel = _expand(p_start[k], p_count[k])
    codes = np.unique(np.repeat(cls.astype(np.int64), p_count[k]) * n_tags + p_tag[sel])
    return inverse, weight, codes // n_tags, codes % n_tags


ClassTags = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def tag_pe_counts(trace: Trace, classes: ClassTags | None = None) -> np.ndarray:
    """Per tag: the number of PEs whose programs contain an op with that tag (classes: the
    trace's _class_tags, if known)."""
    _, weight, cls, tag = classes if classes is not None else _class_tags(trace)
    out = np.zeros(len(trace.tags), dtype=np.int64)
    np.add.at(out, tag, weight[cls])
    return out


def pe_regions(trace: Trace, classes: ClassTags | None = None) -> tuple[list[str], np.ndarray]:
    """A region label per PE from its ops' tags: "layer L" for layer ops, else the tag's name
    (the first in name order), else "idle"; labels numbered in the order of their first class."""
    inverse, weight, cls, tag = classes if classes is not None else _class_tags(trace)
    n_cls = len(weight)
    tags = trace.tags
    layer = np.array([tg.layer for tg in tags], dtype=np.int64)
    distinct = sorted({tg.name for tg in tags})  # (tags may share a name)
    at = {name: i for i, name in enumerate(distinct)}
    rank = np.array([at[tg.name] for tg in tags], dtype=np.int64)
    big = np.int64(1) << 40
    lowest_layer = np.full(n_cls, big)
    lay = layer[tag] >= 0
    np.minimum.at(lowest_layer, cls[lay], layer[tag[lay]])
    first_name = np.full(n_cls, big)
    named = tag != 0
    np.minimum.at(first_name, cls[named], rank[tag[named]])
    # one key per class: its lowest layer, else big + its first name's rank, else idle
    key = np.where(lowest_layer < big, lowest_layer, np.where(first_name < big, big + first_name, 2 * big))
    keys, first, label = np.unique(key, return_index=True, return_inverse=True)
    names: list[str] = []
    index: dict[str, int] = {}
    renumber = np.empty(len(keys), dtype=np.int64)
    for j in np.argsort(first, kind="stable"):  # keys in the order of their first class
        kv = int(keys[j])
        name = f"layer {kv}" if kv < big else distinct[kv - big] if kv < 2 * big else "idle"
        if name not in index:  # (a tag may be named like a layer)
            index[name] = len(names)
            names.append(name)
        renumber[j] = index[name]
    return names, renumber[label.reshape(-1)][inverse]


def _in_progress(S: State, ot: np.ndarray, omap: np.ndarray) -> np.ndarray:
    """Per-op counters [N_OP_COUNTERS, P] of the finished elements of ops still in progress.

    The kernel counts an op's elements when it completes; a run that stops early adds these.
    """
    out = np.zeros((N_OP_COUNTERS, S.th.shape[0]), dtype=np.int64)
    live = (S.th[:, :, L.TH_CTRL] & L.CTRL_CODE) != L.CODE_DONE
    if not live.any() or not len(ot):
        return out
    row = ot[omap[np.where(live, S.th[:, :, L.TH_OP], 0)]]
    n = np.where(live, row[:, :, L.OT_LENGTH] - S.th[:, :, L.TH_LEFT], 0)
    for a, col in ((L.A_FLOPS, L.OT_FLOPS), (L.A_SRAM_READ, L.OT_RBYTES), (L.A_SRAM_WRITE, L.OT_WBYTES),
                   (L.A_SENT, L.OT_SEND), (L.A_RECEIVED, L.OT_RECV)):
        out[a] = (n * row[:, :, col]).sum(axis=1)
    return out


def stuck_report(trace: Trace, S: State, ot: np.ndarray, omap: np.ndarray, limit: int = 20) -> list[str]:
    """Human-readable lines naming unfinished threads and queues that still hold wavelets."""
    W = trace.mesh_width
    lines: list[str] = []
    for p in np.nonzero(S.pe[:, L.PE_LIVE])[0]:
        for h in range(S.th.shape[1]):
            rec = S.th[p, h]
            if rec[L.TH_CTRL] & L.CTRL_CODE != L.CODE_DONE:
                lines.append(f"PE ({p % W}, {p // W}) thread {h}: {_waiting_on(trace, S, ot[omap[int(rec[L.TH_OP])]], int(p), rec)}")
    owner = slot_owners(S)
    n = len(owner)
    colors = np.full(n, -1, dtype=np.int64)
    pp, cc = np.nonzero(S.color_slot >= 0)
    colors[S.slot0[pp] + S.color_slot[pp, cc]] = cc
    for i in np.nonzero((S.q[:n, L.Q_OCC] > 0) | (S.q[:n, L.CQ_OCC] > 0))[0]:
        p = owner[i]
        where = f"PE ({p % W}, {p // W}) color {colors[i]}"
        if S.q[i, L.Q_OCC]:
            lines.append(f"{where}: {S.q[i, L.Q_OCC]} wavelet(s) in the router queue")
        if S.q[i, L.CQ_OCC]:
            lines.append(f"{where}: {S.q[i, L.CQ_OCC]} wavelet(s) not taken by the CE")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def _waiting_on(trace: Trace, S: State, row: np.ndarray, p: int, rec: np.ndarray) -> str:
    op = int(rec[L.TH_OP])
    desc = f"op {op - int(trace.prog_start[np.searchsorted(trace.prog_start, op, 'right') - 1])} " \
           f"({trace.op(op).describe()})"
    if rec[L.TH_SETUP] > 0:
        return f"{desc} in setup"
    if row[L.OT_CODE] == isa.OP_WAIT:
        sem = trace.op(op).sem
        return f"{desc} waits on semaphore {sem} (value {S.sem[p, sem]})"
    if row[L.OT_RECV] and S.q[S.slot0[p] + rec[L.TH_IN], L.CQ_READY] == 0:
        return f"{desc} waits for wavelets on color {row[L.OT_CIN]} ({rec[L.TH_LEFT]} elements left)"
    if row[L.OT_SEND]:
        return f"{desc} blocked sending on color {row[L.OT_COUT]} (queue full)"
    return f"{desc} with {rec[L.TH_LEFT]} elements left"
