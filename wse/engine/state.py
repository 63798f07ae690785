"""Engine state built from a trace and a wafer configuration.

PE axis first (PE index y*W + x of the trace's mesh), then small fixed trailing dims: thread,
record field (layout.py); route slots are one array of records, each PE's routes (sorted by
color) from its first slot on, no room kept for routes a PE lacks (most PEs of a decode stage
have none). Per-op constants that depend on the
configuration (SIMD width, substeps, bytes, setup) are computed here once, so the kernels see
only integers.
"""
from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np
from numba import njit

from .. import isa
from ..errors import WseError
from ..hardware import WaferConfig
from ..op_codes import distinct_ops
from ..trace import Trace
from . import layout as L
from .tables import DX, DY, route_order


class State(NamedTuple):
    """Mutable engine state and counters (record layouts in layout.py)."""

    rt: np.ndarray  # int32 [S, RT_FIELDS] static routes (a view: slots' first half)
    color_slot: np.ndarray  # int8 [P, colors] slot of a color's route among the PE's, else -1
    q: np.ndarray  # int32 [S, Q_FIELDS] queues (a view: slots' second half)
    th: np.ndarray  # int32 [P, T, TH_FIELDS] microthreads
    pe: np.ndarray  # int32 [P, PE_FIELDS]
    sem: np.ndarray  # int32 [P, MAX_SEMAPHORES]
    sem_add: np.ndarray  # int32 [P, MAX_SEMAPHORES] signals of this cycle
    # Counters are counter-major so a cycle touches only what it changes. Cycle classes
    # (C_BUSY .. C_STALL_SYNC) count per cycle in int32 and are folded into int64 totals (busy
    # cycles after every chunk, the others at full folds: accounting.fold); the per-element
    # counters (C_FLOPS .. C_OPS) are added when an op completes (the driver adds the finished
    # elements of ops in progress when a run stops).
    cyc: np.ndarray  # int32 [N_CLASSES, P]
    acc: np.ndarray  # int64 [N_OP_COUNTERS, P] PE counters C_FLOPS .. C_OPS
    link_acc: np.ndarray  # int32 [N_LINK_COUNTERS, P, 4]
    finish: np.ndarray  # int64 [P] cycle after the PE's last op completed
    sleep_until: np.ndarray  # int64 [P] first cycle the CE must run again (0: awake)
    sleep_from: np.ndarray  # int64 [P] first cycle not yet counted while asleep
    slots: np.ndarray  # int32 [S, SLOT_FIELDS] each route slot's rt and q records side by side: a PE's
    #                   routes (sorted by color) are slots slot0[p] .., no room kept for routes it lacks
    slot0: np.ndarray  # int32 [P] the PE's first slot (its slot k is slot0[p] + k)


N_CLASSES = isa.C_STALL_SYNC + 1
N_OP_COUNTERS = isa.C_OPS + 1 - isa.C_FLOPS
MAX_CHUNK_CYCLES = 1 << 30  # bounds a chunk (the driver grows chunks to at most 2^24 cycles)


class Flat(NamedTuple):
    """The state as flat 1-D views, plus the op table: what the kernels index."""

    rt: np.ndarray
    color_slot: np.ndarray
    q: np.ndarray
    th: np.ndarray
    pe: np.ndarray
    sem: np.ndarray
    sem_add: np.ndarray
    cyc: np.ndarray
    acc: np.ndarray
    link_acc: np.ndarray
    finish: np.ndarray
    sleep_until: np.ndarray
    sleep_from: np.ndarray
    slot0: np.ndarray
    ot: np.ndarray  # per distinct op (its tag included): OT_FIELDS constants
    omap: np.ndarray  # per op of the trace: its row of ot


def flat(S: State, ot: np.ndarray, omap: np.ndarray) -> Flat:
    """Flat views of the state (shared memory: kernel writes land in S). rt and q are the two
    halves of one array of slot records (S.slots, layout.SLOT_FIELDS): the kernels get the
    records flat as rt, and the same memory from q's first field on as q."""
    whole = S.slots.reshape(-1)
    views = {k: getattr(S, k).reshape(-1) for k in Flat._fields if k not in ("rt", "q", "ot", "omap")}
    assert all(np.shares_memory(v, getattr(S, k)) for k, v in views.items() if v.size)
    assert np.shares_memory(whole, S.slots) or not whole.size
    return Flat(rt=whole, q=whole[L.RT_FIELDS:], **views, ot=np.ascontiguousarray(ot).reshape(-1), omap=omap)


