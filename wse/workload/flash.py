"""Flash decode attention (blocked, online softmax: flash-decoding on the mesh; docs/workloads.md).

A column's cached tokens go in blocks; per block the row's partial scores are reduced among the
rows sharing its heads, then the running maximum, sum and output are rescaled and the block's
probabilities applied to its values; the columns merge at the end. With overlapped blocks
(--flash-blocks) a block's reduction runs on a thread of its own while thread 0 runs the block
before's softmax. The rows' layout, the KV shift and the classic mapping are in attention.py.
"""
from __future__ import annotations

from typing import Callable

from ..trace import signal, wait, compute, fill
from .gemv import ELEM
from .attention import SINK_FLOPS, SINK_FLOPS_BY_HEADS, AttnRow, block_tokens, blocks, by_heads, kv_shift_dims
from .mesh import offsets
from .region import (ADD, C_ATTN, DOT, EXP, EXP_FLOPS, FMAC, MAX, MOV, MUL, RECIP, RECIP_FLOPS, RMAX, RSUM, SCALE,
                     SOFTMAX_FLOPS, SUB, THREADS, SEM_KV_RECEIVED, SEM_KV_SENT, Ops, merge)

# overlapped flash blocks (_run_blocks): the thread reducing a block's scores, and its semaphores
# with thread 0 (region.THREADS counts it; 0-8 are the all-reduces' and the KV shift's)
T_SCORES = THREADS
SEM_SCORES_READY, SEM_SCORES_REDUCED = 9, 10


def flash_ops(ctx, first_col: bool, last_col: bool, parity: int, tc: int, row: AttnRow, xrole: tuple,
              srole: tuple, shift: bool = True, grouped: tuple | None = None) -> Ops:
    """Blocked decode attention with an online softmax (flash-decoding on the mesh).

    The column's tc cached tokens (slots 1..tc) go in blocks of t: per block and head, the
    row's partial scores (an FMAC over the block's tokens per query dim, the cache dim-major),
    all-reduced inside the row block (head-local: `srole`, the column all-reduce's segment
    role; latent attention: the whole column) and scaled by 1/sqrt(head_dim); the running
    maximum m (RMAX), the sum l and output o so far rescaled by exp(m_old - m_new); p =
    exp(s - m); l += sum p (RSUM); o += p . v per value dim (DOT). The columns then merge:
    M = max m along the row, each column's l and o scaled by exp(m - M), both all-reduced in
    one vector, o / l. Scratch is one block, not the context. A row with more heads than a
    block has tokens runs the same steps with its vector ops over the heads (row.by_heads).

    Latent attention in row groups (--mla-groups; grouped = (the column all-reduce's role, whether
    the row is its group's first)): each group attends its own tokens (the first group's take
    the new one and shift: `shift`; the others' stay) and reduces their scores inside the group,
    so after the row merge a row holds its group's m, l and o. The groups then merge down the
    column: M = max m (column all-reduce), l and o scaled by exp(m - M), L = the sum of l over
    the groups (one row of each contributes it), o / L. Each row's o is then its group's share
    of the output on its latent dims; the value up-projection's column all-reduce adds them."""
    out = kv_shift_dims(ctx, first_col, last_col, parity, tc, row) if shift else {0: []}
    receives = shift and not first_col
    if row.by_heads:
        _flash_by_heads(ctx, first_col, receives, tc, row, xrole, srole, grouped, out)
    else:
        _flash_by_head(ctx, first_col, receives, tc, row, xrole, srole, grouped, out)
    if shift and not last_col:
        out[0].append(wait(SEM_KV_SENT))
    return out


