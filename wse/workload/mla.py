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

from .mesh import split


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