class Ins(NamedTuple):
    """Instrumentation the kernels fill (flat views): per-tag statistics and op event logs."""

    th_start: np.ndarray  # int64 [P * T] cycle of the current op's first step (-1: none yet)
    tagstat: np.ndarray  # int64 [groups * tags * TS_FIELDS]
    events: np.ndarray  # int64 [traced * max_events * EVENT_FIELDS]
    ev_count: np.ndarray  # int64 [traced]
    work: np.ndarray  # int64 [3]: PE steps on the full path, cycles stepped, cycles jumped over


def make_ins(P: int, T: int, groups: int, tags: int, traced: int, max_events: int) -> Ins:
    tagstat = np.zeros((groups, max(tags, 1), L.TS_FIELDS), dtype=np.int64)
    tagstat[:, :, L.TS_FIRST] = np.iinfo(np.int64).max
    return Ins(np.full(P * T, -1, np.int64), tagstat.reshape(-1),
               np.zeros(max(traced, 1) * max_events * L.EVENT_FIELDS, np.int64), np.zeros(max(traced, 1), np.int64),
               np.zeros(3, np.int64))


class Tiles(NamedTuple):
    """Rectangles of PEs whose activity the kernels track (flat arrays; kernels.run_cycles)."""

    rect: np.ndarray  # int64 [tiles * 4]: x0, x1, y0, y1 (half-open)
    pe_tile: np.ndarray  # int64 [P] tile of each PE
    state: np.ndarray  # int64 [tiles * TL_FIELDS] (layout.py, TL_*)
    kick: np.ndarray  # int8 [tiles * 4]: a grant through port i of a neighbour tile enters this one
    due: np.ndarray  # int64 [tiles]: first cycle the tile must run phase 2 on its own (t + 1 while anything moves in it)
    need1: np.ndarray  # int8 [tiles]: 1 while a PE holds a ready wavelet or a grant to clear (phase 1 visits the tile)
    # int64 [tiles * 2]: PEs phase 1 evaluated and PEs phase 2 stepped on the full path at the
    # tile's last visit (prefetch.passes_pay); apart from `state`, so a tile's record stays one
    # cache line
    busy: np.ndarray
    mesh: np.ndarray  # int64 [3]: mesh width, height, tiles per run (a group steps runs g, g + groups, ...)


def slot_owners(S: State) -> np.ndarray:
    """The PE of each route slot (slots 0 .. routes-1; the slot array keeps one row even without routes)."""
    return np.repeat(np.arange(len(S.pe)), S.pe[:, L.PE_ROUTES] & L.ROUTES_MASK)


