"""Multi-head latent attention (DeepSeek-V3, Kimi K2) on a P x Q layer region: sizes and the
per-PE ops of the weight-absorbed decode mapping (docs/workloads.md).

Decode caches one shared latent per token, c = [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)],
and absorbs the key and value up-projections into the query and output sides, so attention is
multi-query attention over the latent:

    q_a | c   = xn . W_a                      (reduce X: rows hold chunks of both)
    q_a, c_kv = RMSNorm(q_a), RMSNorm(c_kv); k_pe = RoPE(k_pe)
    q         = q_a . W_qb; q_pe = RoPE(q_pe) (reduce Y: columns hold chunks of heads x (nope|rope))
    q_abs[h]  = [q_nope[h] . W_uk[h]^T | q_pe[h]]   (reduce X: rows hold the cache's dims, all heads)
    scores    = q_abs . c / sqrt(nope + rope) over the cached tokens, softmax, o_lat[h] = sum_t p[h,t] c_kv[t]
    o         = o_lat[h] . W_uv[h]            (reduce Y: columns hold chunks of heads x v_head_dim)
    out       = o . W_o                       (reduce X), then a transpose back to column layout

Rows own the cache's dimensions: row j holds v_r[j] dims of c_kv and r_r[j] / 2 whole rotary
pairs of k_pe (dims p and p + rope / 2), stored [latent | first halves | second halves], so
RoPE is six vector ops on the row; a column's chunk of q holds, per head piece, nope dims then
whole rotary pairs laid out the same way. The absorbed GEMVs are block diagonal (one block per
head): PE (i, j) multiplies only the heads whose q or o dimensions sit on column i. q_pe joins
q_abs by moves (no weights); the all-reduce along the row sums the columns' contributions. The
transpose back is a broadcast from each diagonal PE down its column.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ..errors import WseError
from ..trace import Op, compute, recv, send, fill
from .attention import by_heads
from .gemv import ELEM, gemv_ops
from .mesh import head_runs, split
from .plan import DIAG_BCAST
from .region import C_EPS, DOT, FMAC, MOV, MUL, RSQRT, SCALE, Ops, merge, rope_ops

C_INV_QA, C_INV_KV = 0, 1  # the `mla_consts` buffer: 1/q_lora_rank, 1/kv_lora_rank (the latent norms' means)


@dataclasses.dataclass(frozen=True)
class MlaSplit:
    """How the latent attention's vectors are cut over a P x Q region."""

    P: int  # columns (rows: len(c_r))
    heads: int
    qa_r: list[int]  # per row: q_a (q_lora_rank) dims
    c_r: list[int]  # per row: cache dims, v_r latent then r_r rope
    v_r: list[int]  # per row: of those, latent (c_kv) dims
    rope_lo: list[int]  # per row: its first rotary pair (r_r / 2 pairs from it)
    r_r: list[int]  # per row: rope dims (2 x its pairs: first halves, then second halves)
    qn_r: list[int]  # per column: q dims, per head piece [nope | first halves | second halves]
    nope_runs: list[tuple[tuple[int, int, int, int], ...]]  # per column: (head, position, count, first nope dim)
    pe_runs: list[tuple[tuple[int, int, int, int], ...]]  # per column: (head, first pair, last + 1, position)
    oh_r: list[int]  # per column: o dims, heads x v_head_dim, head-major
    oh_runs: list[tuple[tuple[int, int, int], ...]]  # per column: (head, position, count) of o dims
    group_r: list[int] = dataclasses.field(default_factory=list)  # per row: its row group (--mla-groups)
    lead_r: list[int] = dataclasses.field(default_factory=list)  # per row: its group's first row

    @property
    def groups(self) -> int:
        return self.group_r[-1] + 1 if self.group_r else 1

    @property
    def nope_n(self) -> list[int]:
        """Per column: nope dims (absorbed through W_uk)."""
        return [sum(r[2] for r in runs) for runs in self.nope_runs]

    @property
    def a_r(self) -> list[int]:
        """Per row: the first GEMV's output, q_a and the cache entry."""
        return [q + c for q, c in zip(self.qa_r, self.c_r)]

    @property
    def q_pairs(self) -> list[int]:
        """Per column: the rotary pairs of its q_pe dims."""
        return [sum(r1 - r0 for _, r0, r1, _ in runs) for runs in self.pe_runs]

    @property
    def rope_table(self) -> int:
        """Elements of a PE's cos (and sin) table: its column's q pairs (the widest column's
        room), then its row's k pairs."""
        return max(self.q_pairs) + max(self.r_r) // 2


