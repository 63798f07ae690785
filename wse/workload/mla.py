"""Multi-head latent attention (DeepSeek-V3, Kimi K2) on a P x P layer region: sizes and the
per-PE ops of the weight-absorbed decode mapping (docs/workloads.md).

Decode caches one shared latent per token, c = [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)],
and absorbs the key and value up-projections into the query and output sides, so attention is
multi-query attention over the latent:

    q_a | c   = xn . W_a                      (reduce X: rows hold chunks of both)
    q         = RMSNorm(q_a) . W_qb           (reduce Y: columns hold chunks of heads x (nope|rope))
    q_abs[h]  = [q_nope[h] . W_uk[h]^T | q_pe[h]]   (reduce X: rows hold the cache's dims, all heads)
    scores    = q_abs . c over the cached tokens, softmax, o_lat[h] = sum_t p[h,t] c_kv[t]
    o         = o_lat[h] . W_uv[h]            (reduce Y: columns hold chunks of heads x v_head_dim)
    out       = o . W_o                       (reduce X), then a transpose back to column layout

Rows own the cache's dimensions: row j holds the slice c_r[j] of the 576-wide latent (v_r[j]
of them in c_kv, r_r[j] in k_pe) for the tokens of its column. The absorbed GEMVs are block
diagonal (one block per head): PE (i, j) multiplies only the heads whose q or o dimensions sit
on column i. q_pe joins q_abs by moves (no weights); the all-reduce along the row sums the
columns' contributions. The transpose back is a broadcast from each diagonal PE down its column.
"""
from __future__ import annotations

import dataclasses

from ..trace import Op, compute, recv, send
from .gemv import ELEM, gemv_ops
from .mesh import split
from .plan import DIAG_BCAST
from .region import FMAC, MOV, MUL, SCALE, Ops, merge


@dataclasses.dataclass(frozen=True)
class MlaSplit:
    """How the latent attention's vectors are cut over a P x P region."""

    P: int  # columns (rows: len(c_r))
    heads: int
    qa_r: list[int]  # per row: q_a (q_lora_rank) dims
    c_r: list[int]  # per row: cache (latent + rope) dims
    v_r: list[int]  # per row: of those, latent (c_kv) dims
    rope_lo: list[int]  # per row: first rope index of its rope dims (r_r of them)
    r_r: list[int]  # per row: rope dims
    qn_r: list[int]  # per column: q dims, heads x (nope + rope), head-major
    nope_runs: list[tuple[tuple[int, int, int], ...]]  # per column: (head, position, count) of nope dims
    pe_runs: list[tuple[tuple[int, int, int, int], ...]]  # per column: (head, rope first, last + 1, position)
    oh_r: list[int]  # per column: o dims, heads x v_head_dim, head-major
    oh_runs: list[tuple[tuple[int, int, int], ...]]  # per column: (head, position, count) of o dims

    @property
    def nope_n(self) -> list[int]:
        """Per column: nope dims (absorbed through W_uk)."""
        return [sum(n for _, _, n in runs) for runs in self.nope_runs]

    @property
    def a_r(self) -> list[int]:
        """Per row: the first GEMV's output, q_a and the cache entry."""
        return [q + c for q, c in zip(self.qa_r, self.c_r)]


def pe_moves(pe_runs: tuple, rope_lo: int, r_r: int, v_r: int) -> list[tuple[int, int, int, int]]:
    """Moves of q_pe into the absorbed query on a PE whose column has `pe_runs` and whose row
    holds rope dims rope_lo .. rope_lo + r_r - 1 after v_r latent dims: (head, offset in the
    row's cache slice, length, position in the column's q chunk)."""
    out = []
    for h, r0, r1, pos in pe_runs:
        a, b = max(r0, rope_lo), min(r1, rope_lo + r_r)
        if a < b:
            out.append((h, v_r + a - rope_lo, b - a, pos + a - r0))
    return out