def make_tiles(S: State, W: int, H: int, rows: int, cols: int, run: int = 1) -> Tiles:
    """Tiles of rows x cols PEs over a W x H mesh (row-major), every one due at cycle 0, dealt to
    thread groups in runs of `run` consecutive tiles; sets each route's RT_CROSS (the link ports
    in its tx whose neighbour lies in another tile)."""
    nx, ny = -(-W // cols), -(-H // rows)
    tx, ty = np.meshgrid(np.arange(nx), np.arange(ny))
    tx, ty = tx.reshape(-1), ty.reshape(-1)
    rect = np.stack([tx * cols, np.minimum(W, tx * cols + cols), ty * rows, np.minimum(H, ty * rows + rows)], axis=1)
    p = np.arange(W * H)
    pe_tile = (p // W // rows) * nx + (p % W) // cols
    owner = slot_owners(S)
    tx_mask = S.rt[:len(owner), L.RT_TX].astype(np.int64)
    cross = np.zeros(len(owner), dtype=np.int64)
    for port in range(isa.N_LINK_PORTS):
        nb = np.clip(owner + isa.PORT_DY[port] * W + isa.PORT_DX[port], 0, max(0, W * H - 1))
        other = pe_tile[nb] != pe_tile[owner]
        cross |= np.where(((tx_mask >> port) & 1 == 1) & other, 1 << port, 0)
    S.rt[:len(owner), L.RT_CROSS] = cross
    state = np.zeros((len(rect), L.TL_FIELDS), dtype=np.int64)
    state[:, L.TL_WAKE] = 1 << 62
    return Tiles(rect.astype(np.int64).reshape(-1), pe_tile.astype(np.int64), state.reshape(-1),
                 np.zeros(len(rect) * 4, dtype=np.int8), np.zeros(len(rect), dtype=np.int64),
                 np.ones(len(rect), dtype=np.int8), np.zeros(len(rect) * 2, dtype=np.int64),
                 np.array([W, H, max(1, run)], dtype=np.int64))


class Consts(NamedTuple):
    mesh_width: int
    n_threads: int
    n_colors: int
    depth: int
    hop_latency: int
    ramp_latency: int
    link_capacity: int
    read_ports: int
    write_ports: int


def staggered(arrays: dict[str, np.ndarray | tuple]) -> dict[str, np.ndarray]:
    """Copies of the arrays in one buffer, each starting at a different offset modulo 4 KiB;
    an entry given as (shape, dtype) becomes zeros without being copied.

    Separately allocated large arrays all start page-aligned, so parallel streams through them
    collide in the same L1 sets and alias at 4 KiB; staggered starts avoid that. Contents and
    shapes are unchanged. The buffer is a released one (release_buffer) cleared in place where
    one is large enough, else fresh zeros from the OS.
    """
    specs = {k: (a.shape, a.dtype) if isinstance(a, np.ndarray) else (tuple(a[0]), np.dtype(a[1]))
             for k, a in arrays.items()}
    offsets, end = {}, 0
    for i, (name, (shape, dtype)) in enumerate(specs.items()):
        start = -(-end // 4096) * 4096 + (i * 320) % 4096
        offsets[name] = start
        end = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = _zeroed(end + 64)
    base = (-buf.ctypes.data) % 64
    out = {}
    for name, (shape, dtype) in specs.items():
        o = base + offsets[name]
        v = buf[o:o + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize].view(dtype).reshape(shape)
        if isinstance(arrays[name], np.ndarray):
            v[...] = arrays[name]
        out[name] = v
    return out


# A state buffer a finished simulation released, kept for the next one in this process. A pool
# worker simulates stage after stage of a few hundred MB each; a fresh buffer costs the OS a
# page fault per page (with transparent huge pages, compaction too: ~0.5 s of system time for a
# Kimi K2 group stage), clearing a kept one a memset (~0.03 s). At most one is kept.
_SPARE: list[np.ndarray] = []
_SPARE_LOCK = threading.Lock()


def _zeroed(nbytes: int) -> np.ndarray:
    """nbytes of zeros: the spare buffer cleared, where it is large enough, else new."""
    with _SPARE_LOCK:
        spare = _SPARE.pop() if _SPARE else None
    if spare is not None and len(spare) >= nbytes:
        out = spare[:nbytes]
        out.fill(0)
        return out
    del spare  # (freed before the larger one is allocated)
    return np.zeros(nbytes, dtype=np.uint8)


def release_buffer(state: "State") -> None:
    """Keep the buffer under `state`'s arrays for the next build_state; `state` must not be
    used afterwards (its arrays are cleared and reused)."""
    buf = state.slots
    while buf.base is not None:
        buf = buf.base
    if isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.ndim == 1:
        with _SPARE_LOCK:
            if not _SPARE or len(_SPARE[0]) < len(buf):
                _SPARE[:] = [buf]


def op_constants(trace: Trace, cfg: WaferConfig) -> tuple[np.ndarray, np.ndarray]:
    """Configuration-dependent per-op constants (docs/model.md, 'Ops'): (int64 [n_distinct,
    OT_FIELDS] per distinct op, its tag included; int32 [n_ops] each op's row). Programs repeat
    a few thousand distinct ops hundreds of millions of times in a big prefill GEMM, so the table
    is kept per distinct op and each op holds an index into it."""
    reps, inverse = distinct_ops(trace, tag=True)
    ot = np.zeros((len(reps), L.OT_FIELDS), dtype=np.int64)
    for u, i in enumerate(reps):  # once per distinct op and tag
        op = trace.op(int(i))
        reads, writes = isa.op_streams(op.opcode, op.kind, op.dtype, op.dst, op.src0, op.src1)
        row = ot[u]
        passes = isa.KIND_PASSES[op.kind] if op.opcode == isa.OP_COMPUTE else 1
        row[L.OT_CODE], row[L.OT_LENGTH] = op.opcode, op.length * passes  # steps: elements x passes
        row[L.OT_CIN], row[L.OT_COUT] = op.color_in, op.color_out
        row[L.OT_RECV] = op.opcode in (isa.OP_RECV, isa.OP_RECV_COMPUTE, isa.OP_RECV_COMPUTE_SEND)
        row[L.OT_SEND] = op.opcode in (isa.OP_SEND, isa.OP_RECV_COMPUTE_SEND)
        if op.opcode == isa.OP_COMPUTE:
            row[L.OT_SETUP] = cfg.vector_setup_cycles
            widest = max(b for _, b in reads + writes)
            simd = cfg.simd_width(op.kind, op.dtype) or 1
            row[L.OT_WIDTH] = min(simd, cfg.sram_port_bytes // widest)
        elif op.opcode in (isa.OP_SIGNAL, isa.OP_WAIT):
            row[L.OT_SETUP], row[L.OT_WIDTH] = 0, 1
        else:
            row[L.OT_SETUP], row[L.OT_WIDTH] = cfg.fabric_setup_cycles, 1
        if op.opcode in (isa.OP_COMPUTE, isa.OP_RECV_COMPUTE, isa.OP_RECV_COMPUTE_SEND):
            row[L.OT_FLOPS] = isa.KIND_FLOPS[op.kind] * isa.DTYPE_VALUES[op.dtype] // passes
        row[L.OT_RBYTES] = sum(b for _, b in reads)
        row[L.OT_WBYTES] = sum(b for _, b in writes)
        two = len(reads) == 2 and (cfg.sram_read_ports < 2 or _banks_conflict(reads[0][0], reads[1][0], cfg))
        row[L.OT_CTRL] = L.ctrl_word(op.opcode, two, 1 if two else 0, 1 if two else len(reads),
                                     len(writes), op.sem)
        row[L.OT_TAG] = op.tag
    return ot, inverse.astype(np.int32)


def _banks_conflict(a0: int, a1: int, cfg: WaferConfig) -> bool:
    def group(a: int) -> int:
        return (a // cfg.sram_bank_word_bytes) % cfg.sram_banks % cfg.sram_bank_conflict_modulus
    return group(a0) == group(a1)


def build_state(trace: Trace, cfg: WaferConfig) -> tuple[State, Consts, np.ndarray, np.ndarray]:
    """Initial engine state, constants, op table and op map (op_constants) for a validated trace
    on a configuration."""
    W, H, T = trace.mesh_width, trace.mesh_height, trace.threads
    P = W * H
    r = trace.routes
    n = len(r["pe"])  # route slots: slot i is route order[i] (by PE, then color)
    if n << L.SLOT_SHIFT > np.iinfo(np.int32).max:  # (RT_DOWNQ holds a flat q index in int32)
        raise WseError(f"{W}x{H} mesh with {n:,} routes: too many route slots for the engine's int32 record "
                       f"indices (at most {np.iinfo(np.int32).max >> L.SLOT_SHIFT:,})")
    order = route_order(r["pe"], r["color"], P) if n else np.zeros(0, np.int64)
    n_routes = np.bincount(r["pe"], minlength=P) if n else np.zeros(P, np.int64)
    first = np.cumsum(n_routes) - n_routes

    # the state arrays are views into one staggered buffer, filled in place (no second copy)
    arrays = staggered(dict(
        slots=((max(n, 1), L.SLOT_FIELDS), np.int32), slot0=first.astype(np.int32),
        color_slot=((P, max(cfg.colors, 1)), np.int8),
        th=((P, T, L.TH_FIELDS), np.int32), pe=((P, L.PE_FIELDS), np.int32),
        sem=((P, isa.MAX_SEMAPHORES), np.int32),
        sem_add=((P, isa.MAX_SEMAPHORES), np.int32),
        cyc=((N_CLASSES, P), np.int32),
        acc=((N_OP_COUNTERS, P), np.int64),
        link_acc=((isa.N_LINK_COUNTERS, P, isa.N_LINK_PORTS), np.int32),
        finish=((P,), np.int64), sleep_until=((P,), np.int64), sleep_from=((P,), np.int64),
    ))
    arrays["rt"] = arrays["slots"][:, :L.RT_FIELDS]
    arrays["q"] = arrays["slots"][:, L.RT_FIELDS:]
    arrays["slots"][n:, L.RT_DOWNQ] = -1  # (the one row kept when there are no routes)
    color_slot = arrays["color_slot"]
    _fill_routes(arrays["slots"], color_slot, first, r["pe"], r["color"], r["rx"], r["tx"], order, W)

    ot, omap = op_constants(trace, cfg)
    start = np.append(trace.prog_start, 0).astype(np.int64)  # a dummy entry keeps empty tables indexable
    length = np.append(trace.prog_len, 0).astype(np.int64)
    _fill_threads(arrays["th"], arrays["pe"], trace.pe_program.reshape(P, T), start, length, ot,
                  omap if len(omap) else np.zeros(1, np.int32), color_slot, n_routes)
    state = State(**arrays)
    consts = Consts(W, T, max(cfg.colors, 1), cfg.queue_depth_wavelets, cfg.hop_latency_cycles,
                    cfg.ramp_latency_cycles, cfg.link_wavelets_per_cycle,
                    cfg.sram_read_ports, cfg.sram_write_ports)
    return state, consts, ot, omap


@njit(cache=True)
def _fill_routes(slots, color_slot, first, pe, color, rx, tx, order, W):
    """Each route slot's static record (rt: RX, TX, INC, DOWNQ, DOWNS) and the PEs' color ->
    slot table, slot i holding route order[i]."""
    n = len(order)
    for c in range(color_slot.shape[0]):
        color_slot[c, :] = -1
    for i in range(n):
        k = order[i]
        color_slot[pe[k], color[k]] = i - first[pe[k]]
    for i in range(n):
        k = order[i]
        p, c, t = np.int64(pe[k]), np.int64(color[k]), np.int64(tx[k])
        x, y = p % W, p // W
        inc = 0
        downs = 0
        links = 0
        downq = -1
        for port in range(isa.N_PORTS):
            if (t >> port) & 1:
                inc += 1 << (4 * port)
                if port != isa.PORT_RAMP:
                    links += 1
                    nb = (y + DY[port]) * W + x + DX[port]
                    d = np.int64(color_slot[nb, c])
                    downs += (d + 1) << (8 * port)
                    downq = (first[nb] + d) << L.SLOT_SHIFT
        rec = slots[i]
        rec[L.RT_RX] = rx[k]
        rec[L.RT_TX] = t
        rec[L.RT_INC] = inc
        rec[L.RT_DOWNS] = downs
        rec[L.RT_DOWNQ] = -2 if links > 1 else downq


@njit(cache=True)
def _fill_threads(th, pe_rec, pp, start, length, ot, omap, color_slot, n_routes):
    """Each thread record at its program's first op (the op's constants copied in, its colors'
    slots looked up) and each PE record's routes, thread span and live threads."""
    P, T = pp.shape
    for p in range(P):
        live = 0
        span = 0
        for h in range(T):
            rec = th[p, h]
            rec[L.TH_IN] = -1
            rec[L.TH_OUT] = -1
            rec[L.TH_CTRL] = L.CODE_DONE
            pid = pp[p, h]
            if pid < 0:
                continue
            live += 1
            span = h + 1
            op0 = start[pid]
            rec[L.TH_OP] = op0
            rec[L.TH_END] = op0 + length[pid]
            row = omap[op0]
            rec[L.TH_LEFT] = ot[row, L.OT_LENGTH]
            rec[L.TH_SETUP] = ot[row, L.OT_SETUP]
            rec[L.TH_CTRL] = ot[row, L.OT_CTRL]
            rec[L.TH_WIDTH] = ot[row, L.OT_WIDTH]
            if ot[row, L.OT_RECV] != 0:
                rec[L.TH_IN] = color_slot[p, ot[row, L.OT_CIN]]
            if ot[row, L.OT_SEND] != 0:
                rec[L.TH_OUT] = color_slot[p, ot[row, L.OT_COUT]]
        pe_rec[p, L.PE_ROUTES] = n_routes[p] | span << L.SPAN_SHIFT
        pe_rec[p, L.PE_LIVE] = live
        pe_rec[p, L.PE_TRACE] = -1