def q_dims(spec, ms: MlaSplit, i: int) -> list[int]:
    """The q dim (head x (nope + rope), head-major; rope dims p and p + rope / 2 a pair) at each
    position of column i's chunk."""
    m = spec.mla
    qk, rp = m.qk_nope_head_dim + m.qk_rope_head_dim, m.qk_rope_head_dim // 2
    out = [0] * ms.qn_r[i]
    for h, pos, n, d0 in ms.nope_runs[i]:
        out[pos:pos + n] = range(h * qk + d0, h * qk + d0 + n)
    for h, r0, r1, pos in ms.pe_runs[i]:
        for half in (0, 1):
            base = h * qk + m.qk_nope_head_dim + half * rp
            out[pos + half * (r1 - r0):pos + (half + 1) * (r1 - r0)] = range(base + r0, base + r1)
    return out


def latent_offset(ms: MlaSplit, j: int) -> int:
    """Row j's first latent (c_kv) dim: the latent dims of the rows before it in its group."""
    return sum(ms.v_r[ms.lead_r[j]:j]) if ms.lead_r else sum(ms.v_r[:j])


def cache_dims(spec, ms: MlaSplit, j: int) -> list[int]:
    """The cache dim (c_kv, then k_pe) at each of row j's cache positions."""
    kvl, rp = spec.mla.kv_lora_rank, spec.mla.qk_rope_head_dim // 2
    v0, lo, n = latent_offset(ms, j), ms.rope_lo[j], ms.r_r[j] // 2
    return list(range(v0, v0 + ms.v_r[j])) + [kvl + half * rp + lo + t for half in (0, 1) for t in range(n)]


def pe_moves(pe_runs: tuple, rope_lo: int, r_r: int, v_r: int) -> list[tuple[int, int, int, int]]:
    """Moves of q_pe into the absorbed query on a PE whose column has `pe_runs` and whose row
    holds pairs rope_lo .. rope_lo + r_r / 2 - 1 after v_r latent dims: (head, offset in the
    row's cache slice, length, position in the column's q chunk), first halves then second."""
    out, rp = [], r_r // 2
    for h, r0, r1, pos in pe_runs:
        a, b = max(r0, rope_lo), min(r1, rope_lo + rp)
        for half in (0, 1) if a < b else ():
            out.append((h, v_r + half * rp + a - rope_lo, b - a, pos + half * (r1 - r0) + a - r0))
    return out


def most_mla_rows(spec) -> int:
    """Rows a latent attention region may have: one latent dim or rotary pair each."""
    return spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim // 2


