"""Building mesh-sized traces fast: regions, axis roles, program classes and bulk routes.

A workload on a region of the mesh is a sequence of steps (local vector ops, collectives along
X or Y, transfers). What a PE does in a step depends only on its role along X, its role along Y
and its position relative to the region's diagonal, so PEs with the same (X role, Y role,
diagonal side) share one program: a region of 10^5 PEs needs a few hundred programs, built
once each and assigned with numpy indexing. Routes are added per line in bulk the same way.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Hashable, Iterable

import numpy as np

from .. import isa
from ..engine.tables import route_order
from ..errors import TraceError
from ..tensors import TensorRecorder
from ..trace import ROUTE_COLUMNS, UNTAGGED, Op, Tag, Programs, Trace, _column, with_tag

# Sides of a position on a line: toward the lower index, toward the higher index, the CE.
LO, HI, RAMP = "lo", "hi", "ramp"
Ops = dict[int, list[Op]]  # thread -> ops


@dataclasses.dataclass(frozen=True)
class Axis:
    """One axis of a region: X (lo = west, hi = east) or Y (lo = north, hi = south)."""

    name: str
    lo_port: int
    hi_port: int

    def port(self, side: str) -> int:
        return {LO: self.lo_port, HI: self.hi_port, RAMP: isa.PORT_RAMP}[side]


X = Axis("x", isa.PORT_WEST, isa.PORT_EAST)
Y = Axis("y", isa.PORT_NORTH, isa.PORT_SOUTH)


@dataclasses.dataclass(frozen=True)
class Region:
    """A P_x x P_y block of PEs with its origin at mesh column x0, row y0."""

    x0: int
    y0: int
    width: int
    height: int

    def size(self, axis: Axis) -> int:
        return self.width if axis is X else self.height


def split(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal integer chunks (larger chunks first)."""
    return list(_split(total, parts))


@functools.lru_cache(maxsize=8192)
def _split(total: int, parts: int) -> tuple[int, ...]:
    q, r = divmod(total, parts)
    return (q + 1,) * r + (q,) * (parts - r)


def split_ranges(total: int, parts: int) -> list[range]:
    """0 .. total-1 in `parts` consecutive ranges of the sizes `split` gives (larger first)."""
    out, start = [], 0
    for n in split(total, parts):
        out.append(range(start, start + n))
        start += n
    return out


