"""Decode attention of a layer region over its shift-based KV cache (docs/workloads.md).

The KV cache of the context is split over the region's columns (tokens) and rows (K/V
dimensions, each row's query dimensions kept with the key/value dimensions they attend with).
Column 0 appends the new token and every column passes its oldest entry one column east (the
KV shift, threads 2 and 3); the last column drops it, so a sliding-window layer's cache of
its window is the same program. Per cached token a row computes a dot product over its query
dimensions; scores are all-reduced down the columns, softmax statistics and weighted values
along the rows. Attention sinks (a learned logit per head that takes part in the softmax
and weights no value) enter the row's maximum and sum at column 0.
"""
from __future__ import annotations

import dataclasses

from ..trace import recv, send, signal, wait, compute
from .gemv import ELEM
from .mesh import split
from .plan import KV_SHIFT
from .region import (ADD, EXP_FMACS, FMAC, MAX, MOV, MUL, SCALE, SEM_KV_READY, SEM_KV_RECEIVED, SEM_KV_SENT, Ops,
                     merge)

SINK_FLOPS = 1 + 1 + 2 * EXP_FMACS + 1  # per head and sequence: max, subtract, exp, add to the sum
BLOCK_ELEMENTS = 1024  # [U] flash: score elements (heads x tokens x batch) per block when not given


@dataclasses.dataclass(frozen=True)
class HeadRows:
    """Flash attention's cut of the attention dimensions over a region's Q rows.

    Rows come in `segments` consecutive blocks, one per KV head (Q >= kv_heads; a head's dims
    split over its block's rows) or one per row (Q < kv_heads: each row holds whole KV heads),
    so a head's scores are reduced inside its block and every row of the block has them.
    Latent attention (one latent shared by every head) is one block of all rows."""

    q_r: list[int]
    k_r: list[int]
    o_r: list[int]
    hb_r: list[int]  # heads whose scores row j needs (its block's query heads)
    segments: int  # blocks of rows (1: the whole column)


def attention_segments(spec, Q: int, params) -> int:
    """Row blocks whose scores flash attention reduces inside the block (0: none of its own,
    the column all-reduce serves). Only GQA with 1 < kv_heads < Q has them; every region
    builder of a model passes its spec to `reducers`, so a region's column all-reduce (and
    with it the hand-off barrier) is the same in full and stage traces."""
    if spec is None or params.attention != "flash" or spec.mla:
        return 0
    return spec.kv_heads if 1 < spec.kv_heads < Q else 0


def head_rows(spec, Q: int) -> HeadRows:
    """Head-aligned split of q, k/v and the attention output over Q rows (not for MLA)."""
    kvh, hd, g = spec.kv_heads, spec.head_dim, spec.heads // spec.kv_heads
    if Q >= kvh:
        k_r = [d for n in split(Q, kvh) for d in split(hd, n)]
        hb_r, segments = [g] * Q, kvh
    else:
        per = split(kvh, Q)
        k_r, hb_r, segments = [n * hd for n in per], [g * n for n in per], Q
    q_r = [g * k for k in k_r]
    return HeadRows(q_r, k_r, list(q_r), hb_r, segments)


