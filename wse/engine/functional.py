"""Functional evaluation: the values a trace computes (docs/model.md, "Values").

Every color's stream into a PE's CE comes from one sender (a route has one rx, so a route tree
has one injecting CE), and every microthread runs its ops in order; the values a run computes
therefore do not depend on timing unless threads of one PE touch the same SRAM without a
semaphore or a wavelet ordering them (a race). This evaluator runs the trace as that dataflow
network: each thread runs as far as its inputs allow, sends append payloads to the CE queues
the route tree delivers to, receives take them in order. It is Numba-compiled and needs no
cycle loop; the timing engine's counters are unaffected (functional runs are the timing run
plus this). The plain-Python reference stepper carries the same payloads through its queues
cycle by cycle, and tests compare the two value for value.

Races are looked for by evaluating twice in different schedules (PEs first-in-first-out and
threads greedy, then PEs last-in-first-out and threads interleaved element by element in
reverse order) and comparing every PE's SRAM; a PE whose bytes differ is reported.
"""
from __future__ import annotations

import dataclasses

import numba
import numpy as np

from .. import isa
from ..errors import WseError
from ..trace import Trace
from . import values as V

_RECEIVING = (isa.OP_RECV, isa.OP_RECV_COMPUTE, isa.OP_RECV_COMPUTE_SEND)
# per dtype: source / destination element kind, source / destination bytes
_SK = np.array([V.element_kinds(d)[0] for d in range(isa.N_DTYPES)], np.int64)
_DK = np.array([V.element_kinds(d)[1] for d in range(isa.N_DTYPES)], np.int64)
_SB = np.array(isa.DTYPE_SRC_BYTES, np.int64)
_DB = np.array(isa.DTYPE_DST_BYTES, np.int64)
_LOW = (isa.DTYPE_FP8, isa.DTYPE_INT8, isa.DTYPE_INT4)

OK, STUCK, OVERFLOW = 0, 1, 2


class FunctionalError(WseError):
    """The trace cannot be evaluated functionally (an op without value semantics, a stuck run)."""


class _Stuck(FunctionalError):
    def __init__(self, message: str, xy: tuple[int, int]):
        super().__init__(message)
        self.xy = xy


@dataclasses.dataclass
class Values:
    """What a functional evaluation leaves: every PE's SRAM bytes, and the PEs whose bytes
    depended on the schedule (a race between threads of the PE)."""

    sram: np.ndarray  # uint8 [P, extent]
    raced: list[tuple[int, int]]
    width: int

    def pe(self, x: int, y: int) -> np.ndarray:
        return self.sram[y * self.width + x]