def _merge_groups(ctx, grouped: tuple, s: int, m0: int, m1: int, al: int, lsum: int, z: int, out: Ops,
                  factors: Callable[[], list], scale_o: Callable[[int], list]) -> None:
    """The row groups' merge down the column (flash_ops), after the row merge left the group's
    maximum in `al`, its sum in `lsum` and its output unnormalized: al = M over the groups (a
    column MAX all-reduce; m0 keeps the group's), m0 = exp(m0 - M) (`factors`), l and o scaled
    by it, L = the column sum of l at each group's first row (m1, zero elsewhere), o / L."""
    yrole, lead = grouped
    ry, tmp = ctx.ry, ctx.plan.buf["tmp"]
    out[0].append(compute(MOV, s, dst=m0, src0=al))
    merge(out, ry.role_ops(yrole, s, al, tmp, MAX))
    t0 = out[0]
    t0 += factors()
    t0.append(compute(MUL, s, dst=lsum, src0=lsum, src1=m0))
    t0 += scale_o(m0)
    t0.append(compute(MOV, s, dst=m1, src0=lsum) if lead else fill(s, m1, z))
    merge(out, ry.role_ops(yrole, s, m1, tmp))
    t0 = out[0]
    t0.append(compute(RECIP, s, dst=al, src0=m1))
    t0 += scale_o(al)


def _flash_buffers(ctx, row: AttnRow) -> tuple:
    """What both flash variants use: the plan, the row all-reduce, the batch, the buffers (zeros,
    scores, all-reduce scratch, output accumulators, constants), the statistics' length (one per
    head and sequence), the running maxima (two, ping-pong between blocks), the rescale factors
    and the running sums (after the output accumulators)."""
    plan, b_ = ctx.plan, ctx.plan.buf
    B, st, att = plan.params.batch, b_["stats"], b_["att"]
    s = row.hb * B
    return (plan, ctx.rx, B, b_, b_["zeros"], b_["sc"], b_["tmp"], att, b_["consts"], s, [st, st + s * ELEM],
            st + 2 * s * ELEM, att + row.hb * row.vh * B * ELEM)


def _column_blocks(plan, tc: int, hb: int) -> tuple[list[int], list[int]]:
    """A column's flash blocks (tokens each) and each block's first cache slot (slots 1..tc)."""
    bks = blocks(tc, block_tokens(plan.params, hb))
    return bks, [1 + a for a in offsets(bks)]


def _open_block(receives: bool, e: int, sc: int, z: int) -> list:
    """A block's first ops: its e scores cleared, and (the block with slot tc, receives) the wait
    for the token the column west of it passed."""
    return [fill(e, sc, z)] + ([wait(SEM_KV_RECEIVED)] if receives else [])


def _run_blocks(ctx, srole: tuple, lengths: list[int], scores: Callable[[int, int], list],
                softmax: Callable[[int, int], list], out: Ops) -> None:
    """A row's flash blocks: block k's scores (thread 0, `scores(k, buffer)`), their reduction
    among the rows sharing the heads (ctx.seg_reduce), then its softmax and values
    (`softmax(k, buffer)`, thread 0).

    Serial (--flash-blocks serial): one block after another, the reduction's own ops on thread 0.
    Overlapped: the reduction's thread-0 ops run on thread T_SCORES, so block k + 1's scores are
    reduced while thread 0 runs block k's softmax and values and block k + 2's scores, in two
    score buffers taken in turn; thread 0 signals SEM_SCORES_READY when a block's scores are
    written and waits for SEM_SCORES_REDUCED before its softmax. Thread 0 runs no other
    all-reduce meanwhile, so the reductions' semaphores keep one user at a time."""
    plan = ctx.plan
    bufs = [plan.buf["sc"]] + ([plan.buf["sc2"]] if plan.overlap else [])
    n = len(lengths)
    if not plan.overlap:
        for k, e in enumerate(lengths):
            out[0].extend(scores(k, bufs[0]))
            merge(out, ctx.seg_reduce(srole, e, bufs[0]))
            out[0].extend(softmax(k, bufs[0]))
        return
    reduced = []  # whether block k's reduction has ops here (one row alone has none)
    for k in range(n + 1):
        if k < n:
            sc = bufs[k % 2]
            out[0].extend(scores(k, sc))
            red = ctx.seg_reduce(srole, lengths[k], sc)
            reduced.append(bool(red))
            if red:
                out[0].append(signal(SEM_SCORES_READY))
                out.setdefault(T_SCORES, []).extend(
                    [wait(SEM_SCORES_READY)] + red.pop(0, []) + [signal(SEM_SCORES_REDUCED)])
                merge(out, red)
        if k:
            if reduced[k - 1]:
                out[0].append(wait(SEM_SCORES_REDUCED))
            out[0].extend(softmax(k - 1, bufs[(k - 1) % 2]))


