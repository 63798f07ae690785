"""Decode attention of a layer region over its shift-based KV cache (docs/workloads.md).

The KV cache of the context is split over the region's columns (tokens) and rows (K/V
dimensions, each row's query dimensions kept with the key/value dimensions they attend with).
Column 0 appends the new token and every column passes its oldest entry one column east (the
KV shift, threads 2 and 3); the last column drops it, so a sliding-window layer's cache of
its window is the same program. Rows hold whole heads' rotary pairs (head_rows); each row's
partial scores are reduced over the rows sharing its heads (flash.flash_ops: blocked, online softmax)
or over the whole column with every head's (classic_ops, the baseline); softmax statistics and
weighted values are merged along the rows. Attention sinks (a learned logit per head that
takes part in the softmax and weights no value) enter the row's maximum and sum at column 0.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..trace import recv, send, signal, wait, compute, fill
from .gemv import ELEM
from ..errors import WseError
from .mesh import offsets, split
from .plan import KV_SHIFT
from .region import (ADD, C_ATTN, DOT, EXP, EXP_FLOPS, FMAC, MAX, MOV, RECIP, RECIP_FLOPS, RMAX,
                     RSUM, SCALE, SOFTMAX_FLOPS, SEM_KV_READY, SEM_KV_RECEIVED, SEM_KV_SENT, Ops,
                     merge)

SINK_FLOPS = 1 + EXP_FLOPS + 1  # per head and sequence: max, exp(sink - max), add to the sum
SINK_FLOPS_BY_HEADS = SINK_FLOPS + 1  # ... over the heads (flash._flash_by_heads): the subtraction is its own op
BLOCK_ELEMENTS = 1024  # [U] flash: score elements (heads x tokens x batch) per block when not given


@dataclasses.dataclass(frozen=True)
class HeadRows:
    """Flash attention's cut of the attention dimensions over a region's Q rows.

    Rows come in `segments` consecutive blocks, one per KV head (Q >= kv_heads; a head's dims
    split over its block's rows) or one per row (Q < kv_heads: each row holds whole KV heads),
    so a head's scores are reduced inside its block and every row of the block has them.
    A row's share of a head is whole rotary pairs (dims d and d + head_dim / 2, d from its
    first pair p0_r on), so RoPE needs no other row; with more rows than pairs in a block some
    rows hold none. Latent attention (one latent shared by every head) is one block of all rows."""

    q_r: list[int]
    k_r: list[int]
    o_r: list[int]
    hb_r: list[int]  # heads whose scores row j needs (its block's query heads)
    segments: int  # blocks of rows (1: the whole column)
    kv_r: list[tuple[int, ...]]  # the KV heads row j holds dims of
    p0_r: list[int]  # the first rotary pair of row j's share of each of them
    kh_r: list[int]  # dims row j holds of each of them (2 x its pairs)


def attention_segments(spec, Q: int, params) -> int:
    """Row blocks whose scores flash attention reduces inside the block (0: none of its own,
    the column all-reduce serves). GQA with 1 < kv_heads < Q has them, and latent attention in
    row groups (--mla-groups: each group's blocks hold its own tokens); every region builder of
    a model passes its spec to `reducers`, so a region's column all-reduce (and with it the
    hand-off barrier) is the same in full and stage traces."""
    if spec is None or params.attention != "flash":
        return 0
    if spec.mla:
        return params.mla_groups if 1 < params.mla_groups <= Q else 0
    return spec.kv_heads if 1 < spec.kv_heads < Q else 0


def head_rows(spec, Q: int) -> HeadRows:
    """Head-aligned split of q, k/v and the attention output over Q rows (not for MLA)."""
    kvh, hd, g = spec.kv_heads, spec.head_dim, spec.heads // spec.kv_heads
    if hd % 2:
        raise WseError(f"{spec.name}: head_dim {hd} is odd (rotary pairs need an even one)")
    kv_r, p0_r, kh_r = [], [], []
    if Q >= kvh:
        for h, n in enumerate(split(Q, kvh)):
            pairs = split(hd // 2, n)
            kv_r += [(h,)] * n
            p0_r += offsets(pairs)
            kh_r += [2 * p for p in pairs]
        hb_r, segments = [g] * Q, kvh
    else:
        per = split(kvh, Q)
        kv_r = [tuple(range(a, a + n)) for a, n in zip(offsets(per), per)]
        p0_r, kh_r = [0] * Q, [hd] * Q
        hb_r, segments = [g * n for n in per], Q
    k_r = [len(kv) * kh for kv, kh in zip(kv_r, kh_r)]
    q_r = [g * k for k in k_r]
    return HeadRows(q_r, k_r, list(q_r), hb_r, segments, kv_r, p0_r, kh_r)


def attn_scale(spec) -> float:
    """The softmax's scale 1/sqrt(d): d the head dim, or latent attention's nope + rope dims."""
    m = spec.mla
    return (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5 if m else spec.head_dim ** -0.5


def block_tokens(params, hb: int) -> int:
    """Cached tokens per flash block on a column: --attention-block, else as many as keep a
    block's scores within BLOCK_ELEMENTS."""
    return params.attention_block or max(1, BLOCK_ELEMENTS // max(1, hb * params.batch))


def blocks(tc: int, bk: int) -> list[int]:
    """A column's tc tokens in blocks of bk (the last one shorter)."""
    return [min(bk, tc - a) for a in range(0, tc, bk)]


def owned_heads(spec, Q: int, rows: HeadRows | None) -> list[tuple[int, int, int]]:
    """The classic mapping's softmax owners: per row j, (h0, o0, n): its block's first query
    head h0 (of the model's), and the n heads from o0 on among its block's heads whose softmax
    it computes. A block's heads are split over its rows, so each head has one owner; latent
    attention (rows None) is one block of all heads."""
    if rows is None:
        return [(0, a, n) for a, n in zip(offsets(split(spec.heads, Q)), split(spec.heads, Q))]
    g = spec.heads // spec.kv_heads
    out, j = [], 0
    while j < Q:
        kv, hb = rows.kv_r[j], rows.hb_r[j]
        n = 1
        while j + n < Q and rows.kv_r[j + n] == kv:
            n += 1
        out += [(kv[0] * g, a, c) for a, c in zip(offsets(split(hb, n)), split(hb, n))]
        j += n
    return out


def classic_ops(ctx, first_col: bool, last_col: bool, parity: int, tc: int, row: AttnRow, own: tuple[int, int, int],
                xrole: tuple, yrole: tuple) -> Ops:
    """Classic decode attention (the baseline flash.flash_ops is measured against), on the same rows.

    Every row writes its partial scores of its heads over the column's tc tokens (an FMAC over
    the tokens per head and query dim) into a vector of every head's scores (heads x tc per
    sequence, the others zero), all-reduced down the whole column; each head's softmax is
    computed by the one row that owns it (`own`, owned_heads), its maximum and sum all-reduced
    along the row; the probabilities (zero but for the owned heads) all-reduced down the column
    a second time, so every row has its heads'; per head and value dim a DOT with the column's
    values, all-reduced along the row. Scratch holds every head's scores of the column's
    tokens, so it grows with the context."""
    plan, b_ = ctx.plan, ctx.plan.buf
    B, H = plan.params.batch, plan.spec.heads
    z, sc, tmp, att, c, st = b_["zeros"], b_["sc"], b_["tmp"], b_["att"], b_["consts"], b_["stats"]
    h0, o0, n = own
    hb, kh, vh = row.hb, row.kh, row.vh
    oj, ns, s = hb * vh, H * tc * B, n * B
    mx, sm, rc = st, st + s * ELEM, st + 2 * s * ELEM  # per owned head and sequence: max, sum, 1 / sum

    def sc_at(b: int, h: int) -> int:  # sequence b's scores of the model's head h
        return sc + (b * H + h) * tc * ELEM

    def o_at(b: int, h: int, dv: int) -> int:
        return att + (b * oj + (dv * hb + h if row.by_heads else h * vh + dv)) * ELEM

    def stat(base: int, b: int, k: int) -> int:
        return base + (b * n + k) * ELEM

    out = kv_shift_dims(ctx, first_col, last_col, parity, tc, row)
    t0 = out[0]
    if tc:  # (a column holding no token takes part in the row all-reduces only)
        t0.append(fill(ns, sc, z))
    if oj:
        t0.append(fill(oj * B, att, z))
    if not first_col:
        t0.append(wait(SEM_KV_RECEIVED))  # (slot tc: the token the column west of it passed)
    t0 += [compute(FMAC, tc, dst=sc_at(b, h0 + h), src0=row.at(b, h // row.g * kh + dd, 1), src1=row.q_at(b, h, dd))
           for b in range(B) for h in range(hb) for dd in range(kh) if tc]
    if tc:
        merge(out, ctx.ry.role_ops(yrole, ns, sc, tmp))
    owned = [(b, k) for b in range(B) for k in range(n)]
    t0 = out[0]
    sink = "sinks" in b_ and first_col and n
    for b in range(B if n and tc else 0):
        t0.append(compute(SCALE, n * tc, dst=sc_at(b, h0 + o0), src0=sc_at(b, h0 + o0), src1=c + C_ATTN * ELEM))
    for b, k in owned if tc else ():  # (RMAX takes the larger of its destination and its vector's maximum)
        t0 += [compute(MOV, 1, dst=stat(mx, b, k), src0=sc_at(b, h0 + o0 + k)),
               compute(RMAX, tc, dst=stat(mx, b, k), src0=sc_at(b, h0 + o0 + k))]
    if sink:  # each owned head's sink logit joins its maximum
        t0 += [compute(MAX, n, dst=stat(mx, b, 0), src0=stat(mx, b, 0), src1=b_["sinks"] + o0 * ELEM) for b in range(B)]
    if n:  # (every PE of a row owns the same heads: a row without any takes no part)
        merge(out, ctx.rx.role_ops(xrole, s, mx, tmp, MAX))
    t0 = out[0]
    if n:
        t0.append(fill(s, sm, z))
    for b, k in owned if tc else ():  # exp(s - max), summed
        t0.append(compute(EXP, tc, dst=sc_at(b, h0 + o0 + k), src0=sc_at(b, h0 + o0 + k), src1=stat(mx, b, k)))
        t0.append(compute(RSUM, tc, dst=stat(sm, b, k), src0=sc_at(b, h0 + o0 + k)))
    if sink:  # exp(sink - max) joins the sum
        sx = b_["sink_exp"]
        t0 += [compute(EXP, 1, dst=stat(sx, b, k), src0=b_["sinks"] + (o0 + k) * ELEM, src1=stat(mx, b, k))
               for b, k in owned]
        t0.append(compute(ADD, s, dst=sm, src0=sm, src1=sx))
    if n:
        merge(out, ctx.rx.role_ops(xrole, s, sm, tmp))
        out[0].append(compute(RECIP, s, dst=rc, src0=sm))
    t0 = out[0]
    t0 += [compute(SCALE, tc, dst=sc_at(b, h0 + o0 + k), src0=sc_at(b, h0 + o0 + k), src1=stat(rc, b, k))
           for b, k in owned if tc]
    for b in range(B if tc else 0):  # the heads this row does not own take no part in the sum below
        lo, hi = h0 + o0, h0 + o0 + n
        t0 += [fill(m * tc, sc_at(b, a), z) for a, m in ((0, lo), (hi, H - hi)) if m]
    if tc:
        merge(out, ctx.ry.role_ops(yrole, ns, sc, tmp))
    t0 = out[0]
    t0 += [compute(DOT, tc, dst=o_at(b, h, dv), src0=sc_at(b, h0 + h), src1=row.at(b, row.v_dim(h // row.g, dv), 1))
           for b in range(B) for h in range(hb) for dv in range(vh) if tc]
    if oj:
        merge(out, ctx.rx.role_ops(xrole, oj * B, att, tmp))
    if not last_col:
        out[0].append(wait(SEM_KV_SENT))
    return out


def classic_flops(plan) -> dict[str, int]:
    """Executed FLOPs of classic_ops over the region beyond the model's: each score's softmax
    (scale, max, exp, sum) and its division by the sum, and per head, sequence and column the
    reciprocal of the sum."""
    B, T, heads = plan.params.batch, sum(plan.T_c), plan.spec.heads
    soft = (SOFTMAX_FLOPS + 1) * heads * T * B + RECIP_FLOPS * heads * B * plan.P
    return {"softmax": soft + (SINK_FLOPS * heads * B if "sinks" in plan.buf else 0)}


@dataclasses.dataclass(frozen=True)
class AttnRow:
    """What flash_ops needs of one row: hb query heads in groups of g (a group per KV piece),
    kh score dims and vh value dims per head, where each query scalar and each of this token's
    cache dims live, and the cache layout: per sequence, kd key dims then vd value dims (vd = 0:
    the values are the first vh dims of each key piece, latent attention), each dim's `slots`
    tokens consecutive (dim-major), so a block's tokens are one vector per dim."""

    hb: int
    g: int
    kh: int
    vh: int
    vd: int
    slots: int
    cache: int  # the KV cache buffer
    q_at: Callable[[int, int, int], int]  # (sequence, head, dim) -> address of the query scalar
    new_at: Callable[[int, int], int]  # (sequence, cache dim) -> this token's value of it
    by_heads: bool = False  # vector ops over the heads (flash._flash_by_heads): q and o dim-major

    def q_vec(self, b: int, dd: int) -> int:
        """by_heads: the address of dim dd of every head's query, consecutive."""
        return self.q_at(b, 0, dd)

    @property
    def nk(self) -> int:
        return self.hb // self.g if self.g else 0

    @property
    def kd(self) -> int:
        return self.nk * self.kh

    @property
    def dims(self) -> int:
        return self.kd + self.vd

    def at(self, b: int, d: int, slot: int) -> int:
        return self.cache + ((b * self.dims + d) * self.slots + slot) * ELEM

    def v_dim(self, k: int, dv: int) -> int:
        """The cache dim of value dim dv of KV piece k."""
        return self.kd + k * self.vh + dv if self.vd else k * self.kh + dv


def dense_row(hb: int, g: int, kh: int, qkv: int, qkv_len: int, cache: int, slots: int,
              by_heads: bool = False) -> AttnRow:
    """A dense row's qkv layout, per sequence (qkv_len elements): the first halves of its query
    and key pieces' rotary pairs [qa | ka], their second halves [qb | kb], then v (so RoPE is six
    vector ops over the row); head h's dim dd is its pair dd (dd < kh / 2) or that pair's
    second half. The query heads' halves are head-major, or dim-major (by_heads: dim dd of every
    head consecutive)."""
    pp, nk = kh // 2, hb // g

    def half(first: int, dd: int) -> int:  # the element of [qa | ka] (or, dd - pp, of [qb | kb])
        if by_heads and first < hb:
            return dd * hb + first
        return first * pp + dd

    def pos(b: int, first: int, dd: int) -> int:  # first: a head's index among the halves' heads
        return qkv + (b * qkv_len + (half(first, dd) if dd < pp else (hb + nk) * pp + half(first, dd - pp))) * ELEM

    def new_at(b: int, d: int) -> int:
        if d < nk * kh:
            return pos(b, hb + d // kh, d % kh)
        return qkv + (b * qkv_len + 2 * (hb + nk) * pp + d - nk * kh) * ELEM
    return AttnRow(hb, g, kh, kh, nk * kh, slots, cache, pos, new_at, by_heads)


def by_heads(params, hb: int, tc: int) -> bool:
    """Whether a row's flash attention runs its vector ops over the heads (flash._flash_by_heads): when
    it has more heads than a block of its columns' (at most tc) tokens."""
    return hb > min(block_tokens(params, hb), tc)


def attn_row(plan, qkv_row: tuple | None, qkvj: int, yr: tuple) -> AttnRow:
    """Flash attention's view of a row of a layer plan (layer_sizes.LayerPlan): a dense row's qkv layout
    (dense_row; qkv_row = (heads, KV pieces, dims per piece, by heads)), or latent attention's
    (every head over the row's latent dims yr[0][2], the query absorbed into q_absorbed)."""
    b_, slots = plan.buf, plan.tc_max + 1
    if qkv_row is not None:
        hb, nk, kh, vec = qkv_row
        return dense_row(hb, hb // nk if nk else hb, kh, b_["qkv"], qkvj, b_["kv"], slots, vec)
    heads, kh, qa, v = plan.spec.heads, yr[0][2], yr[1][1], yr[1][3]
    qst, ast = heads * kh * ELEM, qkvj * ELEM  # (the row's vectors back to back, sequence by sequence)
    vec = by_heads(plan.params, heads, plan.tc_max)  # (the absorbed query dim-major when by heads)
    return AttnRow(heads, heads, kh, v, 0, slots, b_["kv"],
                   lambda b, h, dd: b_["qabs"] + b * qst + ((dd * heads + h) if vec else (h * kh + dd)) * ELEM,
                   lambda b, d: b_["qkv"] + b * ast + (qa + d) * ELEM, vec)


def kv_shift_dims(ctx, first_col: bool, last_col: bool, parity: int, tc: int, row: AttnRow) -> Ops:
    """The shift-based KV cache, dim-major: the column attends slots 1..tc; it passes its oldest
    token (slot 0) east (thread 2), the column west of it passes one into slot tc (thread 3);
    column 0 puts this token's keys and values there; the last column drops slot 0. Thread 0
    waits for the received token only before the block holding slot tc, and for its own send
    (which reads slot 0, which attention never touches) only at the end (flash_ops)."""
    B = ctx.plan.params.batch
    cells = [(b, d) for b in range(B) for d in range(row.dims)]
    t0 = [compute(MOV, 1, dst=row.at(b, d, tc), src0=row.new_at(b, d)) for b, d in cells] if first_col else []
    t0.append(signal(SEM_KV_READY))
    t2, t3 = [wait(SEM_KV_READY)], []
    if not last_col:
        t2 += [send(KV_SHIFT[parity], 1, row.at(b, d, 0)) for b, d in cells]
        t2.append(signal(SEM_KV_SENT))
    if not first_col:
        t3 += [recv(KV_SHIFT[1 - parity], 1, row.at(b, d, tc)) for b, d in cells]
        t3.append(signal(SEM_KV_RECEIVED))
    return {0: t0, 2: t2, 3: t3}
