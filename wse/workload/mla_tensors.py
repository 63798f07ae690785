"""Where a latent attention layer's attention tensors live (/tensors, docs/trace-format.md), and
its numpy reference in the weight-absorbed form (mla.py), for functional runs.

Weights: W_a [hidden, q_lora_rank + kv_lora_rank + qk_rope_head_dim] (q_a | c_kv | k_pe), the
latent norms' g_qa and g_kv, W_qb [q_lora_rank, heads x (nope + rope)], W_uk [heads, nope,
kv_lora_rank], W_uv [heads, kv_lora_rank, v_head_dim], W_o [heads x v_head_dim, hidden]; RoPE's
cos and sin [qk_rope_head_dim / 2] (rope dims p and p + rope / 2 a pair, rotate-half, as the
dense layers'). The cache of the context's other tokens, c_cache [batch, tokens - 1, kv_lora_rank +
rope], holds what the layer stores: the normalized c_kv and the rotated k_pe. Outputs besides h:
this token's cache entry (`latent`, read from column 0's newest slot), q after RoPE, the latent
attention output per head (`attn_latent`) and o = o_lat . W_uv per head (`o_heads`).
"""
from __future__ import annotations

import numpy as np

from .attention import AttnRow, by_heads
from .gemv import ELEM, record_scale, tile_pieces
from .mesh import offsets
from .mla import C_INV_KV, C_INV_QA, cache_dims, latent_offset, q_dims


def runs(dims: list[int]) -> list[tuple[int, int, int]]:
    """(local offset, first global index, count) of each run of consecutive indices in `dims`."""
    out: list[list[int]] = []
    for k, d in enumerate(dims):
        if out and out[-1][1] + out[-1][2] == d:
            out[-1][2] += 1
        else:
            out.append([k, d, 1])
    return [tuple(r) for r in out]