def sram_extent(trace: Trace) -> int:
    """Bytes of SRAM any op touches (the highest address plus one, 4-byte aligned)."""
    o = trace.ops
    if len(o["opcode"]) == 0:
        return 4
    n = o["length"].astype(np.int64)
    dt = o["dtype"].astype(np.int64)
    sb, db = _SB[dt], _DB[dt]
    top = np.maximum.reduce([o["dst"] + n * db, o["src0"] + n * sb, o["src1"] + np.maximum(n * sb, 4)])
    return int(-(-(int(top.max()) + 4) // 4) * 4)


def _network(trace: Trace):
    """Route trees: per route its injecting route (-1: fed by nothing), the CE queues (FIFOs)
    of routes delivering to a ramp with their capacity (the elements the PE's ops receive on
    that color), and per injecting route the FIFOs its tree reaches."""
    r = trace.routes
    pe, color = r["pe"].astype(np.int64), r["color"].astype(np.int64)
    rx, tx = r["rx"].astype(np.int64), r["tx"].astype(np.int64)
    W, P = trace.mesh_width, trace.n_pes
    C = int(max(color.max(initial=-1), trace.ops["color_in"].max(initial=-1),
                trace.ops["color_out"].max(initial=-1))) + 1
    C = max(C, 1)
    R = len(pe)
    route_of = np.full(P * C, -1, np.int64)
    route_of[pe * C + color] = np.arange(R)
    x, y = pe % W, pe // W
    link = rx < isa.PORT_RAMP
    rxl = np.where(link, rx, 0)
    nx = x + np.array(isa.PORT_DX)[rxl]
    ny = y + np.array(isa.PORT_DY)[rxl]
    inside = link & (nx >= 0) & (nx < W) & (ny >= 0) & (ny < trace.mesh_height)
    up = np.where(rx == isa.PORT_RAMP, np.arange(R), -1)
    u = np.where(inside, route_of[np.where(inside, ny * W + nx, 0) * C + color], -1)
    opp = np.array(isa.PORT_OPPOSITE)[rxl]
    feeds = inside & (u >= 0) & ((tx[np.maximum(u, 0)] >> opp) & 1 == 1)
    up = np.where(feeds, u, up)
    root = up.copy()
    for _ in range(64):  # pointer jumping: log2(longest path) rounds
        nxt = np.where(root >= 0, root[np.maximum(root, 0)], -1)
        if np.array_equal(nxt, root):
            break
        root = nxt
    root = np.where((root >= 0) & (rx[np.maximum(root, 0)] == isa.PORT_RAMP), root, -1)

    # capacity of each (PE, color) CE queue: what the PE's threads receive on the color
    o = trace.ops
    n_prog = len(trace.prog_start)
    prog_of_row = np.repeat(np.arange(n_prog), trace.prog_len)
    rows = np.concatenate([np.arange(s, s + n) for s, n in zip(trace.prog_start, trace.prog_len)]) \
        if n_prog else np.zeros(0, np.int64)
    recv_rows = np.isin(o["opcode"][rows], _RECEIVING)
    per_prog = np.zeros((n_prog + 1, C), np.int64)
    np.add.at(per_prog, (prog_of_row[recv_rows], o["color_in"][rows][recv_rows].astype(np.int64)),
              o["length"][rows][recv_rows].astype(np.int64))
    pids = trace.pe_program.reshape(P, -1)
    cap = per_prog[np.where(pids >= 0, pids, n_prog)].sum(axis=1).reshape(-1)  # [P * C]

    deliver = ((tx >> isa.PORT_RAMP) & 1 == 1) & (root >= 0)
    fifo_of = np.full(P * C, -1, np.int64)
    keys = pe[deliver] * C + color[deliver]
    fifo_of[keys] = np.arange(len(keys))
    fifo_cap = cap[keys]
    fifo_base = np.concatenate([[0], np.cumsum(fifo_cap)])[:-1]
    # injecting route -> FIFOs of its tree (CSR over routes)
    roots = root[deliver]
    order = np.argsort(roots, kind="stable")
    inj_off = np.zeros(R + 1, np.int64)
    np.add.at(inj_off, roots + 1, 1)
    inj_off = np.cumsum(inj_off)
    inj_dst = np.arange(len(keys))[order]
    return dict(C=C, route_of=route_of, fifo_of=fifo_of, fifo_cap=fifo_cap, fifo_base=fifo_base,
                fifo_pe=pe[deliver], inj_off=inj_off, inj_dst=inj_dst, total=int(fifo_cap.sum()))


def check_supported(trace: Trace) -> None:
    """FunctionalError if an op has no value semantics (a send or receive of a low-precision dtype)."""
    o = trace.ops
    bad = np.isin(o["dtype"], _LOW) & ((o["opcode"] != isa.OP_COMPUTE) | (o["kind"] != isa.KIND_SCALE))
    if bad.any():
        from ..trace import op_location
        i = int(np.flatnonzero(bad)[0])
        raise FunctionalError(f"{op_location(trace, i)}: {trace.op(i).describe()} has no value semantics "
                              "(low-precision elements are only dequantized by a compute scale op)")


def evaluate(trace: Trace, sram: np.ndarray | None = None, race_check: bool = True) -> Values:
    """The values the trace computes from the initial SRAM bytes `sram` (uint8 [P, extent];
    default zeros). FunctionalError if a thread cannot finish or wavelets exceed what the
    receivers take."""
    check_supported(trace)
    P, W = trace.n_pes, trace.mesh_width
    given = 0 if sram is None else sram.shape[1]
    init = np.zeros((P, max(sram_extent(trace), given)), np.uint8)
    if given:
        init[:, :given] = sram
    net = _network(trace)
    first = _schedule(trace, net, init.copy(), 0)
    raced: list[tuple[int, int]] = []
    if race_check:
        try:
            second = _schedule(trace, net, init.copy(), 1)
        except _Stuck as e:  # a semaphore's waiters raced: the other schedule woke another one
            raced = [e.xy]
        else:
            diff = np.flatnonzero((first != second).any(axis=1))
            raced = [(int(p) % W, int(p) // W) for p in diff]
    return Values(first, raced, W)


def _schedule(trace: Trace, net: dict, sram: np.ndarray, mode: int) -> np.ndarray:
    o = trace.ops
    P, T = trace.n_pes, trace.threads
    pids = trace.pe_program.reshape(P, T).astype(np.int64)
    th_pe, th_t = np.nonzero(pids >= 0)
    th_start = trace.prog_start.astype(np.int64)[pids[th_pe, th_t]]
    th_len = trace.prog_len.astype(np.int64)[pids[th_pe, th_t]]
    pe_th_off = np.searchsorted(th_pe, np.arange(P + 1)).astype(np.int64)
    cols = [np.ascontiguousarray(o[k]).astype(np.int64) for k in
            ("opcode", "kind", "dtype", "color_in", "color_out", "sem", "length", "dst", "src0", "src1")]
    sem = np.zeros((P, isa.MAX_SEMAPHORES), np.int64)
    buf = np.zeros(max(net["total"], 1), np.uint32)
    status = np.zeros(4, np.int64)
    _run(sram, sem, *cols, th_pe.astype(np.int64), th_start, th_len, pe_th_off,
         net["C"], net["route_of"], net["fifo_of"], net["fifo_cap"], net["fifo_base"], net["fifo_pe"],
         net["inj_off"], net["inj_dst"], buf, _SK, _DK, _SB, _DB, mode, status)
    if status[0] == OVERFLOW:
        p = int(status[1])
        raise FunctionalError(f"PE ({p % trace.mesh_width}, {p // trace.mesh_width}) color {status[2]}: more "
                              "wavelets arrive than its ops receive")
    if status[0] == STUCK:
        p, t = int(th_pe[status[1]]), int(th_t[status[1]])
        x, y = p % trace.mesh_width, p // trace.mesh_width
        raise _Stuck(f"PE ({x}, {y}) thread {t} op {status[2]}: cannot finish in dataflow order (it waits "
                     "for wavelets or a semaphore that never come, or waiters of one semaphore race)", (x, y))
    return sram


@numba.njit(cache=True)
def _run(sram, sem, opc, kind, dtype, cin, cout, sems, length, dst, src0, src1,
         th_pe, th_start, th_len, pe_th_off, C, route_of, fifo_of, fifo_cap, fifo_base, fifo_pe,
         inj_off, inj_dst, buf, SK, DK, SB, DB, mode, status):
    P = len(pe_th_off) - 1
    n_th = len(th_pe)
    pc = np.zeros(n_th, np.int64)
    el = np.zeros(n_th, np.int64)
    head = np.zeros(len(fifo_cap), np.int64)
    tail = np.zeros(len(fifo_cap), np.int64)
    work = np.zeros(P + 1, np.int64)  # a ring of PEs to visit
    inq = np.zeros(P, np.bool_)
    wh, wt, wn = 0, 0, 0
    for i in range(P):
        p = i if mode == 0 else P - 1 - i
        if pe_th_off[p + 1] > pe_th_off[p]:
            work[wt] = p
            wt = (wt + 1) % (P + 1)
            wn += 1
            inq[p] = True
    while wn > 0:
        if mode == 0:
            p = work[wh]
            wh = (wh + 1) % (P + 1)
        else:
            wt = (wt - 1) % (P + 1)
            p = work[wt]
        wn -= 1
        inq[p] = False
        a, b = pe_th_off[p], pe_th_off[p + 1]
        progress = True
        while progress:
            progress = False
            for j in range(b - a):
                k = a + j if mode == 0 else b - 1 - j
                budget = 1 << 62 if mode == 0 else 1
                did = False
                while pc[k] < th_len[k] and budget > 0:
                    op = th_start[k] + pc[k]
                    code = opc[op]
                    if code == isa.OP_SIGNAL:
                        sem[p, sems[op]] += 1
                    elif code == isa.OP_WAIT:
                        if sem[p, sems[op]] <= 0:
                            break
                        sem[p, sems[op]] -= 1
                    else:
                        i = el[k]
                        n = length[op]
                        dt = dtype[op]
                        sk, dk, sb, db = SK[dt], DK[dt], SB[dt], DB[dt]
                        scal_kind = V.E_F32 if dt == isa.DTYPE_FP32 else V.E_F16
                        in_kind = V.E_F32 if dt == isa.DTYPE_FP32 else V.E_F16
                        out_kind = V.E_F32 if dk == V.E_F32 else V.E_F16
                        receives = code == isa.OP_RECV or code == isa.OP_RECV_COMPUTE or \
                            code == isa.OP_RECV_COMPUTE_SEND
                        sends = code == isa.OP_SEND or code == isa.OP_RECV_COMPUTE_SEND
                        f = fifo_of[p * C + cin[op]] if receives else -1
                        r = route_of[p * C + cout[op]] if sends else -1
                        kd = kind[op]
                        # two SRAM sources (ADD, SUB, MUL, MAX, DOT); a scalar at src1 (SCALE, EXP,
                        # RSQRT, RFIND, FILL); a reduction into dst[0] (DOT, RMAX, RSUM, RFIND)
                        two = kd == isa.KIND_ADD or kd == isa.KIND_SUB or kd == isa.KIND_MUL or \
                            kd == isa.KIND_MAX or kd == isa.KIND_DOT
                        scalar = kd == isa.KIND_SCALE or kd == isa.KIND_EXP or kd == isa.KIND_RSQRT or \
                            kd == isa.KIND_RFIND or kd == isa.KIND_FILL
                        reduce = kd == isa.KIND_DOT or kd == isa.KIND_RMAX or kd == isa.KIND_RSUM or \
                            kd == isa.KIND_RFIND
                        sourced = kd != isa.KIND_FILL  # (FILL reads no SRAM stream)
                        while i < n and budget > 0:
                            w = 0.0
                            if receives:
                                if head[f] == tail[f]:
                                    break
                                w = V.from_payload(in_kind, buf[fifo_base[f] + head[f]])
                                head[f] += 1
                            if code == isa.OP_SEND:
                                res = V.load(sram, p, src0[op] + i * sb, sk)
                            elif code == isa.OP_RECV:
                                res = w
                            elif kd == isa.KIND_SCALE and sk == V.E_I4:  # two values per byte
                                byte = np.int64(sram[p, src0[op] + i])
                                sc = V.load(sram, p, src1[op], scal_kind)
                                lo, hi = byte & 15, (byte >> 4) & 15
                                V.store(sram, p, dst[op] + i * db, V.E_F16, (lo - 16 if lo >= 8 else lo) * sc)
                                V.store(sram, p, dst[op] + i * db + 2, V.E_F16, (hi - 16 if hi >= 8 else hi) * sc)
                                i += 1
                                budget -= 1
                                continue
                            elif kd == isa.KIND_FMAC:  # (the common case first, computed here)
                                acc = V.load(sram, p, dst[op] + i * db, dk)
                                x = w if receives else V.load(sram, p, src0[op] + i * sb, sk)
                                res = acc + x * V.load(sram, p, src1[op], scal_kind)
                            else:
                                x = 0.0
                                if sourced:
                                    x = w if receives and two == 0 else V.load(sram, p, src0[op] + i * sb, sk)
                                if two:
                                    y = w if receives else V.load(sram, p, src1[op] + i * sb, sk)
                                elif scalar:
                                    y = V.load(sram, p, src1[op], scal_kind)
                                else:
                                    y = 0.0
                                res = V.apply(kd, x, y, V.load(sram, p, dst[op], dk) if reduce else 0.0, i)
                            if sends:
                                payload = V.to_payload(sk if code == isa.OP_SEND else out_kind, res)
                                for d in range(inj_off[r], inj_off[r + 1]):
                                    g = inj_dst[d]
                                    if tail[g] >= fifo_cap[g]:
                                        status[0] = 2
                                        status[1] = fifo_pe[g]
                                        status[2] = cout[op]
                                        return
                                    buf[fifo_base[g] + tail[g]] = payload
                                    tail[g] += 1
                                    q = fifo_pe[g]
                                    if q != p and not inq[q]:
                                        work[wt] = q
                                        wt = (wt + 1) % (P + 1)
                                        wn += 1
                                        inq[q] = True
                            else:
                                V.store(sram, p, dst[op] if reduce else dst[op] + i * db, dk, res)
                            i += 1
                            budget -= 1
                        if i > el[k]:
                            did = True
                        el[k] = i
                        if i < n:  # blocked on an empty queue, or out of budget
                            break
                    pc[k] += 1
                    el[k] = 0
                    budget -= 1
                    did = True
                if did:
                    progress = True
    for k in range(n_th):
        if pc[k] < th_len[k]:
            status[0] = 1
            status[1] = k
            status[2] = pc[k]
            return