def _flash_by_head(ctx, first_col: bool, receives: bool, tc: int, row: AttnRow, xrole: tuple, srole: tuple,
                   grouped: tuple | None, out: Ops) -> Ops:
    """flash_ops head by head: per head and query dim an FMAC over a block's tokens, per head an
    RMAX, EXP and RSUM, per head and value dim a DOT (rows with few heads and long blocks)."""
    plan, rx, B, b_, z, sc, tmp, att, c, s, m, al, lsum = _flash_buffers(ctx, row)
    hb, kh, vh = row.hb, row.kh, row.vh
    oj = hb * vh
    heads = [(b, h) for b in range(B) for h in range(hb)]

    def stat(base: int, b: int, h: int) -> int:
        return base + (b * hb + h) * ELEM

    def o_at(b: int, h: int) -> int:
        return att + (b * oj + h * vh) * ELEM

    out[0].append(fill(oj * B + s, att, z))  # o = 0, l = 0
    bks, starts = _column_blocks(plan, tc, hb)
    st = {"cur": 0}  # the running maximum's buffer (ping-pong)

    def sc_at(sc: int, t: int, b: int, h: int) -> int:
        return sc + (b * hb + h) * t * ELEM

    def scores(k: int, sc: int) -> list:
        t, s0 = bks[k], starts[k]
        return _open_block(k == len(bks) - 1 and receives, hb * t * B, sc, z) + [
            compute(FMAC, t, dst=sc_at(sc, t, b, h), src0=row.at(b, h // row.g * kh + dd, s0), src1=row.q_at(b, h, dd))
            for b, h in heads for dd in range(kh)]

    def softmax(k: int, sc: int) -> list:
        t, s0, cur = bks[k], starts[k], st["cur"]
        t0 = [compute(SCALE, hb * t * B, dst=sc, src0=sc, src1=c + C_ATTN * ELEM)]
        nxt = 1 - cur if k else cur
        if k:
            t0.append(compute(MOV, s, dst=m[nxt], src0=m[cur]))
        for b, h in heads:
            if not k:
                t0.append(compute(MOV, 1, dst=stat(m[cur], b, h), src0=sc_at(sc, t, b, h)))
            t0.append(compute(RMAX, t, dst=stat(m[nxt], b, h), src0=sc_at(sc, t, b, h)))
        if k:  # the sum and output so far rescaled by exp(m_old - m_new)
            t0 += [compute(EXP, 1, dst=stat(al, b, h), src0=stat(m[cur], b, h), src1=stat(m[nxt], b, h))
                   for b, h in heads]
            t0.append(compute(MUL, s, dst=lsum, src0=lsum, src1=al))
            t0 += [compute(SCALE, vh, dst=o_at(b, h), src0=o_at(b, h), src1=stat(al, b, h)) for b, h in heads if vh]
            st["cur"] = cur = nxt
        for b, h in heads:
            t0.append(compute(EXP, t, dst=sc_at(sc, t, b, h), src0=sc_at(sc, t, b, h), src1=stat(m[cur], b, h)))
            t0.append(compute(RSUM, t, dst=stat(lsum, b, h), src0=sc_at(sc, t, b, h)))
            t0 += [compute(DOT, t, dst=o_at(b, h) + dv * ELEM, src0=sc_at(sc, t, b, h),
                           src1=row.at(b, row.v_dim(h // row.g, dv), s0)) for dv in range(vh)]
        return t0
    _run_blocks(ctx, srole, [hb * t * B for t in bks], scores, softmax, out)
    cur = st["cur"]
    t0 = out[0]
    if not bks and receives:  # (a column with no token)
        t0.append(wait(SEM_KV_RECEIVED))
    # merge the columns: global maximum, each column's share rescaled, summed in one vector
    sink = "sinks" in b_ and first_col and hb
    t0.append(compute(MOV, s, dst=al, src0=m[cur]))
    if sink:  # each head's sink logit joins the maximum (not m: the column's sum and output are relative to m)
        t0 += [compute(MAX, hb, dst=stat(al, b, 0), src0=stat(al, b, 0), src1=b_["sinks"]) for b in range(B)]
    merge(out, rx.role_ops(xrole, s, al, tmp, MAX))
    t0 = out[0]
    t0 += [compute(EXP, 1, dst=stat(m[cur], b, h), src0=stat(m[cur], b, h), src1=stat(al, b, h)) for b, h in heads]
    t0.append(compute(MUL, s, dst=lsum, src0=lsum, src1=m[cur]))
    t0 += [compute(SCALE, vh, dst=o_at(b, h), src0=o_at(b, h), src1=stat(m[cur], b, h)) for b, h in heads if vh]
    if sink:  # exp(sink - M) joins the sum
        sx = b_["sink_exp"]
        t0 += [compute(EXP, 1, dst=stat(sx, b, h), src0=b_["sinks"] + h * ELEM, src1=stat(al, b, h))
               for b, h in heads]
        t0.append(compute(ADD, s, dst=lsum, src0=lsum, src1=sx))
    merge(out, rx.role_ops(xrole, oj * B + s, att, tmp))

    def scale_o(f: int) -> list:
        return [compute(SCALE, vh, dst=o_at(b, h), src0=o_at(b, h), src1=stat(f, b, h)) for b, h in heads if vh]
    if grouped:
        _merge_groups(ctx, grouped, s, m[cur], m[1 - cur], al, lsum, z, out,
                      lambda: [compute(EXP, 1, dst=stat(m[cur], b, h), src0=stat(m[cur], b, h), src1=stat(al, b, h))
                               for b, h in heads], scale_o)
        return out
    t0 = out[0]
    t0.append(compute(RECIP, s, dst=al, src0=lsum))
    t0 += scale_o(al)
    return out


def _flash_by_heads(ctx, first_col: bool, receives: bool, tc: int, row: AttnRow, xrole: tuple, srole: tuple,
                    grouped: tuple | None, out: Ops) -> Ops:
    """flash_ops for a row with more heads than a block has tokens (latent attention's 128 heads
    over a few latent dims; a row holding several KV heads at a short context): every vector op
    runs over the heads — per token and query dim an FMAC of the query's heads (dim-major,
    AttnRow.q_vec) times one cached key, the softmax elementwise over the heads, per token and
    value dim an FMAC into the output (dim-major over heads) — so a block costs
    tokens x dims ops, not heads x dims."""
    plan, rx, B, b_, z, sc, tmp, att, c, s, m, al, lsum = _flash_buffers(ctx, row)
    hb, g, kh, vh, nk = row.hb, row.g, row.kh, row.vh, row.nk
    oj = hb * vh

    def vec(base: int, b: int) -> int:  # a sequence's vector over the heads
        return base + b * hb * ELEM

    def o_vec(b: int, dv: int) -> int:
        return att + (b * oj + dv * hb) * ELEM
    out[0].append(fill(oj * B + s, att, z))  # o = 0, l = 0
    bks, starts = _column_blocks(plan, tc, hb)
    st = {"cur": 0}  # the running maximum's buffer (ping-pong)

    def sc_t(sc: int, t: int, b: int, tt: int) -> int:
        return sc + (b * t + tt) * hb * ELEM

    def scores(k: int, sc: int) -> list:
        t, s0 = bks[k], starts[k]
        return _open_block(k == len(bks) - 1 and receives, hb * t * B, sc, z) + [
            compute(FMAC, g, dst=sc_t(sc, t, b, tt) + p * g * ELEM, src0=row.q_vec(b, dd) + p * g * ELEM,
                    src1=row.at(b, p * kh + dd, s0 + tt))
            for b in range(B) for tt in range(t) for p in range(nk) for dd in range(kh)]

    def softmax(k: int, sc: int) -> list:
        t, s0, cur = bks[k], starts[k], st["cur"]
        e = hb * t * B
        t0 = [compute(SCALE, e, dst=sc, src0=sc, src1=c + C_ATTN * ELEM)]
        nxt = 1 - cur if k else cur
        if k:
            t0.append(compute(MOV, s, dst=m[nxt], src0=m[cur]))
        for b in range(B):
            if not k:
                t0.append(compute(MOV, hb, dst=vec(m[cur], b), src0=sc_t(sc, t, b, 0)))
            t0 += [compute(MAX, hb, dst=vec(m[nxt], b), src0=vec(m[nxt], b), src1=sc_t(sc, t, b, tt))
                   for tt in range(0 if k else 1, t)]
        if k:  # the sum and output so far rescaled by exp(m_old - m_new)
            t0 += [compute(SUB, s, dst=al, src0=m[cur], src1=m[nxt]), compute(EXP, s, dst=al, src0=al, src1=z),
                   compute(MUL, s, dst=lsum, src0=lsum, src1=al)]
            t0 += [compute(MUL, hb, dst=o_vec(b, dv), src0=o_vec(b, dv), src1=vec(al, b))
                   for b in range(B) for dv in range(vh)]
            st["cur"] = cur = nxt
        t0 += [compute(SUB, hb, dst=sc_t(sc, t, b, tt), src0=sc_t(sc, t, b, tt), src1=vec(m[cur], b))
               for b in range(B) for tt in range(t)]
        t0.append(compute(EXP, e, dst=sc, src0=sc, src1=z))
        t0 += [compute(ADD, hb, dst=vec(lsum, b), src0=vec(lsum, b), src1=sc_t(sc, t, b, tt))
               for b in range(B) for tt in range(t)]
        t0 += [compute(FMAC, g, dst=o_vec(b, dv) + p * g * ELEM, src0=sc_t(sc, t, b, tt) + p * g * ELEM,
                       src1=row.at(b, row.v_dim(p, dv), s0 + tt))
               for b in range(B) for tt in range(t) for p in range(nk) for dv in range(vh)]
        return t0
    _run_blocks(ctx, srole, [hb * t * B for t in bks], scores, softmax, out)
    cur = st["cur"]
    t0 = out[0]
    if not bks and receives:
        t0.append(wait(SEM_KV_RECEIVED))
    sink = "sinks" in b_ and first_col and hb
    t0.append(compute(MOV, s, dst=al, src0=m[cur]))
    if sink:
        t0 += [compute(MAX, hb, dst=vec(al, b), src0=vec(al, b), src1=b_["sinks"]) for b in range(B)]
    merge(out, rx.role_ops(xrole, s, al, tmp, MAX))
    t0 = out[0]
    t0 += [compute(SUB, s, dst=m[cur], src0=m[cur], src1=al), compute(EXP, s, dst=m[cur], src0=m[cur], src1=z),
           compute(MUL, s, dst=lsum, src0=lsum, src1=m[cur])]
    t0 += [compute(MUL, hb, dst=o_vec(b, dv), src0=o_vec(b, dv), src1=vec(m[cur], b))
           for b in range(B) for dv in range(vh)]
    if sink:
        sx = b_["sink_exp"]
        t0 += [compute(SUB, hb, dst=vec(sx, b), src0=b_["sinks"], src1=vec(al, b)) for b in range(B)]
        t0 += [compute(EXP, s, dst=sx, src0=sx, src1=z), compute(ADD, s, dst=lsum, src0=lsum, src1=sx)]
    merge(out, rx.role_ops(xrole, oj * B + s, att, tmp))

    def scale_o(f: int) -> list:
        return [compute(MUL, hb, dst=o_vec(b, dv), src0=o_vec(b, dv), src1=vec(f, b)) for b in range(B) for dv in range(vh)]
    if grouped:
        m0 = m[cur]
        _merge_groups(ctx, grouped, s, m0, m[1 - cur], al, lsum, z, out,
                      lambda: [compute(SUB, s, dst=m0, src0=m0, src1=al), compute(EXP, s, dst=m0, src0=m0, src1=z)],
                      scale_o)
        return out
    t0 = out[0]
    t0.append(compute(RECIP, s, dst=al, src0=lsum))
    t0 += scale_o(al)
    return out


def flash_flops(plan) -> dict[str, int]:
    """Executed FLOPs of flash_ops over the region, by component (scores, softmax, values,
    allreduce), in closed form per row class and column (per row group and its columns' tokens
    with latent attention's --mla-groups)."""
    B, P, Q = plan.params.batch, plan.P, plan.Q
    q_r, o_r, hb_r = plan.q_r, plan.o_r, plan.heads_r
    ms = plan.mla
    G = ms.groups if ms else 1
    rows_g = [[j for j in range(Q) if ms.group_r[j] == g] for g in range(G)] if G > 1 else [list(range(Q))]
    softmax = scores = values = 0
    sinks = "sinks" in plan.buf
    for rows, T_c in zip(rows_g, plan.T_g):
        T = sum(T_c)
        scores += 2 * sum(q_r[j] for j in rows) * T * B
        values += 2 * sum(o_r[j] for j in rows) * T * B
        for hb, o, n in _row_classes([hb_r[j] for j in rows], [o_r[j] for j in rows]):  # n rows, o value dims in all
            vec = by_heads(plan.params, hb, plan.tc_max)
            bk = block_tokens(plan.params, hb)
            for i, tc in enumerate(T_c):
                nb = len(blocks(tc, bk))
                if vec:  # scale, subtract, exp, sum per score; a max per score but a column's first
                    f = n * ((1 + 1 + EXP_FLOPS + 1 + 1) * hb * tc - (hb if nb else 0))
                    f += max(0, nb - 1) * (n * (1 + EXP_FLOPS + 1) * hb + o)  # exp(m_old - m_new), rescales
                    f += n * (1 + EXP_FLOPS + 1 + RECIP_FLOPS) * hb + 2 * o  # the merge
                    f += n * (1 + EXP_FLOPS + 1) * hb + o if G > 1 else 0  # the groups' merge
                    f += n * SINK_FLOPS_BY_HEADS * hb if i == 0 and sinks else 0
                else:  # scale, max, exp, sum per score
                    f = n * SOFTMAX_FLOPS * hb * tc + max(0, nb - 1) * (n * (EXP_FLOPS + 1) * hb + o)
                    f += n * (EXP_FLOPS + 1 + RECIP_FLOPS) * hb + 2 * o
                    f += n * (EXP_FLOPS + 1) * hb + o if G > 1 else 0
                    f += n * SINK_FLOPS * hb if i == 0 and sinks else 0
                softmax += f * B
    if G > 1:  # each group's scores reduced inside it; the groups' maxima and sums down every column
        red_y = sum((len(rows) - 1) * hb_r[0] * sum(T_c) * B for rows, T_c in zip(rows_g, plan.T_g))
        red_y += 2 * P * (Q - 1) * hb_r[0] * B
    else:
        red_y = plan.seg_flops(sum(plan.T_c) * B) if Q > 1 else 0
    S_hb, S_o = sum(hb_r), sum(o_r)
    ar = red_y + (P - 1) * (S_hb * B + (S_o + S_hb) * B)
    return {"scores": scores, "softmax": softmax, "values": values, "allreduce": ar}


def _row_classes(hb_r: list[int], o_r: list[int]) -> list[tuple[int, int, int]]:
    """(hb, sum of o over those rows, rows) per distinct hb."""
    d: dict[int, list[int]] = {}
    for hb, o in zip(hb_r, o_r):
        v = d.setdefault(hb, [0, 0])
        v[0] += o
        v[1] += 1
    return [(hb, o, n) for hb, (o, n) in d.items()]