@functools.lru_cache(maxsize=4096)
def mla_split(spec, P: int, Q: int | None = None, groups: int = 1) -> MlaSplit:
    """Cut a MLA layer's vectors over P columns and Q rows (default P): the rows in `groups`
    consecutive groups (split(Q, groups) rows each), over each of which the cache's latent dims
    and rotary pairs are split as units (a group at most most_mla_rows rows); q_a over all rows.
    Remembered: the placement search plans the same slot sizes over and over (callers must not
    change it)."""
    Q = Q or P
    m = spec.mla
    heads, nope, rope, vd = spec.heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    if rope % 2:
        raise WseError(f"{spec.name}: qk_rope_head_dim {rope} is odd (rotary pairs need an even one)")
    if not 1 <= groups <= Q:
        raise WseError(f"--mla-groups {groups}: a {P}x{Q} region has {Q} rows to group")
    kvl, rp = m.kv_lora_rank, rope // 2
    c_r, v_r, r_r, rope_lo, group_r, lead_r = [], [], [], [], [], []
    for g, rows in enumerate(split(Q, groups)):
        units = np.array(split(kvl + rp, rows), dtype=np.int64)  # a row's latent dims and pairs c0 .. c1-1
        c1 = np.cumsum(units)
        c0 = c1 - units
        v, pairs = np.maximum(0, np.minimum(c1, kvl) - c0), np.maximum(0, c1 - np.maximum(c0, kvl))
        lead_r += [len(c_r)] * rows
        group_r += [g] * rows
        c_r += (v + 2 * pairs).tolist()
        v_r += v.tolist()
        r_r += (2 * pairs).tolist()
        rope_lo += (np.maximum(c0, kvl) - kvl).tolist()
    U = nope + rp  # a head's units: nope dims and rotary pairs
    qn_r, nope_runs, pe_runs = [], [], []
    u0 = 0
    for n in split(heads * U, P):
        u1, pos = u0 + n, 0
        nr, pr = [], []
        for h in range(u0 // U, (u1 - 1) // U + 1) if n else ():
            t0, t1 = max(u0 - h * U, 0), min(u1 - h * U, U)
            if t0 < nope:
                k = min(t1, nope) - t0
                nr.append((h, pos, k, t0))
                pos += k
            if t1 > nope:
                a, b = max(t0, nope) - nope, t1 - nope
                pr.append((h, a, b, pos))
                pos += 2 * (b - a)
        qn_r.append(pos)
        nope_runs.append(tuple(nr))
        pe_runs.append(tuple(pr))
        u0 = u1
    oh_r, oh_runs = split(heads * vd, P), head_runs(heads, vd, P)
    return MlaSplit(P, heads, split(m.q_lora_rank, Q), c_r, v_r, rope_lo, r_r, qn_r, nope_runs, pe_runs, oh_r,
                    oh_runs, group_r, lead_r)


def mla_project_parts(ctx, i: int, ja: int, xm: tuple, ym: tuple, xrole: tuple, yrole: tuple) -> list:
    """Latent attention's projections on PE (i, row ja's class): q_a | c, their RMSNorms, RoPE on
    k_pe (_latent_ops); q, RoPE on q_pe (_query_ops); the absorbed query q_abs over the row's
    cache dims (_absorbed_ops) — `ctx` is the layer's LayerCtx; vectors of a line are back to
    back, sequence by sequence. Each step as (key, make): the key is what its ops depend on
    beyond the region (region.PartCache shares a step among the PEs that agree on it)."""
    iq, qn, nope_runs, pe_runs = xm[:4]
    jqa, qa, c, v, rope_lo, r = ym[:6]
    return [(("latent", i, ja, qa, v, r, xrole, yrole), lambda: _latent_ops(ctx, i, ja, qa, v, r, xrole, yrole)),
            (("query", ja, jqa, iq, qn, pe_runs, yrole), lambda: _query_ops(ctx, ja, jqa, iq, qn, pe_runs, yrole)),
            (("absorb", ja, qn, c, v, r, rope_lo, nope_runs, pe_runs, xrole),
             lambda: _absorbed_ops(ctx, ja, qn, c, v, r, rope_lo, nope_runs, pe_runs, xrole))]


def _latent_ops(ctx, i: int, ja: int, qa: int, v: int, r: int, xrole: tuple, yrole: tuple) -> Ops:
    """q_a | c = xn . W_a (reduce X), the RMSNorms of q_a and c_kv, RoPE on the row's k_pe pairs."""
    plan, rx, ry = ctx.plan, ctx.rx, ctx.ry
    ms, S, b_, B = plan.mla, plan.shapes, plan.buf, plan.params.batch
    xn, qkv, tmp, dot, z, scal = b_["xn"], b_["qkv"], b_["tmp"], b_["dot"], b_["zeros"], b_["scal"]
    aj = plan.qkv_r[ja]
    ast = aj * ELEM
    out = {0: [fill(aj * B, qkv, z)]}
    out[0] += gemv_ops(S["a"], i, ja, xn, qkv, B, plan.Hc[i] * ELEM, ast)
    merge(out, rx.role_ops(xrole, aj * B, qkv, tmp))
    # RMSNorms of q_a and c_kv: mean squares (x . x/n), one column all-reduce for both, 1/RMS, weight
    norms = [(k, off, n, g) for k, (off, n, g) in enumerate(((0, qa, b_["g_qa"]), (qa, v, b_["g_kv"]))) if n]
    t0 = out[0]
    t0.append(fill(2 * B, scal, z))
    for b in range(B):
        for k, off, n, _ in norms:
            a = qkv + b * ast + off * ELEM
            t0 += [compute(SCALE, n, dst=dot, src0=a, src1=b_["mla_c"] + k * ELEM),
                   compute(DOT, n, dst=scal + (2 * b + k) * ELEM, src0=a, src1=dot)]
    merge(out, ry.role_ops(yrole, 2 * B, scal, tmp))
    t0 = out[0]
    t0.append(compute(RSQRT, 2 * B, dst=scal, src0=scal, src1=b_["consts"] + C_EPS * ELEM))
    for b in range(B):
        for k, off, n, g in norms:
            a = qkv + b * ast + off * ELEM
            t0 += [compute(SCALE, n, dst=a, src0=a, src1=scal + (2 * b + k) * ELEM),
                   compute(MUL, n, dst=a, src0=a, src1=g)]
    cos, sin, kp = b_["cos"], b_["sin"], max(ms.q_pairs) * ELEM
    for b in range(B if r else 0):  # RoPE on the row's k_pe pairs
        t0 += rope_ops(qkv + b * ast + (qa + v) * ELEM, r // 2, cos + kp, sin + kp, b_["rope"])
    return out


def _query_ops(ctx, ja: int, jqa: int, iq: int, qn: int, pe_runs: tuple, yrole: tuple) -> Ops:
    """q = q_a . W_qb (reduce Y): column chunks of every head's nope | rope dims; RoPE on the
    column's q_pe pairs."""
    plan, ry = ctx.plan, ctx.ry
    S, b_, B = plan.shapes, plan.buf, plan.params.batch
    qkv, tmp, z, q = b_["qkv"], b_["tmp"], b_["zeros"], b_["q"]
    ast, qst = plan.qkv_r[ja] * ELEM, qn * ELEM
    out: Ops = {0: [fill(qn * B, q, z)] if qn else []}
    out[0] += gemv_ops(S["qb"], jqa, iq, qkv, q, B, ast, qst)
    merge(out, ry.role_ops(yrole, qn * B, q, tmp))
    t0 = out[0]
    cos, sin = b_["cos"], b_["sin"]
    at = 0
    for _, r0, r1, pos in pe_runs:  # RoPE on the column's q_pe pairs
        t0 += [op for b in range(B)
               for op in rope_ops(q + b * qst + pos * ELEM, r1 - r0, cos + at * ELEM, sin + at * ELEM, b_["rope"])]
        at += r1 - r0
    return out


def _absorbed_ops(ctx, ja: int, qn: int, c: int, v: int, r: int, rope_lo: int, nope_runs: tuple, pe_runs: tuple,
                  xrole: tuple) -> Ops:
    """The absorbed query over the row's c cache dims (_absorb_ops), summed along the row."""
    plan, b_, B, heads = ctx.plan, ctx.plan.buf, ctx.plan.params.batch, ctx.plan.spec.heads
    out = _absorb_ops(plan, heads, c, v, r, rope_lo, nope_runs, pe_runs, b_["q"], qn * ELEM, heads * c * ELEM)
    return merge(out, ctx.rx.role_ops(xrole, heads * c * B, b_["qabs"], b_["tmp"]))


def _absorb_ops(plan, heads: int, c: int, v: int, r: int, rope_lo: int, nope_runs: tuple, pe_runs: tuple,
                q: int, qst: int, cst: int) -> Ops:
    """q_abs = [q_nope . W_uk^T | q_pe] on a row's c cache dims, the column's heads only (the row
    all-reduce sums the columns): head-major, or dim-major when flash runs over the heads
    (attention.attn_row), the FMACs then accumulating in a scratch whose elements move into place."""
    b_, B, uk = plan.buf, plan.params.batch, plan.shapes["uk"]
    vec = by_heads(plan.params, heads, plan.tc_max)
    qabs, z, dot = b_["qabs"], b_["zeros"], b_["dot"]
    nr = len(nope_runs)
    ops = [fill(heads * c * B, qabs, z)]
    if vec and v and nr:
        ops.append(fill(nr * v * B, dot, z))
    for b in range(B):
        def at(hd: int, dd: int) -> int:
            return qabs + b * cst + ((dd * heads + hd) if vec else (hd * c + dd)) * ELEM
        row = 0
        for k, (hd, pos, n, _) in enumerate(nope_runs):
            acc = dot + (b * nr + k) * v * ELEM if vec else at(hd, 0)
            ops += [compute(FMAC, v, dst=acc, src0=uk.weights + (row + t) * uk.pitch,
                            src1=q + b * qst + (pos + t) * ELEM) for t in range(n if v else 0)]
            row += n
            if vec:
                ops += [compute(MOV, 1, dst=at(hd, dd), src0=acc + dd * ELEM) for dd in range(v)]
        for hd, off, n, pos in pe_moves(pe_runs, rope_lo, r, v):
            src = q + b * qst + pos * ELEM
            ops += [compute(MOV, 1, dst=at(hd, off + t), src0=src + t * ELEM) for t in range(n)] if vec \
                else [compute(MOV, n, dst=at(hd, off), src0=src)]
    return {0: ops}


def mla_output_ops(ctx, i: int, jo: int, xm: tuple, ym: tuple, xrole: tuple, yrole: tuple, sp: dict) -> Ops:
    """o = o_lat . W_uv (reduce Y), out = o . W_o (reduce X), transposed back to column layout
    by a broadcast from the diagonal; leaves the column's chunk in y. o_lat is flash
    attention's output on the row: its heads' v latent dims, head-major or (by heads) dim-major."""
    plan, rx, ry = ctx.plan, ctx.rx, ctx.ry
    S, b_, B, heads = plan.shapes, plan.buf, plan.params.batch, plan.spec.heads
    att, yb, tmp, z = b_["att"], b_["y"], b_["tmp"], b_["zeros"]
    io, ohn, oh_runs = xm[4:7]
    v, jh, hj_ = ym[3], ym[6], ym[7]
    vec = by_heads(plan.params, heads, plan.tc_max)
    ost, ohs, oh = heads * v * ELEM, ohn * ELEM, b_["oh"]
    ops: list[Op] = [fill(ohn * B, oh, z)] if ohn else []
    for b in range(B):
        for cc in range(v):
            for hd, pos, n in oh_runs:
                ops.append(compute(FMAC, n, dst=oh + b * ohs + pos * ELEM,
                                   src0=S["uv"].weights + cc * S["uv"].pitch + pos * ELEM,
                                   src1=att + b * ost + ((cc * heads + hd) if vec else (hd * v + cc)) * ELEM))
    out = {0: ops}
    merge(out, ry.role_ops(yrole, ohn * B, oh, tmp))
    if hj_:
        out[0].append(fill(hj_ * B, yb, z))
    out[0] += gemv_ops(S["o"], io, jh, oh, yb, B, ohs, hj_ * ELEM)
    merge(out, rx.role_ops(xrole, hj_ * B, yb, tmp))
    if plan.Q > 1:
        if "diag" in sp:
            out[0].append(send(DIAG_BCAST, hj_ * B, yb))
        else:
            out[0].append(recv(DIAG_BCAST, plan.Hc[i] * B, yb))
    return out