def mla_split(spec, P: int, Q: int | None = None) -> MlaSplit:
    """Cut a MLA layer's vectors over P columns and Q rows (default P; Q at most the cache
    width: one dimension per row)."""
    Q = Q or P
    m = spec.mla
    heads, nope, rope, vd = spec.heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    width = m.kv_lora_rank + rope
    c_r = split(width, Q)
    v_r, r_r, rope_lo = [], [], []
    c0 = 0
    for c in c_r:
        c1 = c0 + c
        v_r.append(max(0, min(c1, m.kv_lora_rank) - c0))
        lo = max(c0, m.kv_lora_rank)
        r_r.append(max(0, c1 - lo))
        rope_lo.append(lo - m.kv_lora_rank)
        c0 = c1
    qk = nope + rope
    qn_r, nope_runs, pe_runs = split(heads * qk, P), [], []
    q0 = 0
    for n in qn_r:
        q1 = q0 + n
        nr, pr = [], []
        for h in range(q0 // qk, (q1 - 1) // qk + 1):
            t0, t1 = max(q0 - h * qk, 0), min(q1 - h * qk, qk)
            if t0 < nope:
                nr.append((h, h * qk + t0 - q0, min(t1, nope) - t0))
            if t1 > nope:
                a = max(t0, nope)
                pr.append((h, a - nope, t1 - nope, h * qk + a - q0))
        nope_runs.append(tuple(nr))
        pe_runs.append(tuple(pr))
        q0 = q1
    oh_r, oh_runs = split(heads * vd, P), []
    o0 = 0
    for n in oh_r:
        o1 = o0 + n
        oh_runs.append(tuple((h, max(o0, h * vd) - o0, min(o1, (h + 1) * vd) - max(o0, h * vd))
                             for h in range(o0 // vd, (o1 - 1) // vd + 1)))
        o0 = o1
    return MlaSplit(P, heads, split(m.q_lora_rank, Q), c_r, v_r, rope_lo, r_r, qn_r, nope_runs, pe_runs, oh_r,
                    oh_runs)


def mla_project_ops(ctx, i: int, ja: int, xm: tuple, ym: tuple, xrole: tuple, yrole: tuple) -> Ops:
    """Latent attention's projections on PE (i, row ja's class): q_a | c, their norms, RoPE on
    k_pe, q, RoPE on q_pe, and the absorbed query q_abs over the row's cache dims (`ctx` is
    the layer's LayerCtx)."""
    plan, rx, ry = ctx.plan, ctx.rx, ctx.ry
    ms, S, b_, B = plan.mla, plan.shapes, plan.buf, plan.params.batch
    xn, qkv, tmp, dot = b_["xn"], b_["qkv"], b_["tmp"], b_["dot"]
    hstride = max(plan.Hc) * ELEM
    iq, qn, nope_runs, pe_runs = xm[:4]
    jqa, qa, c, v, rope_lo, r = ym[:6]
    ast, qst, cst = max(plan.qkv_r) * ELEM, max(ms.qn_r) * ELEM, max(plan.q_r) * ELEM
    aj = plan.qkv_r[ja]
    out = {0: gemv_ops(S["a"], i, ja, xn, qkv, B, hstride, ast)}
    merge(out, rx.role_ops(xrole, aj * B, qkv, tmp))
    # RMSNorm of q_a and of c_kv: sums of squares, one column all-reduce for both
    for b in range(B):
        out[0].append(compute(FMAC, qa, dst=dot, src0=qkv + b * ast))
        if v:
            out[0].append(compute(FMAC, v, dst=dot, src0=qkv + b * ast + qa * ELEM))
    merge(out, ry.role_ops(yrole, 2 * B, b_["scal"], tmp))
    out[0].append(compute(SCALE, (qa + v) * B, dst=qkv, src0=qkv))
    for b in range(B):
        out[0].append(compute(MUL, qa, dst=qkv + b * ast, src0=qkv + b * ast, src1=b_["g_qa"]))
        if v:
            out[0].append(compute(MUL, v, dst=qkv + b * ast + qa * ELEM, src0=qkv + b * ast + qa * ELEM,
                                  src1=b_["g_kv"]))
    if r:  # RoPE on the row's k_pe dims
        out[0] += [compute(MUL, r * B, dst=qkv, src0=qkv, src1=dot), compute(FMAC, r * B, dst=qkv, src0=dot)]
    # q = q_a . W_qb (reduce Y): column chunks of every head's nope | rope dims
    out[0] += gemv_ops(S["qb"], jqa, iq, qkv, b_["q"], B, ast, qst)
    merge(out, ry.role_ops(yrole, qn * B, b_["q"], tmp))
    pe = qn - sum(n for _, _, n in nope_runs)
    if pe:  # RoPE on the column's q_pe dims
        out[0] += [compute(MUL, pe * B, dst=b_["q"], src0=b_["q"], src1=dot),
                   compute(FMAC, pe * B, dst=b_["q"], src0=dot)]
    # q_abs = [q_nope . W_uk^T | q_pe] on the row's cache dims (reduce X)
    qa_ = b_["qabs"]
    for b in range(B):
        row = 0
        for hd, pos, n in nope_runs:
            for t in range(n):
                if v:
                    out[0].append(compute(FMAC, v, dst=qa_ + b * cst + hd * c * ELEM,
                                          src0=S["uk"].weights + row * S["uk"].pitch,
                                          src1=b_["q"] + b * qst + (pos + t) * ELEM))
                row += 1
        for hd, off, n, pos in pe_moves(pe_runs, rope_lo, r, v):
            out[0].append(compute(MOV, n, dst=qa_ + b * cst + (hd * c + off) * ELEM,
                                  src0=b_["q"] + b * qst + pos * ELEM))
    return merge(out, rx.role_ops(xrole, plan.spec.heads * c * B, qa_, tmp))


def mla_output_ops(ctx, i: int, jo: int, xm: tuple, ym: tuple, xrole: tuple, yrole: tuple, sp: dict) -> Ops:
    """o = o_lat . W_uv (reduce Y), out = o . W_o (reduce X), transposed back to column layout
    by a broadcast from the diagonal; leaves the column's chunk in y."""
    plan, rx, ry = ctx.plan, ctx.rx, ctx.ry
    ms, S, b_, B = plan.mla, plan.shapes, plan.buf, plan.params.batch
    att, yb, tmp = b_["att"], b_["y"], b_["tmp"]
    hstride = max(plan.Hc) * ELEM
    io, ohn, oh_runs = xm[4:7]
    v, jh, hj_ = ym[3], ym[6], ym[7]
    ost, ohs = max(plan.o_r) * ELEM, max(ms.oh_r) * ELEM
    ops: list[Op] = []
    for b in range(B):
        for cc in range(v):
            for hd, pos, n in oh_runs:
                ops.append(compute(FMAC, n, dst=b_["oh"] + b * ohs + pos * ELEM,
                                   src0=S["uv"].weights + cc * S["uv"].pitch + pos * ELEM,
                                   src1=att + b * ost + (hd * v + cc) * ELEM))
    out = {0: ops}
    merge(out, ry.role_ops(yrole, ohn * B, b_["oh"], tmp))
    out[0] += gemv_ops(S["o"], io, jh, b_["oh"], yb, B, ohs, hstride)
    merge(out, rx.role_ops(xrole, hj_ * B, yb, tmp))
    if plan.Q > 1:
        if "diag" in sp:
            out[0].append(send(DIAG_BCAST, hj_ * B, yb))
        else:
            out[0].append(recv(DIAG_BCAST, plan.Hc[i] * B, yb))
    return out