def block_tokens(params, hb: int) -> int:
    """Cached tokens per flash block on a column: --attention-block, else as many as keep a
    block's scores within BLOCK_ELEMENTS."""
    return params.attention_block or max(1, BLOCK_ELEMENTS // max(1, hb * params.batch))


def blocks(tc: int, bk: int) -> list[int]:
    """A column's tc tokens in blocks of bk (the last one shorter)."""
    return [min(bk, tc - a) for a in range(0, tc, bk)]


def attention_ops(ctx, first_col: bool, last_col: bool, parity: int, tc: int, qj: int, kv_len: int,
                  kv_src: int, oj: int, o_stride: int, hj: int, xrole: tuple, yrole: tuple) -> Ops:
    """Decode attention of the row's heads over the column's cached tokens: per token, a
    qj-long dot product and an oj-long weighted value; kv_len cached elements per token
    (`ctx` is the layer's LayerCtx)."""
    plan, rx, ry = ctx.plan, ctx.rx, ctx.ry
    B = plan.params.batch
    b_ = plan.buf
    dot, sc, scal, tmp, att = b_["dot"], b_["sc"], b_["scal"], b_["tmp"], b_["att"]
    qkv, kvc = b_["qkv"], b_["kv"]
    out = kv_shift_ops(ctx, first_col, last_col, parity, tc, kv_len, kv_src)
    # scores: per sequence and cached token, a dot product over the row's query dimensions
    out[0] += [compute(FMAC, qj, dst=dot, src0=qkv) for _ in range(B * tc)]
    ns = plan.spec.heads * tc * B
    merge(out, ry.role_ops(yrole, ns, sc, tmp))
    # softmax over the tokens of the heads this row owns
    e = hj * tc * B
    sink = "sinks" in b_ and first_col and hj
    if e:
        out[0].append(compute(MAX, e, dst=sc, src0=sc, src1=dot))
    if sink:  # each head's sink logit joins its maximum
        out[0] += [compute(MAX, hj, dst=scal + b * hj * ELEM, src0=scal + b * hj * ELEM, src1=b_["sinks"])
                   for b in range(B)]
    merge(out, rx.role_ops(xrole, hj * B, scal, tmp, MAX))
    if e:
        out[0].append(compute(SCALE, e, dst=sc, src0=sc))  # s - max
        out[0] += [compute(FMAC, e, dst=sc, src0=dot) for _ in range(EXP_FMACS)]
        out[0].append(compute(FMAC, e, dst=dot, src0=sc))  # sum
    if sink:  # exp(sink - max) joins the sum
        sx = b_["sink_exp"]
        out[0].append(compute(SCALE, hj * B, dst=sx, src0=scal))
        out[0] += [compute(FMAC, hj * B, dst=sx, src0=sx) for _ in range(EXP_FMACS)]
        out[0].append(compute(ADD, hj * B, dst=scal, src0=scal, src1=sx))
    merge(out, rx.role_ops(xrole, hj * B, scal, tmp))
    if e:
        out[0].append(compute(SCALE, e, dst=sc, src0=sc))  # / sum
    # every row needs every head's probabilities for its value dimensions
    merge(out, ry.role_ops(yrole, ns, sc, tmp))
    # weighted values: per sequence and token an FMAC over the row's output dimensions
    if oj:
        out[0] += [compute(FMAC, oj, dst=att + b * o_stride, src0=kvc) for b in range(B) for _ in range(tc)]
    return merge(out, rx.role_ops(xrole, oj * B, att, tmp))


def kv_shift_ops(ctx, first_col: bool, last_col: bool, parity: int, tc: int, kv_len: int, kv_src: int) -> Ops:
    """The shift-based KV cache: column 0 appends the new token, every column passes its
    oldest entry east (threads 2 and 3), the last column drops it."""
    B, kvc = ctx.plan.params.batch, ctx.plan.buf["kv"]
    kv = kv_len * B
    t0 = [compute(MOV, kv, dst=kvc, src0=kv_src)] if first_col else []
    t0.append(signal(SEM_KV_READY))
    t2 = [wait(SEM_KV_READY)]
    t3 = []
    if not last_col:
        t2 += [send(KV_SHIFT[parity], kv, kvc), signal(SEM_KV_SENT)]
        t0.append(wait(SEM_KV_SENT))
    if not first_col:
        t3 += [recv(KV_SHIFT[1 - parity], kv, kvc + tc * kv * ELEM), signal(SEM_KV_RECEIVED)]
        t0.append(wait(SEM_KV_RECEIVED))
    return {0: t0, 2: t2, 3: t3}


def flash_ops(ctx, first_col: bool, last_col: bool, parity: int, tc: int, qj: int, kv_len: int, kv_src: int,
              oj: int, o_stride: int, hb: int, xrole: tuple, srole: tuple) -> Ops:
    """Blocked decode attention with an online softmax (flash-decoding on the mesh).

    The column's tc cached tokens go in blocks: per block, the row's partial scores of its
    block's hb heads are all-reduced inside the row block (head-local: `srole`, the column
    all-reduce's segment role; latent attention: the whole column); the running maximum,
    sum and output accumulator are rescaled by exp(m_old - m_new); exp of the scores; sum;
    weighted values. The columns then merge (max all-reduced along the row, each column's
    sum and output rescaled by exp(m - M), both all-reduced in one vector, output / sum).
    Scratch is one block, not the context."""
    plan, rx = ctx.plan, ctx.rx
    B, b_ = plan.params.batch, plan.buf
    dot, sc, tmp, att, st = b_["dot"], b_["sc"], b_["tmp"], b_["att"], b_["stats"]
    qkv, kvc = b_["qkv"], b_["kv"]
    out = kv_shift_ops(ctx, first_col, last_col, parity, tc, kv_len, kv_src)
    s = hb * B  # statistics: one per head and sequence
    m = [st, st + s * ELEM]  # running maximum, ping-pong between blocks
    al = st + 2 * s * ELEM  # rescale factors
    lsum = att + B * o_stride  # running sums follow the output accumulators
    t0 = out[0]
    bk = block_tokens(plan.params, hb)
    cur = 0
    for k, t in enumerate(blocks(tc, bk)):
        e = hb * t * B
        t0 += _products(B, t, qj, dot, qkv, 0)
        merge(out, ctx.seg_reduce(srole, e, sc))
        t0.append(compute(MAX, e, dst=m[1 - cur] if k else m[cur], src0=sc, src1=dot))
        if k:  # new maximum, and the sum and output so far rescaled by exp(m_old - m_new)
            t0.append(compute(MAX, s, dst=m[1 - cur], src0=m[1 - cur], src1=m[cur]))
            cur = 1 - cur
            t0 += _exp_ops(s, al, m[cur])
            t0.append(compute(MUL, s, dst=lsum, src0=lsum, src1=al))
            t0 += [compute(MUL, oj, dst=att + b * o_stride, src0=att + b * o_stride, src1=al) for b in range(B) if oj]
        t0.append(compute(SCALE, e, dst=sc, src0=sc))  # s - m
        t0 += [compute(FMAC, e, dst=sc, src0=dot) for _ in range(EXP_FMACS)]
        t0.append(compute(FMAC, e, dst=dot, src0=sc))  # sum
        t0 += _products(B, t, oj, att, kvc, o_stride)
    # merge the columns: global maximum, each column's share rescaled, summed in one vector
    sink = "sinks" in b_ and first_col and hb
    if sink:  # each head's sink logit joins its maximum
        t0 += [compute(MAX, hb, dst=m[cur] + b * hb * ELEM, src0=m[cur] + b * hb * ELEM, src1=b_["sinks"])
               for b in range(B)]
    t0.append(compute(MOV, s, dst=al, src0=m[cur]))
    merge(out, rx.role_ops(xrole, s, al, tmp, MAX))
    t0 = out[0]
    t0.append(compute(SCALE, s, dst=m[cur], src0=m[cur]))  # m - M (the factor lands in m)
    t0 += [compute(FMAC, s, dst=m[cur], src0=al) for _ in range(EXP_FMACS)]
    t0.append(compute(MUL, s, dst=lsum, src0=lsum, src1=m[cur]))
    t0 += [compute(MUL, oj, dst=att + b * o_stride, src0=att + b * o_stride, src1=m[cur]) for b in range(B) if oj]
    if sink:  # exp(sink - M) joins the sum
        sx = b_["sink_exp"]
        t0 += _exp_ops(s, sx, al)
        t0.append(compute(ADD, s, dst=lsum, src0=lsum, src1=sx))
    merge(out, rx.role_ops(xrole, oj * B + s, att, tmp))
    t0 = out[0]
    t0.append(compute(SCALE, s, dst=al, src0=lsum))  # 1 / sum
    t0 += [compute(MUL, oj, dst=att + b * o_stride, src0=att + b * o_stride, src1=al) for b in range(B) if oj]
    return out


def _products(B: int, t: int, n: int, dst: int, src: int, stride: int) -> list:
    """A block's t tokens x n dims of multiply-adds per sequence, as FMACs along whichever
    axis is longer: per token over the row's n dims (the cache token-major), or per dim over
    the block's tokens (dim-major, as a layout keeping the longer vectors would store it), so
    the ops' setup is paid on the fewer, longer vectors."""
    if not n or not t:
        return []
    count, length = (t, n) if n >= t else (n, t)
    return [compute(FMAC, length, dst=dst + b * stride, src0=src) for b in range(B) for _ in range(count)]


def _exp_ops(n: int, dst: int, src: int) -> list:
    """exp(x - y) of n elements into dst: the subtraction, then EXP_FMACS FMACs."""
    return [compute(SCALE, n, dst=dst, src0=src)] + [compute(FMAC, n, dst=dst, src0=dst) for _ in range(EXP_FMACS)]


def flash_flops(plan) -> dict[str, int]:
    """Executed FLOPs of flash_ops over the region, by component (scores, softmax, values,
    allreduce), in closed form over its columns' blocks and its rows."""
    B, P, Q = plan.params.batch, plan.P, plan.Q
    q_r, o_r, hb_r = plan.q_r, plan.o_r, plan.heads_r
    T = sum(plan.T_c)
    S_hb, S_o = sum(hb_r), sum(o_r)
    nb = {}  # blocks per column, per row class (the block size depends on the row's heads)
    rescale = 0  # blocks after a column's first: new max (1), exp (1 + 2 EXP_FMACS), sum and output (1 each)
    for hb, o, n_rows in _row_classes(hb_r, o_r):
        bk = block_tokens(plan.params, hb)
        nb[hb] = sum(max(0, len(blocks(tc, bk)) - 1) for tc in plan.T_c)
        rescale += nb[hb] * (n_rows * (1 + 1 + 2 * EXP_FMACS + 1) * hb * B + o * B)
    merge_ = P * ((1 + 2 * EXP_FMACS + 1 + 1) * S_hb * B + 2 * S_o * B)  # exp(m - M), rescale, 1/sum, scale
    if "sinks" in plan.buf:
        merge_ += SINK_FLOPS * S_hb * B  # at column 0
    softmax = (1 + 1 + 2 * EXP_FMACS + 2) * S_hb * T * B + rescale + merge_
    red_y = plan.seg_flops(T * B) if Q > 1 else 0
    ar = red_y + (P - 1) * (S_hb * B + (S_o + S_hb) * B)
    return {"scores": 2 * sum(q_r) * T * B, "softmax": softmax, "values": 2 * S_o * T * B, "allreduce": ar}


def _row_classes(hb_r: list[int], o_r: list[int]) -> list[tuple[int, int, int]]:
    """(hb, sum of o over those rows, rows) per distinct hb."""
    d: dict[int, list[int]] = {}
    for hb, o in zip(hb_r, o_r):
        v = d.setdefault(hb, [0, 0])
        v[0] += o
        v[1] += 1
    return [(hb, o, n) for hb, (o, n) in d.items()]
