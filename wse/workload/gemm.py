"""Distributed GEMM on a P x P region: C[M, N] = A[M, K] . B[K, N] (docs/workloads.md).

PE (i, j) accumulates the tile C[rows of chunk j, columns of chunk i]. K is cut into P blocks
(padded to a multiple of P). In each of P steps a PE multiplies its current A tile (M_j x K_t)
by its current B tile (K_t x N_i) as M_j * K_t rank-1 vector FMACs of length N_i; the three
algorithms differ in how the tiles travel:

- `meshgemm`: Cannon compute-shift with each line's ring interleaved onto the physical line
  (c0 -> c2 -> c4 ... -> c5 -> c3 -> c1 -> c0), so every logical neighbour is at most two hops
  away. A tiles move one logical step along X, B tiles along Y, double-buffered on their own
  threads so the shift overlaps the compute. Tiles start pre-skewed.
- `cannon`: the same with the plain ring, whose wrap-around link spans the whole line.
- `summa`: step k broadcasts column k's A tiles along the rows and row k's B tiles along the
  columns; static routes cannot follow a moving root, so the broadcast is a pipelined software
  relay (receive-forward at every PE), double-buffered like the shifts.
"""
from __future__ import annotations

import dataclasses

from .. import isa
from ..errors import WseError
from ..hardware import WaferConfig
from ..trace import Op, compute, recv, send, signal, wait, with_tag
from .mesh import HI, LO, RAMP, X, Y, Allocator, MeshBuilder, Region, RegionProgram, split
from .plan import fit_check

ELEM = 2
FMAC, MOV = isa.KIND_FMAC, isa.KIND_MOV
# threads: 0 compute, 2/3 A traffic, 4/5 B traffic
T_COMPUTE, T_A_SEND, T_A_RECV, T_B_SEND, T_B_RECV = 0, 2, 3, 4, 5
# Semaphores, one per (signalling thread, waiting thread) pair so no waiter can take a signal
# meant for another: tile arrived (receiver -> compute, receiver -> sender), compute done
# (compute -> receiver), tile sent (sender -> receiver); for SUMMA the relay threads signal
# arrival to compute and compute releases each relay thread.
S_IN_C = {T_A_RECV: 4, T_B_RECV: 5, T_A_SEND: 4, T_B_SEND: 5}  # SUMMA relays reuse 4..7 by thread
S_IN_SEND = {T_A_RECV: 6, T_B_RECV: 7}
S_DONE = {T_A_RECV: 8, T_B_RECV: 9, T_A_SEND: 10, T_B_SEND: 11}
S_OUT = {T_A_SEND: 12, T_B_SEND: 13}
S_RELAY_IN = {T_A_SEND: 4, T_A_RECV: 5, T_B_SEND: 6, T_B_RECV: 7}  # SUMMA: relay thread -> compute
S_CHUNK = {X: (0, 1), Y: (2, 3)}  # SUMMA: a relaying position's receiving thread -> its sending thread
# SUMMA relays store and forward a panel in about this many chunks, of at least this many elements [U]
RELAY_CHUNKS = 8
RELAY_CHUNK_MIN = 32
ALGOS = ("meshgemm", "cannon", "summa")


def ring_order(n: int, interleaved: bool) -> list[int]:
    """Physical position of each logical ring position."""
    if not interleaved:
        return list(range(n))
    evens = list(range(0, n, 2))
    odds = list(range(1, n, 2))
    return evens + odds[::-1]


def color_flows(flows: list[tuple[int, int]], pool: list[int]) -> list[int]:
    """Greedy colors for flows (src, dst) on one line: flows sharing a router differ."""
    used: dict[int, set[int]] = {}
    out = []
    for s, d in flows:
        lo, hi = min(s, d), max(s, d)
        routers = range(lo, hi + 1)
        taken = set().union(*(used.get(r, set()) for r in routers))
        free = [c for c in pool if c not in taken]
        if not free:
            raise WseError("the GEMM's shift pattern needs more colors than the wafer has")
        out.append(free[0])
        for r in routers:
            used.setdefault(r, set()).add(free[0])
    return out


