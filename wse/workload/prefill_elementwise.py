"""The elementwise work of one prefill layer (docs/workloads.md, "Prefill"): what lies between
its GEMMs, as one kernel on the layer's P x Q region with its row all-reduces.

Activations are S x width tiles, tokens over the Q rows (row j: S_r[j] tokens) and each vector
over the P columns; every part reads what the GEMM before it leaves and leaves what the GEMM
after it reads, so the parts do not feed each other here (the layer runs them between its GEMMs):

1. RMSNorm of h (mean squares h . h/H per token, row all-reduce, rsqrt(mean + eps), weight);
   latent attention also normalizes the query and KV latents (one all-reduce for both sums);
2. RoPE on every rotated head vector (q and k; latent attention: each head's q_pe and the
   shared k_pe): the vectors' rotary pairs cut over the columns, a column's pairs stored [first
   halves | second halves] per token, cos and sin per token (the prompt's positions);
3. the softmax of the scores [token, head, key] over the keys (keys over the columns): scale by
   1/sqrt(head dim), running maxima, a row MAX all-reduce, exp(s - max), sums, a row all-reduce,
   1/sum, scale. All keys (causal masking is not exploited, as in the GEMMs);
4. the residual after O, RMSNorm of it, SiLU(gate) * up, the residual after the FFN.

Every op computes (functional runs check the kernel against `reference`); sinks and sliding
windows are not in the prefill mapping.
"""
from __future__ import annotations

import numpy as np

from ..hardware import WaferConfig
from ..trace import Trace, compute, fill
from .attention import attn_scale
from .gemv import ELEM
from .mesh import X, Y, Allocator, MeshBuilder, Region, RegionProgram, offsets, split, tagged
from .models import ModelSpec, model_meta
from .params import DecodeParams
from .plan import fit_check
from .region import (ADD, DOT, EXP, EXP_FLOPS, MAX, MOV, MUL, RECIP, RECIP_FLOPS, RMAX, RSQRT, RSQRT_FLOPS,
                     RSUM, SCALE, SILU, SILU_FLOPS, NORM_EPS, ZERO_BYTES, mean_square_ops, merge, reducers,
                     rms_apply_ops, rope_ops)

# the `consts` buffer (element index): 1/hidden, eps, the softmax scale, the lowest fp16 (a column
# without keys' maximum), 1/q_lora_rank, 1/kv_lora_rank
K_INV_H, K_EPS, K_ATTN, K_LOW, K_INV_QA, K_INV_KV = range(6)


def rope_vectors(spec: ModelSpec) -> tuple[int, int]:
    """(vectors RoPE rotates per token, their length): every query and key head's (latent
    attention: each head's q_pe and the shared k_pe)."""
    if spec.mla:
        return spec.heads + 1, spec.mla.qk_rope_head_dim
    return spec.heads + spec.kv_heads, spec.head_dim


def latents(spec: ModelSpec) -> tuple[int, int]:
    """(query latent, KV latent) widths latent attention normalizes per token; (0, 0) otherwise."""
    return (spec.mla.q_lora_rank, spec.mla.kv_lora_rank) if spec.mla else (0, 0)