def record_mla(t, plan, pe: np.ndarray, col: np.ndarray, row: np.ndarray, pe_of) -> None:
    """The attention tensors of a latent attention layer region (pe, col, row: every PE of the
    region and its column and row; pe_of(i, j): the PE at column i, row j)."""
    spec, ms, b_, S, B = plan.spec, plan.mla, plan.buf, plan.shapes, plan.params.batch
    m, H, heads, P, Q = spec.mla, spec.hidden_size, spec.heads, plan.P, plan.Q
    kvl, rope, vd = m.kv_lora_rank, m.qk_rope_head_dim, m.v_head_dim
    qlen, width, A = spec.q_size, kvl + rope, m.q_lora_rank + kvl + rope
    hc, ho = np.array(plan.Hc), np.array(offsets(plan.Hc))
    qa_off, o_off = offsets(ms.qa_r), offsets(ms.oh_r)
    v_off = [latent_offset(ms, j) for j in range(Q)]  # (each row group holds every latent dim)
    vec = by_heads(plan.params, heads, plan.tc_max)
    # (row groups: every group's rows add their mean squares of c_kv in one column all-reduce)
    for name, c, v in (("inv_q_lora", C_INV_QA, 1 / m.q_lora_rank), ("inv_kv_lora", C_INV_KV, 1 / (ms.groups * kvl))):
        t.pieces(t.add(name, "constant", (1,), value=v), pe, b_["mla_c"] + c * ELEM, 1, 0)
    w_a = t.add("w_a", "weight", (H, A), S["a"].store)
    w_qb = t.add("w_qb", "weight", (m.q_lora_rank, qlen), S["qb"].store)
    w_uk = t.add("w_uk", "weight", (heads, m.qk_nope_head_dim, kvl))
    w_uv, w_o = t.add("w_uv", "weight", (heads, kvl, vd)), t.add("w_o", "weight", (heads * vd, H), S["o"].store)
    for name in ("a", "qb", "o"):  # (the absorbed W_uk, W_uv stay 16-bit: precision.py)
        record_scale(t, f"w_{name}", S[name], pe, {0: 0}, 1)
    g_qa, g_kv = t.add("g_qa", "weight", (m.q_lora_rank,)), t.add("g_kv", "weight", (kvl,))
    cos, sin = t.add("rope_cos", "input", (rope // 2,)), t.add("rope_sin", "input", (rope // 2,))
    q_out, o_heads = t.add("q", "output", (B, qlen)), t.add("o_heads", "output", (B, heads * vd))
    latent = t.add("latent", "output", (B, width))
    # (row groups: a row's latent attention output is its group's share, summed by W_uv's all-reduce)
    o_lat = t.add("attn_latent", "output", (B, heads * kvl)) if ms.groups == 1 else None
    kp = max(ms.q_pairs)  # the row's k pairs in the RoPE tables after the widest column's q pairs
    for j in range(Q):
        sel = row == j
        pes, cols = pe[sel], col[sel]
        qa, v = ms.qa_r[j], ms.v_r[j]
        cd = cache_dims(spec, ms, j)
        a_dims = [qa_off[j] + k for k in range(qa)] + [m.q_lora_rank + d for d in cd]
        for local, g, n in runs(a_dims):  # W_a: tile row r of PE (i, j) is hidden row ho[i] + r
            for r in range(int(hc.max())):
                k = hc[cols] > r
                tile_pieces(t, w_a, S["a"], pes[k], r, local, n, (ho[cols[k]] + r) * A + g)
        if qa:
            t.pieces(g_qa, pes, b_["g_qa"], qa, qa_off[j])
        if v:
            t.pieces(g_kv, pes, b_["g_kv"], v, v_off[j])
        rp = ms.r_r[j] // 2
        if rp:
            t.pieces(cos, pes, b_["cos"] + kp * ELEM, rp, ms.rope_lo[j])
            t.pieces(sin, pes, b_["sin"] + kp * ELEM, rp, ms.rope_lo[j])
        for b in range(B if ms.groups == 1 else 0):  # the latent attention output: the row's heads' v latent
            a0 = b_["att"] + b * heads * v * ELEM    # dims (row groups: each holds its group's share)
            if vec:
                for cc in range(v):
                    t.pieces(o_lat, pes, a0 + cc * heads * ELEM, heads, b * heads * kvl + v_off[j] + cc, kvl)
            else:
                for h in range(heads if v else 0):
                    t.pieces(o_lat, pes, a0 + h * v * ELEM, v, b * heads * kvl + h * kvl + v_off[j])
        c0 = pe_of(0, j)  # this token's cache entry: column 0's slot T_c[0] (of the first row group)
        for b in range(B if ms.group_r[j] == 0 else 0):
            for d, gd in enumerate(cd):
                t.pieces(latent, c0, _slot(plan, b, d, ms.c_r[j], plan.T_g[0][0]), 1, b * width + gd)
        for i in range(P):
            _record_pe(t, plan, i, j, pe_of(i, j), (w_qb, w_uk, w_uv, w_o), qa_off[j], v_off[j], o_off[i])
    for i in range(P):
        sel = col == i
        pes, qd = pe[sel], q_dims(spec, ms, i)
        at = 0
        for _, r0, r1, _ in ms.pe_runs[i]:  # the column's q pairs in the RoPE tables
            t.pieces(cos, pes, b_["cos"] + at * ELEM, r1 - r0, r0)
            t.pieces(sin, pes, b_["sin"] + at * ELEM, r1 - r0, r0)
            at += r1 - r0
        qn, ohn = ms.qn_r[i], ms.oh_r[i]
        for b in range(B):
            for local, g, n in runs(qd):
                t.pieces(q_out, pes, b_["q"] + (b * qn + local) * ELEM, n, b * qlen + g)
            if ohn:
                t.pieces(o_heads, pes, b_["oh"] + b * ohn * ELEM, ohn, b * heads * vd + o_off[i])
    _record_cache(t, plan, pe_of)


def _slot(plan, b: int, d: int, c: int, slot: int) -> int:
    """Address of cache dim d of sequence b in a slot, on a row of c cache dims (the layout
    attention.AttnRow gives latent attention's rows: one key piece of c dims, values inside it)."""
    return AttnRow(plan.spec.heads, plan.spec.heads, c, 0, 0, plan.tc_max + 1, plan.buf["kv"], None,
                   None).at(b, d, slot)


def _record_pe(t, plan, i: int, j: int, pe: int, w: tuple, qa0: int, v0: int, o0: int) -> None:
    """The tiles of W_qb, W_uk, W_uv and W_o on PE (i, j) (their tile rows one piece each)."""
    spec, ms, S = plan.spec, plan.mla, plan.shapes
    m, H, qlen = spec.mla, spec.hidden_size, spec.q_size
    kvl, vd, nope = m.kv_lora_rank, m.v_head_dim, m.qk_nope_head_dim
    w_qb, w_uk, w_uv, w_o = w
    qa, v = ms.qa_r[j], ms.v_r[j]
    for local, g, n in runs(q_dims(spec, ms, i)):  # W_qb: tile row r is q_a dim qa0 + r
        r = np.arange(qa)
        tile_pieces(t, w_qb, S["qb"], pe, r, local, n, (qa0 + r) * qlen + g)
    row = 0
    for h, _, n, d0 in ms.nope_runs[i]:  # W_uk: a tile row per (head, nope dim), the row's latent dims
        if v:
            r = np.arange(n)
            t.pieces(w_uk, pe, S["uk"].weights + (row + r) * S["uk"].pitch, v, (h * nope + d0 + r) * kvl + v0)
        row += n
    for h, pos, n in ms.oh_runs[i]:  # W_uv: tile row cc is latent dim v0 + cc, the column's o dims
        cc = np.arange(v)
        t.pieces(w_uv, pe, S["uv"].weights + cc * S["uv"].pitch + pos * ELEM, n,
                 (h * kvl + v0 + cc) * vd + o0 + pos - h * vd)
    if j < plan.P and plan.Hc[j]:  # W_o: tile row r is o dim o0 + r, row j's hidden chunk
        r = np.arange(ms.oh_r[i])
        tile_pieces(t, w_o, S["o"], pe, r, 0, plan.Hc[j], (o0 + r) * H + sum(plan.Hc[:j]))


def _record_cache(t, plan, pe_of) -> None:
    """c_cache [batch, tokens - 1, kv_lora_rank + rope]: column i holds tokens in slots 1..tc-1 and
    (but the last column) the one it passes east in slot 0 (as the dense layers' caches); with
    row groups that is the first group's (it takes the new token), the others' columns hold
    theirs in slots 1..tc."""
    spec, ms, B, P = plan.spec, plan.mla, plan.params.batch, plan.P
    width, T1 = spec.kv_cache_width, sum(plan.T_c) - 1
    cache = t.add("c_cache", "input", (B, T1, width))
    T_g = plan.T_g
    stay = [tc - 1 for tc in T_g[0]]
    first = offsets(stay)
    later = [n for T_c in T_g[1:] for n in T_c]  # the later groups' columns' tokens, after the first group's
    at = [sum(stay) + P - 1 + a for a in offsets(later)]
    for j in range(plan.Q):
        c, g = ms.c_r[j], ms.group_r[j]
        for d, gd in enumerate(cache_dims(spec, ms, j)):
            for i in range(P):
                for b in range(B):
                    if g:  # a later group: slots 1..tc, no shift
                        k = (g - 1) * P + i
                        if later[k]:
                            t.pieces(cache, pe_of(i, j), _slot(plan, b, d, c, 1), later[k], (b * T1 + at[k]) * width + gd,
                                     width)
                        continue
                    if stay[i] > 0:
                        t.pieces(cache, pe_of(i, j), _slot(plan, b, d, c, 1), stay[i],
                                 (b * T1 + first[i]) * width + gd, width)
                    if i < P - 1:
                        t.pieces(cache, pe_of(i, j), _slot(plan, b, d, c, 0), 1, (b * T1 + sum(stay) + i) * width + gd)


def reference_mla(spec, x: dict, h: np.ndarray, rms) -> tuple[np.ndarray, dict]:
    """Latent attention in float64, absorbed form: (h after the attention's residual, the
    intermediates recorded as outputs)."""
    m = spec.mla
    B, heads, kvl, nope, rp = h.shape[0], spec.heads, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim // 2
    ql = m.q_lora_rank

    def rope(v):
        a, c = v[..., :rp], v[..., rp:]
        return np.concatenate([a * x["rope_cos"] - c * x["rope_sin"], c * x["rope_cos"] + a * x["rope_sin"]], -1)
    a = rms(h, x["g1"]) @ x["w_a"]
    q_a, c_kv, k_pe = rms(a[:, :ql], x["g_qa"]), rms(a[:, ql:ql + kvl], x["g_kv"]), rope(a[:, ql + kvl:])
    latent = np.concatenate([c_kv, k_pe], axis=1)
    q = (q_a @ x["w_qb"]).reshape(B, heads, nope + 2 * rp)
    q = np.concatenate([q[..., :nope], rope(q[..., nope:])], axis=-1)
    cache = np.concatenate([x["c_cache"], latent[:, None]], axis=1)  # [B, tokens, kvl + rope]
    q_abs = np.concatenate([np.einsum("bhd,hdc->bhc", q[..., :nope], x["w_uk"]), q[..., nope:]], axis=-1)
    s = np.einsum("bhc,btc->bht", q_abs, cache) / np.sqrt(nope + 2 * rp)
    p = np.exp(s - s.max(axis=2, keepdims=True))
    o_lat = np.einsum("bht,btc->bhc", p / p.sum(axis=2, keepdims=True), cache[..., :kvl])
    o = np.einsum("bhc,hcv->bhv", o_lat, x["w_uv"])
    h1 = h + o.reshape(B, -1) @ x["w_o"]
    return h1, {"latent": latent, "q": q.reshape(B, -1), "attn_latent": o_lat.reshape(B, -1),
                "o_heads": o.reshape(B, -1)}