def head_runs(heads: int, width: int, parts: int) -> list[tuple[tuple[int, int, int], ...]]:
    """heads x width elements (head-major) cut over `parts` chunks (split): per chunk, its pieces
    of each head as (head, position in the chunk, length)."""
    out, o0 = [], 0
    for n in split(heads * width, parts):
        o1 = o0 + n
        out.append(tuple((h, max(o0, h * width) - o0, min(o1, (h + 1) * width) - max(o0, h * width))
                         for h in range(o0 // width, (o1 - 1) // width + 1)) if n else ())
        o0 = o1
    return out


def offsets(sizes: list[int]) -> list[int]:
    return [int(v) for v in np.cumsum([0] + sizes[:-1])]


ALIGN_BYTES = 16  # Allocator: buffers start at multiples of this (plus a bank-group offset)


class Allocator:
    """Region-uniform SRAM allocation: every PE of a region uses the same addresses.

    Buffers are ALIGN_BYTES aligned; `used` records the bytes a PE really needs per buffer (its
    largest share), so padding = allocated - used stays visible.
    """

    def __init__(self, base: int, limit: int):
        self.base = self.top = base
        self.limit = limit
        self.buffers: dict[str, tuple[int, int, str]] = {}  # name -> (addr, bytes, kind)

    def alloc(self, name: str, nbytes: int, kind: str, bank_offset: int = 0) -> int:
        """Reserve nbytes; `bank_offset` (bytes, < 16) shifts the start to another bank group."""
        if name in self.buffers:
            raise ValueError(f"buffer {name} allocated twice")
        addr = -(-self.top // ALIGN_BYTES) * ALIGN_BYTES + bank_offset
        self.top = addr + max(nbytes, 0)
        self.buffers[name] = (addr, nbytes, kind)
        return addr

    def addr(self, name: str) -> int:
        return self.buffers[name][0]

    def bytes_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, nbytes, kind in self.buffers.values():
            out[kind] = out.get(kind, 0) + nbytes
        return out

    @property
    def used(self) -> int:
        return self.top - self.base


Step = Callable[[tuple, tuple, dict], Ops]


class RegionProgram:
    """Steps of one region's workload, with per-axis role tables.

    `x_roles[i]` / `y_roles[j]` are hashable role descriptions of column i / row j (whatever
    the steps need to know about a position). A few PEs may also carry a `special` role (set
    with mark(); e.g. the PE that receives an input lane). A step is called as
    `step(xr, yr, sp)` with the PE's column roles, row roles and special role (None for most
    PEs) and returns {thread: ops}.
    """

    def __init__(self, region: Region, threads: int):
        self.region = region
        self.threads = threads
        self.steps: list[Step] = []
        self.x_roles: list[list[Hashable]] = [[] for _ in range(region.width)]
        self.y_roles: list[list[Hashable]] = [[] for _ in range(region.height)]
        self.special: dict[tuple[int, int], dict[str, Hashable]] = {}
        self.thread_roles: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        # the threads whose ops program_ids is building now (all of them outside it): a step may
        # skip building the others, which are discarded
        self.building: frozenset[int] = frozenset(range(threads))

    def add_roles(self, axis: Axis, roles: list[Hashable]) -> int:
        """Append one role column for an axis; returns its index in the per-position tuples."""
        table = self.x_roles if axis is X else self.y_roles
        assert len(roles) == len(table)
        for t, r in zip(table, roles):
            t.append(r)
        return len(table[0]) - 1

    def mark(self, x: int, y: int, key: str, value: Hashable) -> None:
        """Give PE (x, y) of the region the special role key=value."""
        self.special.setdefault((x, y), {})[key] = value

    def add(self, step: Step) -> None:
        self.steps.append(step)

    def ops_of(self, xr: tuple, yr: tuple, sp: dict | None) -> dict[int, list[Op]]:
        """All threads' ops of a PE with these roles."""
        out: dict[int, list[Op]] = {}
        for step in self.steps:
            for t, ops in step(xr, yr, sp or {}).items():
                out.setdefault(t, []).extend(ops)
        return out


    def program_ids(self, builder: "MeshBuilder") -> None:
        """Build each distinct PE program once and assign it to every PE of the region.

        `self.thread_roles[t] = (x_columns, y_columns)` may declare that thread t's ops depend
        only on those role columns (indices into the position's role entries laid end to end); its programs are then built once per distinct value of
        them (the steps must honour that), which keeps position-dependent threads cheap.
        """
        R = self.region
        builder.ensure_threads(self.threads)
        skeys = [None] + list(dict.fromkeys(tuple(sorted(v.items())) for v in self.special.values()))
        sidx = {k: i for i, k in enumerate(skeys)}
        sid = np.zeros((R.height, R.width), dtype=np.int64)
        for (x, y), v in self.special.items():
            sid[y, x] = sidx[tuple(sorted(v.items()))]
        groups: dict[tuple, list[int]] = {}
        for t in range(self.threads):
            cols = self.thread_roles.get(t)
            groups.setdefault(cols, []).append(t)
        for cols, threads in groups.items():
            self.building = frozenset(threads)
            xc, yc = cols if cols is not None else (None, None)
            xkeys = [tuple(r) if xc is None else tuple(_flat(r)[c] for c in xc) for r in self.x_roles]
            ykeys = [tuple(r) if yc is None else tuple(_flat(r)[c] for c in yc) for r in self.y_roles]
            xu = {k: i for i, k in enumerate(dict.fromkeys(xkeys))}
            yu = {k: i for i, k in enumerate(dict.fromkeys(ykeys))}
            xrep = {xu[k]: i for i, k in reversed(list(enumerate(xkeys)))}
            yrep = {yu[k]: j for j, k in reversed(list(enumerate(ykeys)))}
            xid = np.array([xu[k] for k in xkeys], dtype=np.int64)
            yid = np.array([yu[k] for k in ykeys], dtype=np.int64)
            code = (yid[:, None] * len(xu) + xid[None, :]) * len(skeys) + sid
            uniq, inverse = np.unique(code, return_inverse=True)
            inverse = inverse.reshape(code.shape)
            pids = np.full((len(uniq), len(threads)), -1, dtype=np.int64)
            for u, c in enumerate(uniq):
                rest, s_ = divmod(int(c), len(skeys))
                yk, xk = divmod(rest, len(xu))
                sp = dict(skeys[s_]) if skeys[s_] is not None else None
                ops_by_thread = self.ops_of(tuple(self.x_roles[xrep[xk]]), tuple(self.y_roles[yrep[yk]]), sp)
                for t in ops_by_thread:
                    if t >= self.threads:
                        raise ValueError(f"step used thread {t}; region has {self.threads}")
                for n, t in enumerate(threads):
                    ops = ops_by_thread.get(t)
                    if ops:
                        pids[u, n] = builder.program(ops)
            for n, t in enumerate(threads):
                builder.pe_program[R.y0:R.y0 + R.height, R.x0:R.x0 + R.width, t] = pids[inverse, n]
        self.building = frozenset(range(self.threads))


def _flat(entries: list) -> tuple:
    out: list = []
    for e in entries:
        out.extend(e if isinstance(e, tuple) else (e,))
    return tuple(out)


class MeshBuilder:
    """Routes in bulk and deduplicated programs for a whole mesh; builds a Trace."""

    def __init__(self, width: int, height: int, threads: int = 1, **meta: str):
        self.width, self.height = width, height
        self.pe_program = np.full((height, width, threads), -1, dtype=np.int32)
        self._routes: list[np.ndarray] = []  # each [n, 4]: pe, color, rx, tx mask
        self._programs = Programs()
        self.meta = {k: str(v) for k, v in meta.items()}
        self.tags: list[Tag] = [UNTAGGED]
        self._tag_ids: dict[Tag, int] = {UNTAGGED: 0}
        self.tensors = TensorRecorder()  # where the kernel's tensors live (functional runs)

    def tag(self, name: str, layer: int = -1, kind: str = "") -> int:
        """Id of a workload-level op tag (created on first use)."""
        t = Tag(name, layer, kind)
        if t not in self._tag_ids:
            self._tag_ids[t] = len(self.tags)
            self.tags.append(t)
        return self._tag_ids[t]

    def ensure_threads(self, threads: int) -> None:
        if threads > self.pe_program.shape[2]:
            extra = np.full((self.height, self.width, threads - self.pe_program.shape[2]), -1, np.int32)
            self.pe_program = np.concatenate([self.pe_program, extra], axis=2)

    def program(self, ops: Iterable[Op]) -> int:
        return self._programs.add(ops)

    def routes(self, x: np.ndarray, y: np.ndarray, color: int | np.ndarray, rx: np.ndarray,
               tx: np.ndarray) -> None:
        """Add routes at PEs (x, y) (arrays); rx ports and tx port masks (arrays)."""
        x, y = np.asarray(x, np.int64), np.asarray(y, np.int64)
        n = x.size
        a = np.empty((n, 4), dtype=np.int64)
        a[:, 0] = y * self.width + x
        a[:, 1] = color
        a[:, 2] = rx
        a[:, 3] = tx
        self._routes.append(a)

    def line_routes(self, region: Region, axis: Axis, color: int,
                    per_position: dict[int, tuple[str, tuple[str, ...]]],
                    lines: np.ndarray | None = None) -> None:
        """Routes of one color on every line of `region` along `axis` (or the given lines).

        per_position maps a position on the line to (rx side, tx sides). Each line (row for X,
        column for Y) gets the same routes.
        """
        if not per_position:
            return
        pos = sorted(per_position)
        codes = [_route_code(axis is X, per_position[p]) for p in pos]
        rx = np.array([c[0] for c in codes], dtype=np.int64)
        tx = np.array([c[1] for c in codes], dtype=np.int64)
        pos = np.array(pos, dtype=np.int64)
        other = region.height if axis is X else region.width
        lines = np.arange(other) if lines is None else np.asarray(lines, np.int64)
        pp, ll = np.meshgrid(pos, lines, indexing="xy")
        rr = np.broadcast_to(rx[None, :], pp.shape)
        tt = np.broadcast_to(tx[None, :], pp.shape)
        if axis is X:
            xs, ys = region.x0 + pp, region.y0 + ll
        else:
            xs, ys = region.x0 + ll, region.y0 + pp
        self.routes(xs.ravel(), ys.ravel(), color, rr.ravel(), tt.ravel())

    def build(self) -> Trace:
        ops, starts, lens = self._programs.pack()
        r = np.concatenate(self._routes) if self._routes else np.zeros((0, 4), np.int64)
        order = route_order(r[:, 0], r[:, 1], self.width * self.height)  # (compiled: by PE, then color)
        pe, color = r[order, 0], r[order, 1]
        same = np.nonzero((pe[1:] == pe[:-1]) & (color[1:] == color[:-1]))[0]
        if len(same):
            dup = r[order[same[0] + 1]]
            raise TraceError(f"internal: two routes for color {dup[1]} at PE "
                             f"({dup[0] % self.width}, {dup[0] // self.width})")
        routes = {name: _column(f"route field {name}", r[:, i], dt) for i, (name, dt) in enumerate(ROUTE_COLUMNS)}
        return Trace(self.width, self.height, routes, ops, starts, lens, self.pe_program.copy(), dict(self.meta),
                     list(self.tags), self.tensors.build())


@functools.cache
def _route_code(along_x: bool, route: tuple[str, tuple[str, ...]]) -> tuple[int, int]:
    """A line route's (rx port, tx port mask) from its (rx side, tx sides) along X or Y."""
    axis = X if along_x else Y
    return axis.port(route[0]), isa.tx_mask(*(axis.port(side) for side in route[1]))


def tagged(part: dict[int, list[Op]], tag: int) -> dict[int, list[Op]]:
    """The ops of `part` (thread -> ops) labelled with a workload-level tag."""
    return {t: [with_tag(op, tag) if op.tag == 0 else op for op in ops] for t, ops in part.items()}