class Cut:
    """How a prefill layer's vectors are cut over P columns and its tokens over Q rows."""

    def __init__(self, spec: ModelSpec, P: int, Q: int, S: int, act: int, keys: int | None = None):
        self.S, self.act, self.K = S, act, keys or S
        self.Sr, self.Hc, self.Kc = split(S, Q), split(spec.hidden_size, P), split(self.K, P)
        self.lat_c = split(sum(latents(spec)), P)
        n, d = rope_vectors(spec)
        self.rope_pairs = split(n * (d // 2), P)  # the concatenated vectors' pairs over the columns
        self.act_c = split(act, P)
        self.s0, self.h0, self.k0 = offsets(self.Sr), offsets(self.Hc), offsets(self.Kc)
        self.l0, self.p0, self.a0 = offsets(self.lat_c), offsets(self.rope_pairs), offsets(self.act_c)


def elementwise(spec: ModelSpec, P: int, S: int, cfg: WaferConfig, algo: str = "two-level", Q: int | None = None,
                act: int | None = None, record: bool = False, keys: int | None = None) -> tuple[Trace, dict[str, int]]:
    """The elementwise kernel of one prefill layer of an S-token prompt on a P x Q region (Q = P
    by default; act: the FFN width, default the model's; keys: the tokens its softmax spans,
    default S); record: with its /tensors."""
    from .prefill import ffn_width
    Q = Q or P
    c = Cut(spec, P, Q, S, act or ffn_width(spec), keys)
    heads, (ql, kl) = spec.heads, latents(spec)
    sm, hm, km, lm, pm, am = (max(v) for v in (c.Sr, c.Hc, c.Kc, c.lat_c, c.rope_pairs, c.act_c))
    mem = Allocator(0, cfg.sram_bytes - cfg.sram_reserved_bytes)
    buf = {k: mem.alloc(k, sm * hm * ELEM, "activations", g) for k, g in (
        ("h", 6), ("xn1", 4), ("o", 6), ("xn2", 4), ("dn", 6))}
    buf["lat"] = mem.alloc("lat", max(sm * lm, 1) * ELEM, "activations", 6)
    buf["rope"] = mem.alloc("rope", max(sm * 2 * pm, 1) * ELEM, "activations", 6)
    buf["cos"] = mem.alloc("cos", max(sm * pm, 1) * ELEM, "weights", 0)
    buf["sin"] = mem.alloc("sin", max(sm * pm, 1) * ELEM, "weights", 2)
    buf["sc"] = mem.alloc("scores", sm * heads * km * ELEM, "activations", 6)
    buf["gu"] = mem.alloc("gate_up", max(sm * 2 * am, 1) * ELEM, "activations", 4)
    buf["dot"] = mem.alloc("dot", max(hm, lm) * ELEM, "scratch", 2)
    buf["rtmp"] = mem.alloc("rope_tmp", max(2 * pm, 1) * ELEM, "scratch", 2)
    for k in ("g1", "g2"):
        buf[k] = mem.alloc(k, hm * ELEM, "weights", 0)
    buf["glat"] = mem.alloc("g_latents", max(lm, 1) * ELEM, "weights", 0)
    buf["consts"] = mem.alloc("consts", 6 * ELEM, "constants", 0)
    n_scal = sm * max(heads, 2)
    buf["zeros"] = mem.alloc("zeros", ZERO_BYTES, "constants", 0)  # FILL's scalar
    buf["scal"] = mem.alloc("scal", n_scal * ELEM, "scratch", 4)
    buf["tmp"] = mem.alloc("tmp", n_scal * ELEM, "scratch", 0)
    fit_check(mem, cfg, f"{spec.name} prefill elementwise kernel (S={S}{'' if c.K == S else f', keys {c.K}'}) "
                        f"on {P}x{Q}")
    region = Region(0, 0, P, Q)
    b = MeshBuilder(P, Q, 2, kernel="prefill-elementwise", **model_meta(spec), prompt=S, act=c.act,
                    **({"keys": c.K} if c.K != S else {}))
    rx = reducers(region, b, DecodeParams(algo=algo))[X]
    prog = RegionProgram(region, 2)
    prog.add_roles(X, [(c.Hc[i], c.Kc[i], _lat_split(c, i, ql), c.rope_pairs[i], c.act_c[i], rx.role(i))
                       for i in range(P)])
    prog.add_roles(Y, [(c.Sr[j],) for j in range(Q)])

    def body(xr, yr, _sp):
        hi, ki, (nq, nk), pi, fi, role = xr[0]
        (sj,) = yr[0]
        out: dict[int, list] = {0: []}
        _norm(out, rx, role, buf, "h", "xn1", "g1", sj, hi)
        if ql or kl:
            _latent_norms(out, rx, role, buf, sj, nq, nk)
        t0 = out[0]
        for t in range(sj if pi else 0):
            t0 += rope_ops(buf["rope"] + t * 2 * pi * ELEM, pi, buf["cos"] + t * pi * ELEM,
                           buf["sin"] + t * pi * ELEM, buf["rtmp"])
        _softmax(out, rx, role, buf, sj, heads, ki)
        out[0].append(compute(ADD, sj * hi, dst=buf["o"], src0=buf["o"], src1=buf["h"]))  # h1, after O
        _norm(out, rx, role, buf, "o", "xn2", "g2", sj, hi)
        for t in range(sj if fi else 0):
            g = buf["gu"] + t * 2 * fi * ELEM
            out[0] += [compute(SILU, fi, dst=g, src0=g), compute(MUL, fi, dst=g, src0=g, src1=g + fi * ELEM)]
        out[0].append(compute(ADD, sj * hi, dst=buf["dn"], src0=buf["dn"], src1=buf["o"]))  # after the FFN
        return out

    t_el = b.tag("elementwise", -1, "elementwise")
    prog.add(lambda xr, yr, sp: tagged(body(xr, yr, sp), t_el))
    prog.program_ids(b)
    if record:
        _record(b.tensors, spec, c, buf, P, Q)
    return b.build(), elementwise_flops(spec, c, P)


def _lat_split(c: Cut, i: int, ql: int) -> tuple[int, int]:
    """Column i's latent dims: (in the query latent, in the KV latent)."""
    a, n = c.l0[i], c.lat_c[i]
    nq = max(0, min(a + n, ql) - a)
    return nq, n - nq


def _norm(out: dict, rx, role, buf: dict, src: str, dst: str, g: str, sj: int, hi: int) -> None:
    """RMSNorm per token of the row's tokens: mean squares, row all-reduce, rsqrt, scale, weight."""
    scal, k = buf["scal"], buf["consts"]
    out[0].append(fill(sj, scal, buf["zeros"]))
    out[0] += mean_square_ops(sj, buf[src], buf[dst], hi * ELEM, hi, scal, k + K_INV_H * ELEM)
    merge(out, rx.role_ops(role, sj, scal, buf["tmp"]))
    out[0] += rms_apply_ops(sj, buf[src], buf[dst], hi * ELEM, hi, scal, buf[g], k + K_EPS * ELEM)


def _latent_norms(out: dict, rx, role, buf: dict, sj: int, nq: int, nk: int) -> None:
    """Latent attention's RMSNorms of the query and KV latents, in place: per token two mean
    squares (the column's dims of each), one row all-reduce of both."""
    t0, scal, k, lat = out[0], buf["scal"], buf["consts"], buf["lat"]
    n, parts = nq + nk, [(0, nq, K_INV_QA, 0), (nq, nk, K_INV_KV, 1)]
    t0.append(fill(2 * sj, scal, buf["zeros"]))
    for t in range(sj):
        for off, m, kc, s in parts:
            if m:
                a = lat + (t * n + off) * ELEM
                t0 += [compute(SCALE, m, dst=buf["dot"], src0=a, src1=k + kc * ELEM),
                       compute(DOT, m, dst=scal + (2 * t + s) * ELEM, src0=a, src1=buf["dot"])]
    merge(out, rx.role_ops(role, 2 * sj, scal, buf["tmp"]))
    t0 = out[0]
    t0.append(compute(RSQRT, 2 * sj, dst=scal, src0=scal, src1=k + K_EPS * ELEM))
    for t in range(sj):
        for off, m, _, s in parts:
            if m:
                a = lat + (t * n + off) * ELEM
                t0 += [compute(SCALE, m, dst=a, src0=a, src1=scal + (2 * t + s) * ELEM),
                       compute(MUL, m, dst=a, src0=a, src1=buf["glat"] + off * ELEM)]


def _softmax(out: dict, rx, role, buf: dict, sj: int, heads: int, ki: int) -> None:
    """Softmax over the keys of each token's and head's scores (the row's keys on its columns)."""
    sc, scal, k, z, n = buf["sc"], buf["scal"], buf["consts"], buf["zeros"], sj * heads
    t0 = out[0]
    t0.append(compute(SCALE, n * ki, dst=sc, src0=sc, src1=k + K_ATTN * ELEM))
    for r in range(n):  # running maxima from the lowest fp16 (a column may hold no keys)
        t0 += [compute(MOV, 1, dst=scal + r * ELEM, src0=k + K_LOW * ELEM),
               compute(RMAX, ki, dst=scal + r * ELEM, src0=sc + r * ki * ELEM)]
    merge(out, rx.role_ops(role, n, scal, buf["tmp"], MAX))
    t0 = out[0]
    t0 += [compute(EXP, ki, dst=sc + r * ki * ELEM, src0=sc + r * ki * ELEM, src1=scal + r * ELEM)
           for r in range(n)]
    t0.append(fill(n, scal, z))
    t0 += [compute(RSUM, ki, dst=scal + r * ELEM, src0=sc + r * ki * ELEM) for r in range(n)]
    merge(out, rx.role_ops(role, n, scal, buf["tmp"]))
    t0 = out[0]
    t0.append(compute(RECIP, n, dst=scal, src0=scal))
    t0 += [compute(SCALE, ki, dst=sc + r * ki * ELEM, src0=sc + r * ki * ELEM, src1=scal + r * ELEM)
           for r in range(n)]


def elementwise_flops(spec: ModelSpec, c: Cut, P: int) -> dict[str, int]:
    """Executed and model FLOPs of the kernel in closed form (the 1/RMS and 1/sum of each token
    are taken on every column: executed, not model)."""
    S, K, H, heads = c.S, c.K, spec.hidden_size, spec.heads
    ql, kl = latents(spec)
    lat = 2 if ql or kl else 0  # the latents' two sums per token
    n, d = rope_vectors(spec)
    once = (2 * 5 * S * H + 5 * S * (ql + kl) + 3 * S * n * d + (1 + 1 + EXP_FLOPS + 1 + 1) * S * K * heads
            + (SILU_FLOPS + 1) * S * c.act + 2 * S * H)
    per_token = (2 + lat) * RSQRT_FLOPS * S + RECIP_FLOPS * S * heads  # on every column
    allreduce = (P - 1) * (2 * S + lat * S + 2 * S * heads)
    return {"executed_flops": once + P * per_token + allreduce, "model_flops": once + per_token}


def _record(t, spec: ModelSpec, c: Cut, buf: dict, P: int, Q: int) -> None:
    """/tensors: inputs h, the latents (MLA), the vectors to rotate and cos and sin per token, the
    scores, O's and the FFN's outputs and gate | up; outputs xn1, the normalized latents, the
    rotated vectors, the probabilities, h1, xn2, SiLU(gate) * up and h after the layer."""
    S, H, heads = c.S, spec.hidden_size, spec.heads
    ql, kl = latents(spec)
    n, d = rope_vectors(spec)
    ii, jj = np.meshgrid(np.arange(P), np.arange(Q))
    pe, col, row = (jj * P + ii).reshape(-1), ii.reshape(-1), jj.reshape(-1)
    hc, h0, sr, s0 = np.array(c.Hc), np.array(c.h0), np.array(c.Sr), np.array(c.s0)

    def tiles(name: str, role: str, key: str, width: int, chunk, start) -> None:  # [S, width], token-major
        k = t.add(name, role, (S, width))
        for tt in range(max(c.Sr)):
            m = sr[row] > tt
            t.pieces(k, pe[m], buf[key] + tt * chunk[col[m]] * ELEM, chunk[col[m]],
                     (s0[row[m]] + tt) * width + start[col[m]])
    for name, role, key in (("h", "input", "h"), ("xn1", "output", "xn1"), ("o_out", "input", "o"),
                            ("h1", "output", "o"), ("xn2", "output", "xn2"), ("down_out", "input", "dn"),
                            ("out", "output", "dn")):
        tiles(name, role, key, H, hc, h0)
    for name, key in (("g1", "g1"), ("g2", "g2")):
        t.pieces(t.add(name, "weight", (H,)), pe, buf[key], hc[col], h0[col])
    if ql or kl:
        lc, l0 = np.array(c.lat_c), np.array(c.l0)
        tiles("latents", "input", "lat", ql + kl, lc, l0)
        tiles("latents_normed", "output", "lat", ql + kl, lc, l0)
        t.pieces(t.add("g_latents", "weight", (ql + kl,)), pe[lc[col] > 0], buf["glat"], lc[col][lc[col] > 0],
                 l0[col][lc[col] > 0])
    z = t.add("zeros", "zero", (ZERO_BYTES // ELEM,))
    t.pieces(z, pe, buf["zeros"], ZERO_BYTES // ELEM, 0)
    for name, k, v in (("inv_hidden", K_INV_H, 1 / H), ("norm_eps", K_EPS, NORM_EPS),
                       ("attn_scale", K_ATTN, attn_scale(spec)), ("lowest", K_LOW, -65504.0),
                       ("inv_q_lora", K_INV_QA, 1 / max(ql, 1)), ("inv_kv_lora", K_INV_KV, 1 / max(kl, 1))):
        t.pieces(t.add(name, "constant", (1,), value=v), pe, buf["consts"] + k * ELEM, 1, 0)
    _record_rope(t, c, buf, pe, col, row, n, d)
    sc_in, sc_out = t.add("scores", "input", (S, heads, c.K)), t.add("probs", "output", (S, heads, c.K))
    kc, k0 = np.array(c.Kc), np.array(c.k0)
    for tt in range(max(c.Sr)):
        for hh in range(heads):
            m = sr[row] > tt
            r = tt * heads + hh
            for k in (sc_in, sc_out):
                t.pieces(k, pe[m], buf["sc"] + r * kc[col[m]] * ELEM, kc[col[m]],
                         ((s0[row[m]] + tt) * heads + hh) * c.K + k0[col[m]])
    ac, a0 = np.array(c.act_c), np.array(c.a0)
    gu, act = t.add("gate_up", "input", (S, 2 * c.act)), t.add("act", "output", (S, c.act))
    for tt in range(max(c.Sr)):
        m = (sr[row] > tt) & (ac[col] > 0)
        base = buf["gu"] + tt * 2 * ac[col[m]] * ELEM
        for half in (0, 1):
            t.pieces(gu, pe[m], base + half * ac[col[m]] * ELEM, ac[col[m]],
                     (s0[row[m]] + tt) * 2 * c.act + half * c.act + a0[col[m]])
        t.pieces(act, pe[m], base, ac[col[m]], (s0[row[m]] + tt) * c.act + a0[col[m]])


def _record_rope(t, c: Cut, buf: dict, pe, col, row, n: int, d: int) -> None:
    """The vectors to rotate [S, n x d] (in place: `rope_in`, `rope_out`) and cos, sin [S, d / 2]:
    column i holds pairs p0[i].. of the vectors laid end to end, per token [first halves |
    second halves], and each pair's cos and sin."""
    pp = d // 2
    S = c.S
    r_in, r_out = t.add("rope_in", "input", (S, n * d)), t.add("rope_out", "output", (S, n * d))
    cos, sin = t.add("rope_cos", "input", (S, pp)), t.add("rope_sin", "input", (S, pp))
    sr, s0 = np.array(c.Sr), np.array(c.s0)
    for i, pi in enumerate(c.rope_pairs):
        pes, rows = pe[col == i], row[col == i]
        for tt in range(max(c.Sr)):
            m = sr[rows] > tt
            tok = s0[rows[m]] + tt
            at = 0
            for g0, cnt in _runs(c.p0[i], pi, pp):  # pairs of one vector
                v, q = divmod(g0, pp)
                for k, half in ((r_in, 0), (r_in, 1), (r_out, 0), (r_out, 1)):
                    t.pieces(k, pes[m], buf["rope"] + (tt * 2 * pi + half * pi + at) * ELEM, cnt,
                             tok * n * d + v * d + half * pp + q)
                for k, key in ((cos, "cos"), (sin, "sin")):
                    t.pieces(k, pes[m], buf[key] + (tt * pi + at) * ELEM, cnt, tok * pp + q)
                at += cnt


def _runs(first: int, count: int, pp: int) -> list[tuple[int, int]]:
    """Pairs first .. first + count - 1 of vectors of pp pairs, cut at vector ends."""
    out, g = [], first
    while g < first + count:
        m = min(first + count, (g // pp + 1) * pp) - g
        out.append((g, m))
        g += m
    return out


def reference(meta: dict, x: dict) -> dict:
    """The kernel's parts in float64, each on its own inputs."""
    from .models import spec_of
    spec = spec_of(meta)
    ql, kl = latents(spec)
    n, d = rope_vectors(spec)
    S, pp = x["h"].shape[0], d // 2

    def rms(v, w):
        return v * w / np.sqrt((v ** 2).mean(axis=-1, keepdims=True) + NORM_EPS)
    out = {"xn1": rms(x["h"], x["g1"])}
    if ql or kl:
        lat, g = x["latents"], x["g_latents"]
        out["latents_normed"] = np.concatenate([rms(lat[:, :ql], g[:ql]), rms(lat[:, ql:], g[ql:])], axis=1)
    v = x["rope_in"].reshape(S, n, d)
    a, b = v[..., :pp], v[..., pp:]
    cs, sn = x["rope_cos"][:, None], x["rope_sin"][:, None]
    out["rope_out"] = np.concatenate([a * cs - b * sn, b * cs + a * sn], axis=-1).reshape(S, -1)
    s = x["scores"] * attn_scale(spec)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    out["probs"] = p / p.sum(axis=-1, keepdims=True)
    h1 = x["h"] + x["o_out"]
    gate, up = x["gate_up"][:, :int(meta["act"])], x["gate_up"][:, int(meta["act"]):]
    return dict(out, h1=h1, xn2=rms(h1, x["g2"]), act=gate / (1 + np.exp(-gate)) * up, out=h1 + x["down_out"])
