"""Collectives along one line of PEs (a row or a column of a region).

`LineAllReduce` is the two-level, two-way chain all-reduce of MeshGEMV (WaferLLM): the line is
cut into groups; inside a group the part below the group's middle PE chains partial sums up to
it and the part above chains down to it, each stage a pipelined receive-add-forward; the group
roots then chain the same way to the middle group's root, which broadcasts the sum along the
whole line on one multicast color. With `groups=1, root="end"` it is the single-chain
pipeline all-reduce baseline. Positions are 0..n-1; "lo"/"hi" are the neighbours at i-1/i+1.

Each collective gives static routes per position (`routes()`) and, for a vector of m elements,
the ops of position i per thread (`ops(i, ...)`). Every position's routes are independent of
m, so one set of routes serves every all-reduce of a workload along that axis.
"""
from __future__ import annotations

import dataclasses
import math

from .. import isa
from ..trace import Op, recv, recv_compute, recv_compute_send, send, signal, wait, compute
from .mesh import HI, LO, RAMP, split_ranges

SEM_REDUCE = 0  # semaphore: thread 1 tells thread 0 that the upper-side partial arrived
# ... and thread 0 tells thread 1 it has added it: tmp may take the next one (without this, a root
# combining two upper sides, or a later all-reduce, could overwrite tmp before it was read)
SEM_TMP_FREE = 4
# ... and, on a line that also runs the flat variant, thread 0 tells thread 1 that it has reached
# the call: at a group root above the final root (two-level calls) it has taken its last flat-chain
# wavelet on the color thread 1 receives next; elsewhere (flat calls) its last broadcast wavelet
SEM_FLAT_CLEAR = 5
# the flat variant: a position's thread 1 tells thread 0 that the broadcast sum is in `tmp`; the
# root's thread 0 tells thread 1 that a chunk is combined, and thread 1 that it has sent them all
SEM_FLAT_BCAST, SEM_FLAT_CHUNK, SEM_FLAT_SENT = 6, 7, 8
FLAT_SEND_THREAD = 4  # the flat root's broadcast sends (threads 2 and 3: the KV shift, region.THREADS)
FLAT_ROOT_CHUNKS = 8  # [U] the flat root combines and broadcasts in this many chunks ...
FLAT_CHUNK_MIN = 32  # [U] ... of at least this many elements
# a segment all-reduce pipelines its root (_pipelined_segment_ops) from vectors of more than one chunk
SEGMENT_PIPELINED_FROM = 2 * FLAT_CHUNK_MIN


def default_groups(n: int) -> int:
    """Group count for a line of n: about sqrt(n), the latency optimum of the two-level chain.

    A divisor of n near sqrt(n) (within a quarter of it) is preferred, giving equal groups as in
    the published configurations (256 -> 16, 360 -> 18, 720 -> 24); otherwise round(sqrt(n))
    groups whose sizes differ by at most one (146 -> 12).
    """
    if n <= 2:
        return 1
    root = math.sqrt(n)
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    best = min(divisors, key=lambda d: (abs(d - root), -d))
    return best if abs(best - root) <= root / 4 else max(1, round(root))


@dataclasses.dataclass(frozen=True)
class ReduceColors:
    """The nine colors of one axis' all-reduce: level-1 and level-2 chains both ways, broadcast."""

    up1: tuple[int, int]  # level 1, toward higher index (alternating by position parity)
    down1: tuple[int, int]  # level 1, toward lower index
    up2: tuple[int, int]  # level 2, toward higher index (alternating by group parity)
    down2: tuple[int, int]
    bcast: int

    @staticmethod
    def from_base(base: int) -> "ReduceColors":
        c = list(range(base, base + 9))
        return ReduceColors((c[0], c[1]), (c[2], c[3]), (c[4], c[5]), (c[6], c[7]), c[8])