@dataclasses.dataclass(frozen=True)
class Shift:
    """One logical-ring shift along a line: each position sends to its logical predecessor."""

    send_color: tuple[int, ...]  # per position
    recv_color: tuple[int, ...]
    routes: dict[int, dict[int, tuple[str, tuple[str, ...]]]]

    @staticmethod
    def build(n: int, interleaved: bool, pool: list[int]) -> "Shift":
        if n == 1:
            return Shift((0,), (0,), {})
        phys = ring_order(n, interleaved)
        flows = [(phys[l], phys[(l - 1) % n]) for l in range(n)]
        colors = color_flows(flows, pool)
        send_c, recv_c = [0] * n, [0] * n
        routes: dict[int, dict[int, tuple[str, tuple[str, ...]]]] = {}
        for (s, d), c in zip(flows, colors):
            send_c[s], recv_c[d] = c, c
            step = 1 if d > s else -1
            out, back = (HI, LO) if step > 0 else (LO, HI)
            per = routes.setdefault(c, {})
            for p in range(s, d + step, step):
                assert p not in per
                per[p] = (RAMP if p == s else back, (RAMP,) if p == d else (out,))
        return Shift(tuple(send_c), tuple(recv_c), routes)


@dataclasses.dataclass(frozen=True)
class Relay:
    """Software-relayed broadcast along a line from any root (SUMMA): east and west chains."""

    east: tuple[int, int]
    west: tuple[int, int]
    sems: tuple[int, int]  # chunk received -> may be sent on: west relays (T+0 -> T+1), east (T+1 -> T+0)

    def routes(self, n: int) -> dict[int, dict[int, tuple[str, tuple[str, ...]]]]:
        out: dict[int, dict[int, tuple[str, tuple[str, ...]]]] = {}
        for i in range(n - 1):
            out.setdefault(self.east[i % 2], {}).update({i: (RAMP, (HI,))})
            out[self.east[i % 2]][i + 1] = (LO, (RAMP,))
            out.setdefault(self.west[(i + 1) % 2], {}).update({i + 1: (RAMP, (LO,))})
            out[self.west[(i + 1) % 2]][i] = (HI, (RAMP,))
        return out

    def ops(self, i: int, root: int, n: int, m: int, buf: int) -> dict[int, list[Op]]:
        """Thread -> ops of position i when `root` broadcasts m elements (east on T+0, west T+1).

        A position between the root and the line's end keeps the panel and passes it on: store
        and forward in chunks (RELAY_CHUNKS). Every eastward send is on T+0 and every westward one
        on T+1 (so one color's sends keep their order from step to step); the other thread of
        the pair, idle at that position, receives, a semaphore per chunk between them, so
        receiving chunk c + 1 overlaps sending chunk c. (A fused receive-and-send op would
        forward without keeping the panel, which the position's own FMACs read.)
        """
        if n == 1:
            return {}
        if i == root:
            out: dict[int, list[Op]] = {}
            if i < n - 1:
                out[0] = [send(self.east[i % 2], m, buf)]
            if i > 0:
                out[1] = [send(self.west[i % 2], m, buf)]
            return out
        east = i > root
        cin = self.east[(i - 1) % 2] if east else self.west[(i + 1) % 2]
        t_in = 1 if east else 0
        if (east and i == n - 1) or (not east and i == 0):  # the line's end keeps it
            return {t_in: [recv(cin, m, buf)]}
        cout = self.east[i % 2] if east else self.west[i % 2]
        size = max(RELAY_CHUNK_MIN, -(-m // RELAY_CHUNKS))
        chunks = [(a, min(size, m - a)) for a in range(0, m, size)]
        sem = self.sems[t_in]  # one signalling and one waiting thread per semaphore
        return {t_in: [op for a, c in chunks for op in (recv(cin, c, buf + a * ELEM), signal(sem))],
                1 - t_in: [op for a, c in chunks for op in (wait(sem), send(cout, c, buf + a * ELEM))]}


def _joined(a: dict[int, list[Op]], b: dict[int, list[Op]]) -> dict[int, list[Op]]:
    """Two steps' thread -> ops laid end to end."""
    return {t: a.get(t, []) + b.get(t, []) for t in dict.fromkeys([*a, *b])}


def _record_tensors(b: MeshBuilder, m: int, k: int, n: int, P: int, Kt: int, A: int, B: int, C: int, pb: int,
                    phys: list[int], align_a: bool = False, align_b: bool = False) -> None:
    """/tensors of a Cannon-style GEMM: PE (i, j) (logical li, lj on the ring) starts with K block
    (li + lj) mod P of A's rows Mr_j (row-major, Kt a row) and of B's columns Nc_i (pitch pb a
    row) — the pre-skewed placement — or, for an operand the kernel aligns first, block li of A
    (lj of B), and accumulates C's tile (pitch pb a row). The part of the last K block beyond k
    is padding the kernel expects zeroed ('pad')."""
    import numpy as np

    from .mesh import offsets
    Mr, Nc = split(m, P), split(n, P)
    Mo, No = offsets(Mr), offsets(Nc)
    logical = {p: l for l, p in enumerate(phys)}
    t = b.tensors
    ta, tb, tc = t.add("A", "input", (m, k)), t.add("B", "weight", (k, n)), t.add("C", "output", (m, n))
    pads: list[tuple[int, int, int]] = []  # (pe, addr, elements)
    for j in range(P):
        for i in range(P):
            pe, skew = j * P + i, (logical[i] + logical[j]) % P
            ba, bb = logical[i] if align_a else skew, logical[j] if align_b else skew
            ka, kb = (max(0, min(Kt, k - blk * Kt)) for blk in (ba, bb))  # real K columns in the blocks
            r = np.arange(Mr[j])
            if ka:
                t.pieces(ta, pe, A + r * Kt * ELEM, ka, (Mo[j] + r) * k + ba * Kt)
            if kb:
                q = np.arange(kb)
                t.pieces(tb, pe, B + q * pb, Nc[i], (bb * Kt + q) * n + No[i])
            pads += [(pe, A + (rr * Kt + ka) * ELEM, Kt - ka) for rr in r if ka < Kt]
            pads += [(pe, B + q * pb, Nc[i]) for q in range(kb, Kt)]
            t.pieces(tc, pe, C + r * pb, Nc[i], (Mo[j] + r) * n + No[i])
    _record_pads(t, pads)


def _record_summa(b: MeshBuilder, m: int, k: int, n: int, P: int, Q: int, nb: int, Kt: int, A_own: int, B_own: int,
                  C: int, pb: int) -> None:
    """/tensors of a SUMMA GEMM: column s mod P holds A's panel s (its rows Mr_j, Kt a row) in its
    owned storage, row s mod Q holds B's panel s (its columns Nc_i, pitch pb a row); C as in
    Cannon. Panel columns beyond k are padding the kernel expects zeroed ('pad')."""
    import numpy as np

    from .mesh import offsets
    Mr, Nc = split(m, Q), split(n, P)
    Mo, No = offsets(Mr), offsets(Nc)
    t = b.tensors
    ta, tb, tc = t.add("A", "input", (m, k)), t.add("B", "weight", (k, n)), t.add("C", "output", (m, n))
    pads: list[tuple[int, int, int]] = []
    for j in range(Q):
        for i in range(P):
            pe, r = j * P + i, np.arange(Mr[j])
            for s in range(i, nb, P):  # A panels this column owns
                kq, a0 = max(0, min(Kt, k - s * Kt)), A_own + (s // P) * max(Mr) * Kt * ELEM
                if kq:
                    t.pieces(ta, pe, a0 + r * Kt * ELEM, kq, (Mo[j] + r) * k + s * Kt)
                pads += [(pe, a0 + (rr * Kt + kq) * ELEM, Kt - kq) for rr in r if kq < Kt]
            for s in range(j, nb, Q):  # B panels this row owns
                kq, b0 = max(0, min(Kt, k - s * Kt)), B_own + (s // Q) * Kt * pb
                q = np.arange(kq)
                if kq:
                    t.pieces(tb, pe, b0 + q * pb, Nc[i], (s * Kt + q) * n + No[i])
                pads += [(pe, b0 + qq * pb, Nc[i]) for qq in range(kq, Kt)]
            t.pieces(tc, pe, C + r * pb, Nc[i], (Mo[j] + r) * n + No[i])
    _record_pads(t, pads)


SUMMA_MAX_DEPTH = 8  # [U] receive buffers per operand a SUMMA PE keeps, SRAM permitting

def _record_pads(t, pads: list[tuple[int, int, int]]) -> None:
    """The 'pad' zero tensor of a GEMM's K padding: (PE, address, elements) runs, numbered in order."""
    import numpy as np
    if pads:
        pe, addr, cnt = (np.array(v) for v in zip(*pads))
        t.pieces(t.add("pad", "zero", (int(cnt.sum()),)), pe, addr, cnt, np.cumsum(cnt) - cnt)


S_ALIGN = {T_A_SEND: 10, T_A_RECV: 11, T_B_SEND: 14, T_B_RECV: 15}  # alignment: sent / received


def summa_panels(m: int, k: int, n: int, P: int, Q: int, cfg: WaferConfig, panels: int | None = None) -> int:
    """SUMMA's K panels on a P x Q region: `panels` if given, else the fewest multiple of
    max(P, Q) whose buffers fit the PE's SRAM (more panels: thinner relayed tiles, more steps;
    the panel width is SUMMA's blocking parameter). The largest multiple tried is returned if
    none fits (its fit check then names what is missing)."""
    if panels:
        return panels
    base = max(P, Q)
    usable = cfg.sram_bytes - cfg.sram_reserved_bytes
    for c in range(1, 17):
        if _buffers(m, k, n, P, Q, c * base, cfg, True)[0].top <= usable:
            return c * base
    return 16 * base


def summa_depth(m: int, k: int, n: int, P: int, Q: int, nb: int, cfg: WaferConfig) -> int:
    """SUMMA's receive buffers per operand: the most, up to SUMMA_MAX_DEPTH, that fit beside the
    owned panels (at least 2). A relay may run that many steps ahead of the compute, which hides
    the relay chain's latency (a store-and-forward per hop) when the panels are thin."""
    usable = cfg.sram_bytes - cfg.sram_reserved_bytes
    for d in range(SUMMA_MAX_DEPTH, 2, -1):
        if _buffers(m, k, n, P, Q, nb, cfg, True, d)[0].top <= usable:
            return d
    return 2


def _buffers(m: int, k: int, n: int, P: int, Q: int, nb: int, cfg: WaferConfig, summa: bool, depth: int = 2):
    """A GEMM's per-PE buffers for K in nb steps: (allocator, `depth` A and B receive buffers, C,
    B row pitch, SUMMA's owned A and B panels or None)."""
    Mr, Nc = split(m, Q), split(n, P)
    Kt = -(-k // nb)
    mem = Allocator(0, cfg.sram_bytes - cfg.sram_reserved_bytes)
    pb = -(-max(Nc) * ELEM // 8) * 8
    A = [mem.alloc(f"a{q}", max(Mr) * Kt * ELEM, "activations", 6) for q in range(depth)]
    B = [mem.alloc(f"b{q}", Kt * pb, "weights", 0) for q in range(depth)]
    C = mem.alloc("c", max(Mr) * pb, "activations", 4)
    own = None
    if summa:  # owned panels: A's (this column's input) and B's (this row's weights)
        own = (mem.alloc("a_own", -(-nb // P) * max(Mr) * Kt * ELEM, "activations", 6),
               mem.alloc("b_own", -(-nb // Q) * Kt * pb, "weights", 0))
    return mem, A, B, C, pb, own


def standalone(m: int, k: int, n: int, P: int, cfg: WaferConfig, algo: str = "meshgemm",
               align_a: bool = False, align_b: bool = False, steps: int | None = None,
               Q: int | None = None, panels: int | None = None
               ) -> tuple["Trace", dict[str, int]]:  # noqa: F821
    """A GEMM kernel trace on a P x Q region (P columns, Q rows; Q = P by default): (trace,
    analytic facts). C's rows (M) are cut over the region's rows, its columns (N) over its columns.

    MeshGEMM and Cannon need a square region; both operands start in Cannon's skewed placement
    (static weights are stored that way). align_a / align_b add the initial alignment of an
    operand produced on the mesh (row j of A shifted j logical steps along X, column i of B i
    steps along Y), as a prefill layer needs for its activations. SUMMA runs on any P x Q
    region with K in `panels` panels (summa_panels): column s mod P owns A's panel s, row s mod Q
    B's panel s, each kept in its own storage (weights stay put), relayed into two receive
    buffers. `steps` below the full count builds only the first `steps` steps (with the last
    steps' endings): the prefix the serving model simulates to extrapolate the whole kernel's
    cycles (prefill.pieces).
    """
    if algo not in ALGOS:
        raise WseError(f"unknown GEMM algorithm {algo!r} ({', '.join(ALGOS)})")
    Q = Q or P
    if Q != P and algo != "summa":
        raise WseError(f"gemm: {algo} needs a square region ({P}x{Q} given); summa runs on any shape")
    if min(m, k, n, P) < 1 or Q > m or P > n:
        raise WseError(f"gemm: sizes must be positive, the region's rows ({Q}) no more than m and its "
                       f"columns ({P}) no more than n")
    nb = summa_panels(m, k, n, P, Q, cfg, panels) if algo == "summa" else P
    K = nb if steps is None else steps
    if steps is not None and not 2 <= steps <= nb:
        raise WseError(f"gemm: steps {steps} must be in [2, {nb}]")
    window = range(K)
    Mr, Nc = split(m, Q), split(n, P)
    Kt = -(-k // nb)
    depth = summa_depth(m, k, n, P, Q, nb, cfg) if algo == "summa" else 2
    mem, A, B, C, pb, own = _buffers(m, k, n, P, Q, nb, cfg, algo == "summa", depth)
    A_own, B_own = own or (0, 0)
    fit_check(mem, cfg, f"gemm {m}x{k}x{n} on {P}x{Q} ({algo}{f', {nb} panels' if algo == 'summa' else ''})")
    region = Region(0, 0, P, Q)
    b = MeshBuilder(P, Q, 6, kernel="gemm", m=m, k=k, n=n, region=f"{P}x{Q}", algo=algo)
    prog = RegionProgram(region, 6)
    if algo == "summa":
        relay_x, relay_y = Relay((0, 1), (2, 3), S_CHUNK[X]), Relay((4, 5), (6, 7), S_CHUNK[Y])
        for axis, rel, n_line in ((X, relay_x, P), (Y, relay_y, Q)):
            for color, per in rel.routes(n_line).items():
                b.line_routes(region, axis, color, per)
        # role columns: tile size, position, and the position again for a line that is a root
        # within the built steps (-1 otherwise: never-root lines share one compute program)
        roots_x, roots_y = {s % P for s in window}, {s % Q for s in window}
        prog.add_roles(X, [(Nc.index(Nc[i]), i, i if i in roots_x else -1) for i in range(P)])
        prog.add_roles(Y, [(Mr.index(Mr[j]), j, j if j in roots_y else -1) for j in range(Q)])
        # (thread 1 is unused: declared so that it is not built once per PE)
        prog.thread_roles = {T_COMPUTE: ((0, 2), (0, 2)), 1: ((), ()), T_A_SEND: ((1,), (0,)),
                             T_A_RECV: ((1,), (0,)), T_B_SEND: ((0,), (1,)), T_B_RECV: ((0,), (1,))}
    else:
        inter = algo == "meshgemm"
        sx = Shift.build(P, inter, list(range(0, 12)))
        sy = Shift.build(P, inter, list(range(12, 24)))
        for axis, sh in ((X, sx), (Y, sy)):
            for color, per in sh.routes.items():
                b.line_routes(region, axis, color, per)
        lx = {p: l for l, p in enumerate(ring_order(P, inter))}
        rx_ = [lx[i] if align_b else 0 for i in range(P)]
        ry_ = [lx[j] if align_a else 0 for j in range(P)]
        prog.add_roles(X, [(Nc.index(Nc[i]), sx.send_color[i], sx.recv_color[i], rx_[i], rx_[i] > 0)
                           for i in range(P)])
        prog.add_roles(Y, [(Mr.index(Mr[j]), sy.send_color[j], sy.recv_color[j], ry_[j], ry_[j] > 0)
                           for j in range(P)])
        # each thread's ops depend only on some role columns: build them once per value (thread 1
        # is unused)
        prog.thread_roles = {T_COMPUTE: ((0, 4), (0, 4)), 1: ((), ()), T_A_SEND: ((1, 2), (0, 3)),
                             T_A_RECV: ((1, 2), (0, 3)), T_B_SEND: ((0, 3), (1, 2)), T_B_RECV: ((0, 3), (1, 2))}

    t_compute, t_move = b.tag("gemm compute", -1, "gemm"), b.tag(f"gemm {'relay' if algo == 'summa' else 'shift'}", -1, "transfer")
    steps: dict[tuple[int, int, int], list[Op]] = {}

    def step_compute(s: int, mj: int, ni: int, a_src: int | None = None, b_src: int | None = None) -> list[Op]:
        """One step's FMACs (tagged): they depend on the step only through the operands' buffers
        (the parity, or a SUMMA root's own panel), so each distinct list is built once
        (prefill GEMMs repeat it millions of times)."""
        a0 = A[s % depth] if a_src is None else a_src
        b0 = B[s % depth] if b_src is None else b_src
        key = (a0, b0, mj, ni)
        if key not in steps:
            steps[key] = [compute(FMAC, ni, dst=C + r * pb, src0=b0 + q * pb,
                                  src1=a0 + (r * Kt + q) * ELEM, tag=t_compute)
                          for r in range(mj) for q in range(Kt)]
        return steps[key]

    retagged: dict[tuple[Op, int], Op] = {}
    relay_ops: dict[tuple[int, ...], dict[int, list[Op]]] = {}

    def retag(op: Op, tag: int) -> Op:
        if op.tag == tag:
            return op
        key = (op, tag)
        if key not in retagged:
            retagged[key] = with_tag(op, tag)
        return retagged[key]

    relays = (T_A_SEND, T_A_RECV, T_B_SEND, T_B_RECV)  # SUMMA's semaphore ops, tagged once
    relay_done = {t: retag(wait(S_DONE[t]), t_move) for t in relays}
    relay_in = {t: retag(signal(S_RELAY_IN[t]), t_move) for t in relays}
    compute_waits = [retag(wait(S_RELAY_IN[t]), t_compute) for t in relays]
    compute_signals = [retag(signal(S_DONE[t]), t_compute) for t in relays]

    def body(xr, yr, sp):
        ic, jc = xr[0][0], yr[0][0]
        mj, ni = Mr[jc], Nc[ic]
        # a B tile moves as stored: Kt rows of pitch pb (its row padding travels too; SEND and
        # RECV take contiguous elements)
        a_len, b_len = mj * Kt, Kt * (pb // ELEM)
        out: dict[int, list[Op]] = {}
        wanted = prog.building  # (program_ids builds one group of threads at a time)

        def put(into: dict[int, list[Op]], t: int, ops: list[Op]) -> None:
            """Append ops to thread t of `into`, tagged by the thread's kind (if t is wanted)."""
            if t in wanted:
                tag = t_compute if t == T_COMPUTE else t_move
                into.setdefault(t, []).extend(retag(op, tag) for op in ops)

        def add(t: int, ops: list[Op]) -> None:
            put(out, t, ops)

        if algo == "summa":
            summa_steps(out, xr, yr, mj, ni, a_len, b_len, wanted)
            return out
        # Cannon-style shifts: the operands' initial alignment, then each step sends this step's
        # tiles and receives the next step's
        for t_send, t_recv, buf, length, sc, rc, rounds in (
                (T_A_SEND, T_A_RECV, A, a_len, xr[0][1], xr[0][2], yr[0][3]),
                (T_B_SEND, T_B_RECV, B, b_len, yr[0][1], yr[0][2], xr[0][3])):
            if rounds:
                _align(add, t_send, t_recv, buf, length, sc, rc, rounds)
                add(T_COMPUTE, [wait(S_IN_C[t_recv])])

        def step(s: int) -> dict[int, list[Op]]:
            part: dict[int, list[Op]] = {}
            put(part, T_COMPUTE, [wait(S_IN_C[T_A_RECV]), wait(S_IN_C[T_B_RECV])] if s > 0 else [])
            if T_COMPUTE in wanted:
                part.setdefault(T_COMPUTE, []).extend(step_compute(s, mj, ni))  # tagged already
            if s < K - 2:
                put(part, T_COMPUTE, [signal(S_DONE[T_A_RECV]), signal(S_DONE[T_B_RECV])])
            if s < K - 1:
                for t_send, t_recv, buf, length, sc, rc in (
                        (T_A_SEND, T_A_RECV, A, a_len, xr[0][1], xr[0][2]),
                        (T_B_SEND, T_B_RECV, B, b_len, yr[0][1], yr[0][2])):
                    put(part, t_send, ([wait(S_IN_SEND[t_recv])] if s > 0 else []) + [send(sc, length, buf[s % 2])]
                        + ([signal(S_OUT[t_send])] if s < K - 2 else []))
                    put(part, t_recv, ([wait(S_DONE[t_recv]), wait(S_OUT[t_send])] if s > 0 else [])
                        + [recv(rc, length, buf[(s + 1) % 2]), signal(S_IN_C[t_recv])]
                        + ([signal(S_IN_SEND[t_recv])] if s < K - 2 else []))
            return part

        # steps 1 .. K-3 differ only by their buffers' parity: built as two steps repeated
        # (a prefill GEMM repeats them hundreds of times on each of thousands of programs)
        middle = K - 3 if K > 5 else 0
        parts = [(step(s), 1) for s in window] if not middle else \
            [(step(0), 1), (_joined(step(1), step(2)), middle // 2)] + [(step(1), 1)] * (middle % 2) \
            + [(step(K - 2), 1), (step(K - 1), 1)]
        for part, times in parts:
            for t, ops in part.items():
                out.setdefault(t, []).extend(ops * times if times > 1 else ops)
        return out

    def summa_steps(out, xr, yr, mj: int, ni: int, a_len: int, b_len: int, wanted) -> None:
        """SUMMA's steps: column s mod P relays its A panel along the rows (threads 2 east, 3
        west), row s mod Q its B panel down the columns (4, 5), each from its own storage; a
        relay may start once compute s - depth has released the buffer it fills."""
        for s in window:
            ra, rb = s % P, s % Q
            a_own = A_own + (s // P) * max(Mr) * Kt * ELEM if xr[0][1] == ra else None
            b_own = B_own + (s // Q) * Kt * pb if yr[0][1] == rb else None
            for rel, pos, root, n_line, length, buf, own, t_first in (
                    (relay_x, xr[0][1], ra, P, a_len, A, a_own, T_A_SEND),
                    (relay_y, yr[0][1], rb, Q, b_len, B, b_own, T_B_SEND)):
                if t_first not in wanted and t_first + 1 not in wanted:
                    continue
                key = (t_first, pos, root, length, buf[s % depth] if own is None else own)
                if key not in relay_ops:  # (a position's relay ops repeat every line length steps)
                    relay_ops[key] = {dt: [retag(op, t_move) for op in ops]
                                      for dt, ops in rel.ops(pos, root, n_line, length, key[-1]).items()}
                ops = relay_ops[key]
                for dt in (0, 1):
                    t = t_first + dt
                    if t in wanted:
                        o = out.setdefault(t, [])
                        if s >= depth:
                            o.append(relay_done[t])
                        o.extend(ops.get(dt, ()))  # (all tagged already)
                        o.append(relay_in[t])
            if T_COMPUTE in wanted:
                o = out.setdefault(T_COMPUTE, [])
                o.extend(compute_waits)
                o.extend(step_compute(s, mj, ni, a_own, b_own))
                if s < K - depth:
                    o.extend(compute_signals)

    def _align(add, t_send: int, t_recv: int, buf: list[int], length: int, sc: int, rc: int, rounds: int) -> None:
        """`rounds` single logical shifts of one operand (send / receive threads in lockstep; the
        receiver waits for the last send before the buffers are touched again: the move below
        and the compute loop's first receive)."""
        for r in range(1, rounds + 1):
            add(t_send, ([wait(S_ALIGN[t_recv])] if r > 1 else []) + [send(sc, length, buf[(r - 1) % 2]),
                                                                      signal(S_ALIGN[t_send])])
            add(t_recv, ([wait(S_ALIGN[t_send])] if r > 1 else []) + [recv(rc, length, buf[r % 2])]
                + ([signal(S_ALIGN[t_recv])] if r < rounds else []))
        add(t_recv, [wait(S_ALIGN[t_send])])
        if rounds % 2:
            add(t_recv, [compute(MOV, length, dst=buf[0], src0=buf[1])])
        # the shifts of the compute loop start once the operand is in place
        add(t_recv, [signal(S_IN_C[t_recv]), signal(S_ALIGN[t_recv])])
        add(t_send, [wait(S_ALIGN[t_recv])])

    prog.add(body)
    prog.program_ids(b)
    if K == nb:  # (the full kernel; SUMMA needs no alignment: its operands stay in their owned placement)
        if algo == "summa":
            _record_summa(b, m, k, n, P, Q, nb, Kt, A_own, B_own, C, pb)
        else:
            _record_tensors(b, m, k, n, P, Kt, A[0], B[0], C, pb, ring_order(P, algo == "meshgemm"), align_a,
                            align_b)
    trace = b.build()
    facts = {"model_flops": 2 * m * k * n, "executed_flops": 2 * m * Kt * nb * n,
             "sram_bytes_per_pe": mem.top}
    return trace, facts
