"""Synthetic traffic and compute patterns with closed-form cycle counts (docs/model.md §2)."""
from __future__ import annotations

from typing import Callable

from .. import isa
from ..errors import TraceError
from ..trace import Tag, Trace, TraceBuilder, compute, recv, recv_compute, recv_compute_send, send

E, W_, N_, S_, R_ = isa.PORT_EAST, isa.PORT_WEST, isa.PORT_NORTH, isa.PORT_SOUTH, isa.PORT_RAMP
FP16_BYTES = isa.DTYPE_SRC_BYTES[isa.DTYPE_FP16]


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise TraceError(msg)


def _buffer_end(n: int, nbytes: int = FP16_BYTES, align: int = 16) -> int:
    """First 16-byte-aligned address after an n-element buffer at 0."""
    return -(-n * nbytes // align) * align


def stream(width: int, height: int, wavelets: int, hops: int) -> Trace:
    """PE (0, 0) sends `wavelets` fp16 elements to PE (hops, 0) on color 0."""
    _need(1 <= hops < width, f"stream: --hops must be in [1, {width - 1}] for a mesh {width} wide")
    b = TraceBuilder(width, height, 1, pattern="stream", wavelets=wavelets, hops=hops)
    b.route(0, 0, 0, R_, [E])
    for x in range(1, hops):
        b.route(x, 0, 0, W_, [E])
    b.route(hops, 0, 0, W_, [R_])
    b.assign(0, 0, 0, [send(0, wavelets, 0)])
    b.assign(hops, 0, 0, [recv(0, wavelets, 0)])
    return b.build()


def neighbor(width: int, height: int, wavelets: int, colors: int = 2) -> Trace:
    """Every PE with an east neighbour sends `wavelets` to it; PE x uses color x mod `colors`."""
    _need(width >= 2, "neighbor: the mesh must be at least 2 wide")
    _need(colors >= 2, "neighbor: needs at least 2 colors (one in, one out per PE)")
    b = TraceBuilder(width, height, 2, pattern="neighbor", wavelets=wavelets, colors=colors)
    rbuf = _buffer_end(wavelets)
    for y in range(height):
        for x in range(width):
            if x + 1 < width:
                b.route(x, y, x % colors, R_, [E])
                b.assign(x, y, 0, [send(x % colors, wavelets, 0)])
            if x > 0:
                b.route(x, y, (x - 1) % colors, W_, [R_])
                b.assign(x, y, 1, [recv((x - 1) % colors, wavelets, rbuf)])
    return b.build()


def contention(width: int, height: int, wavelets: int, hops: int) -> Trace:
    """Two streams on colors 0 and 1 share the `hops` east links from (1, 1) to (hops+1, 1).

    A: (0, 1) east to (hops+2, 1). B: (1, 2) north into (1, 1), east, then north to
    (hops+1, 0). Both paths are hops+2 links long and meet at router (1, 1) in the same cycle.
    """
    _need(hops >= 1 and width >= hops + 3 and height >= 3,
          f"contention: needs --hops >= 1, a mesh at least (hops+3) x 3; got {width}x{height}, hops {hops}")
    b = TraceBuilder(width, height, 1, pattern="contention", wavelets=wavelets, hops=hops)
    b.route(0, 1, 0, R_, [E])
    for x in range(1, hops + 2):
        b.route(x, 1, 0, W_, [E])
    b.route(hops + 2, 1, 0, W_, [R_])
    b.route(1, 2, 1, R_, [N_])
    b.route(1, 1, 1, S_, [E])
    for x in range(2, hops + 1):
        b.route(x, 1, 1, W_, [E])
    b.route(hops + 1, 1, 1, W_, [N_])
    b.route(hops + 1, 0, 1, S_, [R_])
    b.assign(0, 1, 0, [send(0, wavelets, 0)])
    b.assign(1, 2, 0, [send(1, wavelets, 0)])
    b.assign(hops + 2, 1, 0, [recv(0, wavelets, 0)])
    b.assign(hops + 1, 0, 0, [recv(1, wavelets, 0)])
    return b.build()


def broadcast(width: int, height: int, wavelets: int, hops: int | None = None) -> Trace:
    """PE (0, 0) multicasts `wavelets` to PEs (1..hops, 0) on color 0 (default: the whole row)."""
    hops = width - 1 if hops is None else hops
    _need(1 <= hops < width, f"broadcast: --hops must be in [1, {width - 1}]")
    b = TraceBuilder(width, height, 1, pattern="broadcast", wavelets=wavelets, hops=hops)
    b.route(0, 0, 0, R_, [E])
    b.assign(0, 0, 0, [send(0, wavelets, 0)])
    for x in range(1, hops + 1):
        b.route(x, 0, 0, W_, [R_, E] if x < hops else [R_])
        b.assign(x, 0, 0, [recv(0, wavelets, 0)])
    return b.build()


def chain_reduce(width: int, height: int, elements: int, hops: int | None = None) -> Trace:
    """Pipelined chain sum of an `elements`-long fp16 vector over PEs (0..hops, 0).

    PE 0 sends its vector; each middle PE adds its own and forwards (receive-compute-send),
    alternating colors 0/1; PE `hops` adds into its accumulator (receive-compute).
    """
    hops = width - 1 if hops is None else hops
    _need(1 <= hops < width, f"chain-reduce: --hops must be in [1, {width - 1}]")
    b = TraceBuilder(width, height, 1, pattern="chain-reduce", elements=elements, hops=hops)
    vec, acc = 0, _buffer_end(elements)
    b.route(0, 0, 0, R_, [E])
    b.assign(0, 0, 0, [send(0, elements, vec)])
    for x in range(1, hops + 1):
        cin, cout = (x - 1) % 2, x % 2
        b.route(x, 0, cin, W_, [R_])
        if x < hops:
            b.route(x, 0, cout, R_, [E])
            b.assign(x, 0, 0, [recv_compute_send(cin, cout, isa.KIND_ADD, elements, src0=vec)])
        else:
            b.assign(x, 0, 0, [recv_compute(cin, isa.KIND_ADD, elements, dst=acc, src0=vec)])
    return b.build()


def compute_pattern(width: int, height: int, elements: int) -> Trace:
    """Every PE runs one fp16 FMAC over `elements` elements, operands in different banks."""
    b = TraceBuilder(width, height, 1, pattern="compute", elements=elements)
    # The accumulator at 0 and the source 4 bytes past a 16-byte boundary: bank groups differ.
    op = compute(isa.KIND_FMAC, elements, dst=0, src0=_buffer_end(elements) + 4)
    for y in range(height):
        for x in range(width):
            b.assign(x, y, 0, [op])
    return b.build()


def _tag_all(make: Callable[..., Trace]) -> Callable[..., Trace]:
    """Label every op of the pattern's trace with one tag: the pattern's name."""
    def wrapped(*args, **kw) -> Trace:
        tr = make(*args, **kw)
        name = tr.meta.get("pattern", make.__name__)
        tr.tags = list(tr.tags) + [Tag(name, -1, "synthetic")]
        tr.ops["tag"][:] = len(tr.tags) - 1
        return tr
    wrapped.__doc__ = make.__doc__
    wrapped.__name__ = make.__name__
    return wrapped


stream, neighbor, contention, broadcast, chain_reduce, compute_pattern = (
    _tag_all(f) for f in (stream, neighbor, contention, broadcast, chain_reduce, compute_pattern))

PATTERNS: dict[str, Callable[..., Trace]] = {
    "stream": stream,
    "neighbor": neighbor,
    "contention": contention,
    "broadcast": broadcast,
    "chain-reduce": chain_reduce,
    "compute": compute_pattern,
}