class LineAllReduce:
    """All-reduce of a vector held by every position of a line; the result lands everywhere."""

    def __init__(self, n: int, colors: ReduceColors, groups: int | None = None, root: str = "middle",
                 segments: bool = False, flat_latency: tuple[int, int] | None = None,
                 root_at: int | None = None, pipelined_segments: bool = False):
        """groups/root: the two-level's groups and where their roots sit (each group's middle,
        or its end: the chain baseline); root_at: the root of a one-group line (the flat
        variant's: the two-level's final root); flat_latency: see below; pipelined_segments:
        long segment all-reduces combine and broadcast chunk by chunk at their roots
        (segment_ops)."""
        if root_at is not None and groups != 1:
            raise ValueError("root_at places the root of a one-group line")
        self.n = n
        self.segments = segments  # also route the per-group all-reduce (segment_ops)
        self.pipelined_segments = pipelined_segments and segments and root != "end"
        self.colors = colors
        self.groups = groups if groups is not None else default_groups(n)
        if not 1 <= self.groups <= n:
            raise ValueError(f"groups must be in [1, {n}]")
        self.root_mode = root
        sizes = [n // self.groups + (1 if g < n % self.groups else 0) for g in range(self.groups)]
        self.bounds: list[tuple[int, int, int]] = []  # (first, last + 1, root) per group
        a = 0
        for s in sizes:
            b = a + s
            r = b - 1 if root == "end" else (a + b - 1) // 2 if root_at is None else root_at
            self.bounds.append((a, b, r))
            a = b
        self.roots = [r for _, _, r in self.bounds]
        self.mid = self.groups - 1 if root == "end" else (self.groups - 1) // 2
        self.final_root = self.roots[self.mid]
        self.group_of = [g for g, (a, b, _) in enumerate(self.bounds) for _ in range(a, b)]
        # flat_latency (hop, ramp cycles): vectors of at least flat_from elements take the flat
        # variant, one two-way chain over the whole line to the final root, on the same colors
        self.flat: LineAllReduce | None = None
        self.flat_from: int | None = None
        if flat_latency is not None and self.groups > 1 and not segments and root != "end":
            self.flat_from = self.flat_threshold(*flat_latency)
            if self.flat_from is not None:
                self.flat = LineAllReduce(n, colors, groups=1, root_at=self.final_root)

    def flat_threshold(self, hop_cycles: int, ramp_cycles: int) -> int | None:
        """The vector length from which the flat variant (one two-way chain over the whole line
        to the final root, then the same broadcast) is expected to finish first.

        Both are pipelines limited by what their busiest PE, the final root, takes in over its
        ramp (one wavelet a cycle): each chain side it combines brings m wavelets. The two-level
        root takes in (level-1 sides + level-2 sides) m and then broadcasts m; the flat root
        takes in (its sides) m and broadcasts each chunk as it is combined, behind the intake,
        all but the last chunk (m / flat_chunks(m)).
        The flat chain's longer legs cost latency instead: hop + 2 ramps per PE it passes
        through (a receive-add-forward), where the two-level's level-2 chains pass most PEs on
        the fabric alone (hop). So flat from the least m with m (saved - 1 / chunks(m)) >= extra
        latency; None where the flat root saves nothing."""
        extra, saved = self.flat_model(hop_cycles, ramp_cycles)
        for k in range(1, FLAT_ROOT_CHUNKS + 1):  # the lengths m that take k chunks, shortest first
            first = 1 if k == 1 else k * FLAT_CHUNK_MIN
            last = (k + 1) * FLAT_CHUNK_MIN - 1 if k < FLAT_ROOT_CHUNKS else None
            per = saved * k - 1  # wavelets saved per element, times k
            if per > 0:
                m = max(first, -(-extra * k // per))
                if last is None or m <= last:
                    return m
        return None

    def flat_model(self, hop_cycles: int, ramp_cycles: int) -> tuple[int, int]:
        """flat_threshold's terms: (the flat chain's extra latency in cycles, the wavelets per
        element its root saves before the last chunk's broadcast)."""
        stage = hop_cycles + 2 * ramp_cycles
        f = self.final_root
        flat = stage * max(f, self.n - 1 - f)
        level1 = max(max(r - a, b - 1 - r) for a, b, r in self.bounds)
        lo = [r for r in self.roots if r < f]
        hi = [r for r in self.roots if r > f]
        level2 = max((len(side) * 2 * ramp_cycles + abs(f - side[0 if side is lo else -1]) * hop_cycles
                      for side in (lo, hi) if side), default=0)
        a, b, _ = self.bounds[self.mid]

        def sides(below: int, above: int) -> int:
            return (below > 0) + (above > 0)
        saved = sides(f - a, b - 1 - f) + sides(len(lo), len(hi)) + 1 - sides(f, self.n - 1 - f)
        return flat - (stage * level1 + level2), saved

    # ---- routes ------------------------------------------------------------------------------

    def routes(self) -> dict[int, dict[int, tuple[str, tuple[str, ...]]]]:
        """color -> {position: (rx side, tx sides)}."""
        out: dict[int, dict[int, tuple[str, tuple[str, ...]]]] = {}

        def add(color: int, pos: int, rx: str, tx: tuple[str, ...]) -> None:
            per = out.setdefault(color, {})
            assert pos not in per, (color, pos)
            per[pos] = (rx, tx)

        c = self.colors
        for a, b, r in self.bounds:
            for i in range(a, r):  # chain up toward the root
                add(c.up1[i % 2], i, RAMP, (HI,))
                add(c.up1[i % 2], i + 1, LO, (RAMP,))
            for i in range(r + 1, b):  # chain down toward the root
                add(c.down1[i % 2], i, RAMP, (LO,))
                add(c.down1[i % 2], i - 1, HI, (RAMP,))
        roots = self.roots
        for g in range(self.groups - 1):
            lo_root, hi_root = roots[g], roots[g + 1]
            if g < self.mid:  # root g sends up to root g + 1
                col = c.up2[g % 2]
                add(col, lo_root, RAMP, (HI,))
                for i in range(lo_root + 1, hi_root):
                    add(col, i, LO, (HI,))
                add(col, hi_root, LO, (RAMP,))
            else:  # root g + 1 sends down to root g
                col = c.down2[(g + 1) % 2]
                add(col, hi_root, RAMP, (LO,))
                for i in range(lo_root + 1, hi_root):
                    add(col, i, HI, (LO,))
                add(col, lo_root, HI, (RAMP,))
        if self.segments:
            self._segment_routes(add)
        f = self.final_root
        for i in range(self.n):
            if i == f:
                tx = tuple(s for s, ok in ((LO, i > 0), (HI, i < self.n - 1)) if ok)
                if tx:
                    add(c.bcast, i, RAMP, tx)
            elif i < f:
                add(c.bcast, i, HI, (RAMP,) + ((LO,) if i > 0 else ()))
            else:
                add(c.bcast, i, LO, (RAMP,) + ((HI,) if i < self.n - 1 else ()))
        if self.flat is not None:  # the flat chains use the level-1 colors as the groups do where both use one
            for color, per in self.flat.routes().items():
                mine = out.setdefault(color, {})
                for pos, route in per.items():
                    if mine.setdefault(pos, route) != route:
                        raise AssertionError(("flat all-reduce route conflict", color, pos))
        return out

    def _segment_routes(self, add) -> None:
        """Each group's root broadcasts inside its group on the level-1 colors its positions
        leave free: down1[r % 2] below the root (they chain up on up1), up1[r % 2] above it."""
        c = self.colors
        for a, b, r in self.bounds:
            if r > a:
                add(c.down1[r % 2], r, RAMP, (LO,))
                for i in range(a, r):
                    add(c.down1[r % 2], i, HI, (RAMP,) + ((LO,) if i > a else ()))
            if r < b - 1:
                add(c.up1[r % 2], r, RAMP, (HI,))
                for i in range(r + 1, b):
                    add(c.up1[r % 2], i, LO, (RAMP,) + ((HI,) if i < b - 1 else ()))

    # ---- roles and ops ------------------------------------------------------------------------

    def segment_role(self, i: int) -> tuple:
        """What position i's ops in an all-reduce inside its group depend on."""
        a, b, r = self.bounds[self.group_of[i]]
        return self.role(i)[:2] + (r % 2, i < r)

    def segment_ops(self, role: tuple, m: int, buf: int, tmp: int, kind: int = isa.KIND_ADD,
                    dtype: int = isa.DTYPE_FP16) -> dict[int, list[Op]]:
        """All-reduce of m elements inside each group (a segment of the line) only: the
        level-1 chains to the group's root, then its broadcast over the group (needs
        `segments=True` routes). A line of one group is this line's all-reduce without the
        level-2 stage. Built with pipelined_segments, vectors of at least
        SEGMENT_PIPELINED_FROM elements take _pipelined_segment_ops on the same routes."""
        if not self.segments:
            raise ValueError("segment_ops needs a LineAllReduce built with segments=True")
        par, l1, rpar, below = role
        if m == 0 or (l1[0] == "root" and not (l1[1] or l1[2])):
            return {}
        if self.pipelined_segments and m >= SEGMENT_PIPELINED_FROM:
            return _pipelined_segment_ops(self.colors, role, m, buf, tmp, kind, dtype)
        c = self.colors
        t0: list[Op] = []
        t1: list[Op] = []
        if l1[0] in ("up", "down"):
            col = c.up1 if l1[0] == "up" else c.down1
            t0.append(send(col[par], m, buf, dtype) if l1[1] else
                      recv_compute_send(col[1 - par], col[par], kind, m, src0=buf, dtype=dtype))
            t0.append(recv((c.down1 if below else c.up1)[rpar], m, buf, dtype))
        else:
            if l1[1]:
                t0.append(recv_compute(c.up1[1 - par], kind, m, dst=buf, src0=buf, dtype=dtype))
            if l1[2]:
                t1.extend([recv(c.down1[1 - par], m, tmp, dtype), signal(SEM_REDUCE), wait(SEM_TMP_FREE)])
                t0.extend([wait(SEM_REDUCE), compute(kind, m, dst=buf, src0=buf, src1=tmp, dtype=dtype),
                           signal(SEM_TMP_FREE)])
            if l1[1]:
                t0.append(send(c.down1[rpar], m, buf, dtype))
            if l1[2]:
                t0.append(send(c.up1[rpar], m, buf, dtype))
        out = {0: t0}
        if t1:
            out[1] = t1
        return out

    def segment_combine_flops(self, m_of_group) -> int:
        """`kind` operations of a segment all-reduce: (group size - 1) x m_of_group(g) per group."""
        return sum((b - a - 1) * m_of_group(g) for g, (a, b, _) in enumerate(self.bounds))

    def role(self, i: int) -> tuple:
        """What position i's ops depend on (positions with equal roles run equal ops)."""
        g = self.group_of[i]
        a, b, r = self.bounds[g]
        if i < r:
            l1 = ("up", i == a)
        elif i > r:
            l1 = ("down", i == b - 1)
        else:
            l1 = ("root", r > a, r < b - 1)
        l2 = None
        if i == r:
            if g < self.mid:
                l2 = ("up", g == 0)
            elif g > self.mid:
                l2 = ("down", g == self.groups - 1)
            else:
                l2 = ("root", g > 0, g < self.groups - 1)
        flat = self.flat.role(i)[:2] if self.flat is not None else None  # (parity, leg): what _flat_ops reads
        return (i % 2, l1, g % 2 if i == r else 0, l2, flat, i == self.final_root)

    def ops(self, i: int, m: int, buf: int, tmp: int, kind: int = isa.KIND_ADD,
            dtype: int = isa.DTYPE_FP16) -> dict[int, list[Op]]:
        """Ops of position i for an all-reduce of m elements in place at `buf`."""
        return self.role_ops(self.role(i), m, buf, tmp, kind, dtype)

    def role_ops(self, role: tuple, m: int, buf: int, tmp: int, kind: int = isa.KIND_ADD,
                 dtype: int = isa.DTYPE_FP16, at_root: dict[int, list[Op]] | None = None
                 ) -> dict[int, list[Op]]:
        """Ops for a position with this role (see role()): thread -> ops.

        Roots that receive from both sides take the upper side on thread 1 into `tmp` and
        combine it on thread 0; thread 1 takes nothing more into `tmp` until thread 0 has read it
        (SEM_TMP_FREE). One `kind` operation per element per combining stage. A line built with
        flat_latency runs vectors of at least flat_from elements as the flat variant (_flat_ops).
        `at_root` ops run at the final root between the reduction and the broadcast (the
        hand-off barrier nests a column all-reduce there).
        """
        if self.n == 1 or m == 0:
            return {t: list(v) for t, v in (at_root or {}).items()} if role[-1] else {}
        par, l1, gpar, l2, flat, final = role
        if self.flat_from is not None and m >= self.flat_from:  # one two-way chain to the final root
            return _flat_ops(self.colors, flat, m, buf, tmp, kind, dtype, at_root)
        c = self.colors
        t0: list[Op] = []
        t1: list[Op] = []
        # a group root above the final root takes its upper side on thread 1, on the color the flat
        # variant's chain reaches it by on thread 0: not before thread 0 is past any flat call
        guard = flat is not None and flat[1][0] == "down" and l1[0] == "root" and l1[2]

        def combine(lo_color: int | None, hi_color: int | None) -> None:
            if guard and not t0 and hi_color is not None:
                t0.append(signal(SEM_FLAT_CLEAR))
                t1.append(wait(SEM_FLAT_CLEAR))
            if lo_color is not None:
                t0.append(recv_compute(lo_color, kind, m, dst=buf, src0=buf, dtype=dtype))
            if hi_color is not None:
                t1.extend([recv(hi_color, m, tmp, dtype), signal(SEM_REDUCE), wait(SEM_TMP_FREE)])
                t0.extend([wait(SEM_REDUCE), compute(kind, m, dst=buf, src0=buf, src1=tmp, dtype=dtype),
                           signal(SEM_TMP_FREE)])

        def level(leg: tuple, up: tuple[int, int], down: tuple[int, int], p: int) -> bool:
            """One level of the chain: pass the partial sum on (a chain end sends, others add
            theirs on the way) or, at the level's root, combine both sides; True at a root."""
            if leg[0] in ("up", "down"):
                col = up if leg[0] == "up" else down
                t0.append(send(col[p], m, buf, dtype) if leg[1] else
                          recv_compute_send(col[1 - p], col[p], kind, m, src0=buf, dtype=dtype))
                return False
            combine(up[1 - p] if leg[1] else None, down[1 - p] if leg[2] else None)
            return True

        if level(l1, c.up1, c.down1, par):
            level(l2, c.up2, c.down2, gpar)
        out = {0: t0, 1: t1}
        if final and at_root:
            for t, ops in at_root.items():
                out.setdefault(t, []).extend(ops)
        t0.append(send(c.bcast, m, buf, dtype) if final else recv(c.bcast, m, buf, dtype))
        return {t: ops for t, ops in out.items() if ops}

    def combine_flops(self, m: int) -> int:
        """`kind` operations the all-reduce performs for m elements: (n - 1) per element."""
        return (self.n - 1) * m if self.n > 1 else 0


def flat_chunks(m: int) -> int:
    """Chunks the flat root combines and broadcasts an m-element all-reduce in."""
    return max(1, min(FLAT_ROOT_CHUNKS, m // FLAT_CHUNK_MIN))



def _chain_and_take(c: ReduceColors, par: int, leg: tuple, bcast: int, m: int, buf: int, tmp: int, kind: int,
                    dtype: int) -> dict[int, list[Op]]:
    """A non-root position of a pipelined root's all-reduce (_flat_ops, _pipelined_segment_ops):
    thread 0 passes its partial sum on along its chain leg while thread 1 takes the broadcast on
    `bcast` into `tmp`; thread 0 then moves it into `buf`."""
    col = c.up1 if leg[0] == "up" else c.down1
    t0 = [signal(SEM_FLAT_CLEAR),
          send(col[par], m, buf, dtype) if leg[1] else
          recv_compute_send(col[1 - par], col[par], kind, m, src0=buf, dtype=dtype),
          wait(SEM_FLAT_BCAST), compute(isa.KIND_MOV, m, dst=buf, src0=tmp, dtype=dtype), signal(SEM_TMP_FREE)]
    t1 = [wait(SEM_FLAT_CLEAR), recv(bcast, m, tmp, dtype), signal(SEM_FLAT_BCAST), wait(SEM_TMP_FREE)]
    return {0: t0, 1: t1}


def _flat_ops(c: ReduceColors, role: tuple, m: int, buf: int, tmp: int, kind: int, dtype: int,
              at_root: dict[int, list[Op]] | None = None) -> dict[int, list[Op]]:
    """The flat variant's ops at a position with this role ((parity, leg) of the one-group line's role()).

    Every PE takes in one wavelet a cycle over its ramp, so nothing may wait for a whole phase.
    The root takes the lower side into `buf` on thread 0 and the upper side into `tmp` on thread
    1, chunk by chunk (FLAT_ROOT_CHUNKS); thread 0 combines each chunk and FLAT_SEND_THREAD
    broadcasts it while the next arrives. Every other position passes its partial sum on
    (thread 0) while thread 1 takes the broadcast into `tmp`: a position still passing partials
    on must take broadcast wavelets too, or the root's broadcast and its chain would wait for
    each other. Thread 0 then moves the sum into `buf`. Thread 1 starts only once thread 0 has
    reached the call (SEM_FLAT_CLEAR: a broadcast thread 0 waits for may still be arriving) and
    takes nothing more into `tmp` before thread 0 has read it (SEM_TMP_FREE). `at_root` ops (the
    hand-off barrier's nested all-reduce) run at the root between the sum and its broadcast, in
    one chunk."""
    par, l1 = role
    if l1[0] in ("up", "down"):
        return _chain_and_take(c, par, l1, c.bcast, m, buf, tmp, kind, dtype)
    lo, hi = (c.up1[1 - par] if l1[1] else None), (c.down1[1 - par] if l1[2] else None)
    t0, t1, ts = [], [], []
    elem = isa.DTYPE_DST_BYTES[dtype]
    for r in split_ranges(m, 1 if at_root else flat_chunks(m)):
        a, k = r.start, len(r)
        at, tt = buf + a * elem, tmp + a * elem
        if lo is not None:
            t0.append(recv_compute(lo, kind, k, dst=at, src0=at, dtype=dtype))
        if hi is not None:
            t1 += [recv(hi, k, tt, dtype), signal(SEM_REDUCE)]
            t0 += [wait(SEM_REDUCE), compute(kind, k, dst=at, src0=at, src1=tt, dtype=dtype)]
        if at_root:  # (its own ops may take `tmp` on thread 1: not before thread 0 has read it)
            t1.append(wait(SEM_TMP_FREE))
            t0.append(signal(SEM_TMP_FREE))
            for t, ops in at_root.items():  # (an all-reduce's: threads 0, 1 and FLAT_SEND_THREAD)
                {0: t0, 1: t1, FLAT_SEND_THREAD: ts}[t].extend(ops)
        t0.append(signal(SEM_FLAT_CHUNK))
        ts += [wait(SEM_FLAT_CHUNK), send(c.bcast, k, at, dtype)]
    ts.append(signal(SEM_FLAT_SENT))
    t0.append(wait(SEM_FLAT_SENT))
    if not at_root:
        t0.append(signal(SEM_TMP_FREE))
        t1.append(wait(SEM_TMP_FREE))
    return {0: t0, 1: t1, FLAT_SEND_THREAD: ts}


def _pipelined_segment_ops(c: ReduceColors, role: tuple, m: int, buf: int, tmp: int, kind: int,
                           dtype: int) -> dict[int, list[Op]]:
    """A segment all-reduce (LineAllReduce.segment_ops' role) whose root combines and
    broadcasts chunk by chunk, on the segment's own routes: its level-1 chains, then its
    broadcast down1[rpar] below the root and up1[rpar] above it.

    The root adds each chunk of the lower side and then of the upper side into `buf` as they
    arrive (both on thread 0: one SRAM write per element and side, where taking the upper side
    into `tmp` and adding it would write twice), and FLAT_SEND_THREAD sends each combined chunk
    both ways while the next arrives, the upper side first; the side not being taken waits in
    its chain's queues. (Sending to the side it took last first: in the other order a position
    next to the root, which takes both the partials it forwards and the broadcast over its one
    ramp, falls in step with the root so that the two wait for each other, for roots of one
    parity — 3,976 against 2,702 cycles for 1,024 elements on 25 PEs.) So
    the root's intake, adds and sends overlap instead of following each other (the plain root
    takes both sides whole, adds, then sends twice). Every other position passes its partial sum
    on (thread 0) while thread 1 takes the broadcast into `tmp` — its first chunks arrive while
    the chain still runs — and thread 0 then moves it into `buf`; the semaphores are the flat
    variant's (_flat_ops). A root with an upper side holds its thread 1 until thread 0 has
    taken it: thread 1 takes a later call's upper side on that color."""
    par, l1, rpar, below = role
    if l1[0] in ("up", "down"):
        return _chain_and_take(c, par, l1, (c.down1 if below else c.up1)[rpar], m, buf, tmp, kind, dtype)
    sides = [(c.up1[1 - par], c.down1[rpar])] if l1[1] else []  # (receive color, broadcast color)
    if l1[2]:
        sides.append((c.down1[1 - par], c.up1[rpar]))
    t0: list[Op] = []
    ts: list[Op] = []
    elem = isa.DTYPE_DST_BYTES[dtype]
    for r in split_ranges(m, flat_chunks(m)):
        k, at = len(r), buf + r.start * elem
        t0 += [recv_compute(rx, kind, k, dst=at, src0=at, dtype=dtype) for rx, _ in sides]
        t0.append(signal(SEM_FLAT_CHUNK))
        ts.append(wait(SEM_FLAT_CHUNK))
        ts += [send(tx, k, at, dtype) for _, tx in reversed(sides)]
    ts.append(signal(SEM_FLAT_SENT))
    t0.append(wait(SEM_FLAT_SENT))
    out = {0: t0, FLAT_SEND_THREAD: ts}
    if l1[2]:  # thread 1 takes a later call's upper side on the color thread 0 took this one's on: not before
        t0.append(signal(SEM_FLAT_CLEAR))
        out[1] = [wait(SEM_FLAT_CLEAR)]
    return out


class LineBroadcast:
    """Broadcast along a line from root position(s): one multicast color."""

    def __init__(self, n: int, color: int):
        self.n = n
        self.color = color

    def routes_for_root(self, root: int) -> dict[int, tuple[str, tuple[str, ...]]]:
        per: dict[int, tuple[str, tuple[str, ...]]] = {}
        for i in range(self.n):
            if i == root:
                tx = tuple(s for s, ok in ((LO, i > 0), (HI, i < self.n - 1)) if ok)
                if tx:
                    per[i] = (RAMP, tx)
            elif i < root:
                per[i] = (HI, (RAMP,) + ((LO,) if i > 0 else ()))
            else:
                per[i] = (LO, (RAMP,) + ((HI,) if i < self.n - 1 else ()))
        return per

    def ops(self, i: int, root: int, m: int, buf: int, dtype: int = isa.DTYPE_FP16) -> list[Op]:
        if self.n == 1 or m == 0:
            return []
        return [send(self.color, m, buf, dtype)] if i == root else [recv(self.color, m, buf, dtype)]
