"""What every region program of a decode step shares: bank groups, threads, the region's
all-reduces, the hand-off barrier, the input and output lanes, and what a generator returns.

A region receives its input at one PE per lane (lane d carries hidden chunk d) and hands its
output on at one PE per lane after a hand-off barrier: a region-wide all-reduce of one element
whose single anchor PE (the root of the column all-reduce nested at the row all-reduces' root
column) makes everything after it a pure time shift of the anchor's send. That is what lets a
token's stages compose exactly (decode.py). A region that ends with an FFN (--handoff fused)
nests a one-element row all-reduce at the roots of the FFN's last down all-reduce instead
(handoff_sync): the same anchor PE, one all-reduce less.

Operand placement avoids SRAM bank conflicts the way a compiler would: weights in bank group 0,
a dot-product scratch in group 1, GEMV outputs in group 2, the residual stream and caches in
group 3 (byte offsets 0, 2, 4, 6 from 16-byte boundaries).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Hashable

from .. import isa
from ..errors import WseError
from ..trace import Op, compute, recv, send, with_tag
from .gemv import ELEM
from .collectives import LineAllReduce, LineBroadcast, ReduceColors
from .mesh import X, Y, Allocator, MeshBuilder, Region, RegionProgram
from .params import DecodeParams
from .plan import DIAG_BCAST, REDUCE_BASE, check_groups

FP16 = isa.DTYPE_FP16
MUL, ADD, FMAC, MAX, MOV, SCALE = (isa.KIND_MUL, isa.KIND_ADD, isa.KIND_FMAC, isa.KIND_MAX, isa.KIND_MOV,
                                   isa.KIND_SCALE)
DOT, EXP, RSQRT, RECIP, SILU, RMAX, RSUM, SUB = (isa.KIND_DOT, isa.KIND_EXP, isa.KIND_RSQRT, isa.KIND_RECIP,
                                                 isa.KIND_SILU, isa.KIND_RMAX, isa.KIND_RSUM, isa.KIND_SUB)
EXP_FLOPS, RSQRT_FLOPS, RECIP_FLOPS, SILU_FLOPS = (isa.KIND_FLOPS[k] for k in (EXP, RSQRT, RECIP, SILU))
SOFTMAX_FLOPS = 1 + 1 + EXP_FLOPS + 1  # per score: scale by 1/sqrt(head_dim), max, exp(s - max), sum
SILU_MUL_FLOPS = SILU_FLOPS + 1  # SiLU(gate) * up per element
NORM_SCALE_FLOPS = RSQRT_FLOPS  # per sequence: 1/RMS = rsqrt(mean square + eps)
# Constants a layer region keeps in its `consts` buffer (element index): 1/hidden, the norms'
# epsilon, 1/sqrt(head_dim), 1 (a shared expert's gate)
C_INV_H, C_EPS, C_ATTN, C_ONE = range(4)
N_CONSTS = 4
ZERO_BYTES = 4  # a region's `zeros`: the scalar FILL clears accumulators from (an fp32 zero covers fp16 too)
NORM_EPS = 1e-5  # the RMSNorms' epsilon [U] (Llama 3.1's)
G0, G1, G2, G3 = 0, 2, 4, 6  # byte offsets selecting bank groups 0..3
# semaphores (0 and 4-8 are the all-reduce's, collectives.py; 9 and 10 overlapped flash blocks',
# attention.py)
SEM_KV_READY, SEM_KV_RECEIVED, SEM_KV_SENT = 1, 2, 3
# threads: 0 main, 1 the all-reduces' upper-side and flat broadcast receives, 2 KV shift send,
# 3 KV shift receive, 4 the flat all-reduce root's broadcast sends (a layer region with overlapped
# flash blocks has one more: flash.T_SCORES)
THREADS = 5

Ops = dict[int, list[Op]]  # thread -> ops


@dataclasses.dataclass
class RegionBuild:
    """What a region generator produced besides the programs and routes in the builder."""

    kind: str
    region: Region
    memory: Allocator
    flops: dict[str, int]  # analytic executed FLOPs by component; "allreduce": the collectives' adds
    model_flops: int  # FLOPs of the computation itself, each operation counted once
    weight_bytes: int  # real weight bytes resident (no padding)
    kv_bytes: int  # real KV-cache bytes resident
    anchor: tuple[int, int]  # local (x, y) of the hand-off anchor PE


def reducers(region: Region, builder: MeshBuilder | None, params: DecodeParams, spec=None, cfg=None) -> dict:
    """The all-reduce of each axis of a region (routes added to the builder when given). With
    params.algo "auto" (it needs the wafer `cfg`'s latencies) an unsegmented line's long vectors
    take the flat variant (LineAllReduce.flat_threshold).

    With the model's `spec`, a region whose flash attention reduces scores inside row blocks
    (attention.attention_segments) gets a column all-reduce of that many groups, each also an
    all-reduce of its own (LineAllReduce.segment_ops; with "auto", long ones with a pipelined
    root)."""
    from .attention import attention_segments
    y_segments = attention_segments(spec, region.height, params)
    out = {}
    check_groups(params.groups, params.algo, region)
    for axis in (X, Y):
        n = region.size(axis)
        colors = ReduceColors.from_base(REDUCE_BASE[axis])
        if axis == Y and y_segments:
            red = LineAllReduce(n, colors, groups=y_segments, root="end" if params.algo == "chain" else "middle",
                                segments=True, pipelined_segments=params.algo == "auto")
        elif params.algo == "chain":
            red = LineAllReduce(n, colors, groups=1, root="end")
        elif params.algo in ("two-level", "auto"):
            if params.algo == "auto" and cfg is None:
                raise ValueError("the auto all-reduce needs the wafer configuration")
            flat = (cfg.hop_latency_cycles, cfg.ramp_latency_cycles) if params.algo == "auto" else None
            red = LineAllReduce(n, colors, groups=min(params.groups, n) if params.groups else None, flat_latency=flat)
        else:
            raise WseError(f"unknown all-reduce algorithm {params.algo!r} (auto, two-level, chain)")
        if builder is not None:
            for color, per in red.routes().items():
                builder.line_routes(region, axis, color, per)
        out[axis] = red
    return out


def anchor_of(red: dict) -> tuple[int, int]:
    """Local (x, y) of the hand-off anchor: the column all-reduce root on the row roots' column."""
    return red[X].final_root, red[Y].final_root


def merge(out: Ops, *parts: Ops) -> Ops:
    """Append each part's ops to `out`, thread by thread."""
    for p in parts:
        for t, ops in p.items():
            out.setdefault(t, []).extend(ops)
    return out


def mark(out: Ops) -> dict[int, int]:
    """Where each thread's op list ends now (for retag)."""
    return {t: len(ops) for t, ops in out.items()}


def retag(out: Ops, since: dict[int, int], tag: int) -> None:
    """Label the ops added to `out` since `since` (a mark) with `tag`."""
    for t, ops in out.items():
        start = since.get(t, 0)
        ops[start:] = [with_tag(op, tag) for op in ops[start:]]


class PartCache:
    """Tagged ops of a region builder's parts, remembered by what each part depends on.

    program_ids builds every distinct PE program, and PEs whose roles differ (a row's router
    offset, a column's latent runs) still share most of their parts; a part built once per
    distinct key is reused, tag included, by every program that has it (ops `make` tagged
    already keep their tag: a part may nest another's). `make` must depend on nothing but the
    key (and what is fixed for the region)."""

    enabled = True  # (tests build without it: the programs must be the same)

    def __init__(self, tags: dict[str, int]):
        self.tags = tags
        self.memo: dict[tuple, Ops] = {}
        self.tagged: dict[int, dict[Op, Op]] = {}  # per tag: an untagged op -> its one tagged object

    def add(self, out: Ops, name: str, key: Hashable, make: Callable[[], Ops]) -> None:
        """Append part `name`'s ops for `key` to out (building and tagging them once)."""
        k = (name, key)
        ops = self.memo.get(k) if PartCache.enabled else None
        if ops is None:
            tag = self.tags[name]
            ops = self.memo[k] = {t: self._tag(o, tag) for t, o in make().items()}
        merge(out, ops)

    def _tag(self, ops: list[Op], tag: int) -> list[Op]:
        """ops labelled with tag (those tagged already kept), equal ops as one object: the
        parts built for different keys share most ops, and a program's ops found by object
        (trace.Programs) are cheap. (Looked up with map: a part has hundreds of ops, most seen
        before; an op tagged already maps to itself.)"""
        memo = self.tagged.setdefault(tag, {})
        out = list(map(memo.get, ops))
        if None in out:
            for k, t in enumerate(out):
                if t is None:
                    op = ops[k]
                    t = memo.get(op)  # (an op twice in this part)
                    if t is None:
                        t = memo[op] = op if op.tag else with_tag(op, tag)
                    out[k] = t
        return out


def special_key(sp: dict) -> tuple:
    """A PE's special roles (RegionProgram.mark) as a hashable key."""
    return tuple(sorted(sp.items()))


def handoff(red: dict, xrole: tuple, yrole: tuple, buf: int, tmp: int) -> Ops:
    """The hand-off barrier: a one-element all-reduce over the region with a single anchor."""
    inner = red[Y].role_ops(yrole, 1, buf, tmp) if xrole[-1] else None
    return red[X].role_ops(xrole, 1, buf, tmp, ADD, FP16, at_root=inner)


def handoff_flops(region: Region, fused: bool = False) -> int:
    """Adds of the hand-off's all-reduce: the barrier's over the region, the fused sync's over its root row."""
    return region.width - 1 if fused else region.height * (region.width - 1) + (region.height - 1)


def handoff_sync(red: dict, xrole: tuple, buf: int, tmp: int) -> Ops:
    """A fused hand-off's sync: a one-element row all-reduce nested at the root of every
    column's last FFN down all-reduce (ffn.down_reduce_ops; a MoE layer's last expert's), so
    run by the columns' root row alone.

    When its final root (the anchor, the barrier's PE) has the sum, every PE of the region has
    sent its last partial and waits for a broadcast, and the fabric is empty: what follows — the
    sync's broadcast, the down outputs' broadcast, the residual add, the output lanes — is a pure
    time shift of the anchor, as after the barrier, which it replaces with one row's all-reduce
    (the barrier: every row's, then the root column's)."""
    return red[X].role_ops(xrole, 1, buf, tmp)


def mean_square_ops(count: int, src: int, dst: int, stride: int, n: int, sums: int, inv: int) -> list[Op]:
    """An RMSNorm's mean squares, without fp16 partial sums overflowing: for each of `count`
    vectors (n elements at src + k stride), dst = src times 1/H (the scalar at `inv`), then
    sums[k] += src . dst (the line's all-reduce completes them)."""
    ops: list[Op] = []
    for k in range(count):
        a, x = src + k * stride, dst + k * stride
        ops += [compute(SCALE, n, dst=x, src0=a, src1=inv), compute(DOT, n, dst=sums + k * ELEM, src0=a, src1=x)]
    return ops


def rms_apply_ops(count: int, src: int, dst: int, stride: int, n: int, scal: int, g: int, eps: int) -> list[Op]:
    """An RMSNorm's end, once the `count` mean squares at scal are all-reduced: 1/RMS = rsqrt(mean
    + eps) in place, then each vector scaled by its own and multiplied by the weight g into dst."""
    ops = [compute(RSQRT, count, dst=scal, src0=scal, src1=eps)]
    ops += [compute(SCALE, n, dst=dst + k * stride, src0=src + k * stride, src1=scal + k * ELEM)
            for k in range(count)]
    return ops + [compute(MUL, n, dst=dst + k * stride, src0=dst + k * stride, src1=g) for k in range(count)]


def rope_ops(a: int, n: int, cos: int, sin: int, tmp: int) -> list[Op]:
    """RoPE on n rotary pairs stored as n first halves at a, then their n second halves:
    a' = a cos - b sin, b' = b cos + a sin (six vector ops; tmp holds 2 n elements)."""
    c, t0, t1 = a + n * ELEM, tmp, tmp + n * ELEM
    return [compute(MUL, n, dst=t0, src0=a, src1=sin), compute(MUL, n, dst=t1, src0=c, src1=sin),
            compute(MUL, n, dst=a, src0=a, src1=cos), compute(MUL, n, dst=c, src0=c, src1=cos),
            compute(SUB, n, dst=a, src0=a, src1=t1), compute(ADD, n, dst=c, src0=c, src1=t0)]


def i_chunk(chunks: list[int], i: int) -> int:
    """Index of the first position with the same chunk size (positions with equal sizes share ops)."""
    return chunks.index(chunks[i])


class Lanes:
    """Input and output lanes of a region: lane d carries hidden chunk d.

    in_lanes / out_lanes map lane -> local (x, y). Input lanes are spread along `spread` (Y:
    down the receiver's column, X: along its row) on `bcast_color`.
    """

    def __init__(self, color_in: int | None, in_lanes: dict[int, tuple[int, int]], color_out: int | None,
                 out_lanes: dict[int, tuple[int, int]], spread=Y, bcast_color: int = DIAG_BCAST):
        self.color_in, self.in_lanes = color_in, dict(in_lanes) if color_in is not None else {}
        self.color_out, self.out_lanes = color_out, dict(out_lanes) if color_out is not None else {}
        self.spread, self.bcast_color = spread, bcast_color

    def install(self, builder: MeshBuilder, prog: RegionProgram, spread: bool = True) -> None:
        """Mark the lane PEs; `spread`: add the routes spreading each input lane along its line."""
        R = prog.region
        for d, (x, y) in self.in_lanes.items():
            prog.mark(x, y, "in", d)
        for d, (x, y) in self.out_lanes.items():
            prog.mark(x, y, "out", d)
        n = R.size(self.spread)
        if not self.in_lanes or n == 1 or not spread:
            return
        bc = LineBroadcast(n, self.bcast_color)
        for x, y in self.in_lanes.values():
            line, root = (x, y) if self.spread is Y else (y, x)
            builder.line_routes(R, self.spread, self.bcast_color, bc.routes_for_root(root), lines=[line])

    def receive(self, sp: dict, m: int, buf: int, n_line: int) -> Ops:
        """Receive a lane at its receiver and spread it along the line."""
        return self.receive_parts(sp, [(m, buf)], n_line)

    def receive_parts(self, sp: dict, parts: list[tuple[int, int]], n_line: int) -> Ops:
        """Receive a lane's payload, (elements, buffer) parts in order, and spread each along the line."""
        if self.color_in is None:
            return {}
        ops: list[Op] = []
        for m, buf in parts:
            if "in" in sp:
                ops.append(recv(self.color_in, m, buf))
                if n_line > 1:
                    ops.append(send(self.bcast_color, m, buf))
            elif n_line > 1:
                ops.append(recv(self.bcast_color, m, buf))
        return {0: ops} if ops else {}

    def send(self, sp: dict, m: int, buf: int) -> Ops:
        return self.send_parts(sp, [(m, buf)])

    def send_parts(self, sp: dict, parts: list[tuple]) -> Ops:
        """Send (elements, buffer) parts on the output color, or (elements, buffer, color) parts
        on their own colors (a MoE layer's dispatch and combine)."""
        if self.color_out is None or "out" not in sp:
            return {}
        return {0: [send(p[2] if len(p) > 2 else self.color_out, p[0], p[1]) for p in parts]}
