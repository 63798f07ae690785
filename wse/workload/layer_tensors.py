"""Where one decode layer's tensors live (/tensors, docs/trace-format.md), and the numpy
reference of the layer, for functional runs of a layer region (`wse check --model`).

The layer's inputs are the residual stream h [batch, hidden] (chunk i on every PE of column i)
and the KV cache of the context's other tokens [batch, tokens - 1, kv_size] (dim-major in the
columns' slots, attention.AttnRow); its weights are the norms' g1, g2, W_qkv [hidden, q | k | v],
W_o, W_gate, W_up [hidden, ffn], W_down (MoE: W_router and every expert's, [experts, ...]), the
biases and attention sinks where the model has them, and RoPE's cos and sin [head_dim / 2]
(inputs: the position's angles, any values); its output is h after the layer, in place; the
intermediates it leaves in its buffers (q | k | v after RoPE, the attention output, SiLU(gate) *
up, the FFN's output; MoE: the router's logits and the gates) are outputs too, so an error
diluted by the residual stream still shows. Latent attention's tensors are in mla_tensors.py;
expert regions add their tiles to their layer's expert tensors (record_experts); low-precision
tiles are stored codes with a `.scale` (gemv.record_scale). Both attention mappings use the
same rows (attention.head_rows), so one record serves either (functional_gap says what cannot be
checked: a region whose columns hold no token).
"""
from __future__ import annotations

import numpy as np

from ..tensors import TensorRecorder
from .attention import attn_scale, by_heads
from .gemv import ELEM, record_scale, tile_addr, tile_pieces, weight_tensor
from .mesh import offsets
from .region import C_ATTN, C_EPS, C_INV_H, C_ONE, NORM_EPS


class Prefixed:
    """A TensorRecorder whose tensor names get a prefix (one region's tensors in a whole step)."""

    def __init__(self, t: TensorRecorder, prefix: str):
        self.t, self.prefix = t, prefix

    def add(self, name: str, *args, **kw) -> int:
        return self.t.add(self.prefix + name, *args, **kw)

    def index(self, name: str) -> int:
        return self.t.index(self.prefix + name)

    def pieces(self, *args) -> None:
        self.t.pieces(*args)


def record_layer(t: TensorRecorder | Prefixed, plan, P: int, origin: tuple[int, int, int] | None = None,
                 h_input: bool = True) -> None:
    """/tensors of a layer region P columns wide (plan: layer_sizes.LayerPlan), at origin = (mesh width,
    x0, y0) (default: alone at the mesh origin); h_input: h is an input (else lanes bring it)."""
    spec, b_, B = plan.spec, plan.buf, plan.params.batch
    Q, Hc, f_r = plan.Q, plan.Hc, plan.f_r
    H, F = spec.hidden_size, plan.spec.ffn_size
    ho, fo = np.array(offsets(Hc)), np.array(offsets(f_r))
    hc = np.array(Hc)
    W, x0, y0 = origin or (P, 0, 0)
    ii, jj = np.meshgrid(np.arange(P), np.arange(Q))  # [Q, P]
    pe = ((y0 + jj) * W + x0 + ii).reshape(-1)
    col = ii.reshape(-1)

    def column(name: str, role: str, addr: int, batch: int) -> None:  # [batch, H] in column layout
        k = t.add(name, role, (batch, H) if batch else (H,))
        for b in range(max(batch, 1)):
            t.pieces(k, pe, addr + b * hc[col] * ELEM, hc[col], b * H + ho[col])

    att_here, ffn_here = plan.has_attention, plan.has_ffn  # (a split layer's region: one half)
    if h_input:
        column("h", "input", b_["h"], B)
    # (with expert regions h leaves with the shared experts added; the collector has the output;
    # a split layer's layer region passes h after attention on to its FFN region)
    column("mid" if not ffn_here else "out" if plan.routed else "shared_out", "output", b_["h"], B)
    if not plan.moe and ffn_here:  # intermediates the layer leaves in its buffers, checked too
        column("ffn_out", "output", b_["y"], B)
    if att_here:
        column("g1", "weight", b_["g1"], 0)
    if ffn_here:
        column("g2", "weight", b_["g2"], 0)
    if "b_o" in b_:
        column("b_o", "weight", b_["b_o"], 0)
    own = "" if att_here else "ffn."  # the FFN region's own constants
    z = plan.mem.buffers["zeros"]
    t.pieces(t.add(own + "zeros", "zero", (z[1] // ELEM,)), pe, z[0], z[1] // ELEM, 0)
    for name, c, v in (("inv_hidden", C_INV_H, 1 / H), ("norm_eps", C_EPS, NORM_EPS),
                       ("attn_scale", C_ATTN, attn_scale(spec)), ("one", C_ONE, 1.0)):
        t.pieces(t.add(own + name, "constant", (1,), value=v), pe, b_["consts"] + c * ELEM, 1, 0)
    if att_here and spec.mla:
        from .mla_tensors import record_mla
        record_mla(t, plan, pe, col, jj.reshape(-1), lambda i, j: (y0 + j) * W + x0 + i)
    elif att_here:
        _record_attention(t, plan, pe, col, jj.reshape(-1), lambda i, j: (y0 + j) * W + x0 + i)
    if plan.moe:
        _record_moe(t, plan, pe, col, jj.reshape(-1), ho, fo, H)
        return
    if not ffn_here:
        return
    act = t.add("ffn_act", "output", (B, F))  # SiLU(gate) * up
    for j in range(Q):
        fj = f_r[j]
        rows = pe[jj.reshape(-1) == j]
        for b in range(B if fj else 0):
            t.pieces(act, rows, b_["gu"] + b * 2 * fj * ELEM, fj, b * F + fo[j])
    _record_ffn(t, plan, pe, col, jj.reshape(-1), ho, fo, H, F)


def _record_attention(t, plan, pe, col, rowi, pe_of, kernel: bool = False) -> None:
    """The attention tensors of a dense layer region (its rows: attention.head_rows);
    kernel: the attention alone (`--op attention`), q | k | v after RoPE its input."""
    spec, b_, S, B = plan.spec, plan.buf, plan.shapes, plan.params.batch
    H, hd, n_qkv = spec.hidden_size, spec.head_dim, spec.q_size + 2 * spec.kv_size
    sinks = t.add("sinks", "weight", (spec.heads,)) if "sinks" in b_ else None
    attn = t.add("attn", "output", (B, spec.attn_out_size))
    if kernel:
        qkv_in = t.add("qkv", "input", (B, n_qkv))
        return _record_heads(t, plan, pe, col, rowi, (None, None, None, None, None, sinks, qkv_in, attn), pe_of)
    w_qkv = t.add("w_qkv", "weight", (H, n_qkv), S["qkv"].store)
    b_qkv = t.add("b_qkv", "weight", (n_qkv,)) if "b_qkv" in b_ else None
    w_o = t.add("w_o", "weight", (spec.attn_out_size, H), S["o"].store)
    for name in ("qkv", "o"):
        record_scale(t, f"w_{name}", S[name], pe, {0: 0}, 1)
    cos, sin = t.add("rope_cos", "input", (hd // 2,)), t.add("rope_sin", "input", (hd // 2,))
    qkv_out = None if plan.moe else t.add("qkv", "output", (B, n_qkv))  # q and k rotated (MoE: the router's)
    _record_heads(t, plan, pe, col, rowi, (w_qkv, b_qkv, w_o, cos, sin, sinks, qkv_out, attn), pe_of)


def _record_heads(t, plan, pe, col, rowi, tensors: tuple, pe_of) -> None:
    """Row by row, the pieces of a dense layer's attention tensors (those given: the others None)."""
    w_qkv, b_qkv, w_o, cos, sin, sinks, qkv_out, attn = tensors
    spec, b_, S, B = plan.spec, plan.buf, plan.shapes, plan.params.batch
    Q, hr, H = plan.Q, plan.rows, spec.hidden_size
    g, n_qkv = spec.heads // spec.kv_heads, spec.q_size + 2 * spec.kv_size
    hc, ho = np.array(plan.Hc), np.array(offsets(plan.Hc))
    for j in range(Q):
        kv, p0, kh = hr.kv_r[j], hr.p0_r[j], hr.kh_r[j]
        pp, L, hb = kh // 2, plan.qkv_r[j], hr.hb_r[j]
        rows = pe[rowi == j]
        cj = col[rowi == j]
        if "sinks" in b_:  # the row's heads' sink logits (read at column 0, by rows without dims too)
            for h, head in enumerate(k * g + m for k in kv for m in range(g)):
                t.pieces(sinks, rows, b_["sinks"] + h * ELEM, 1, head)
        if not L:
            continue
        vec = by_heads(plan.params, hb, plan.tc_max)
        for local, gcol, n, stride in qkv_runs(spec, kv, p0, kh, g, vec):  # W_qkv: a piece per tile row and run
            r = np.arange(hc.max())
            pr, rr = np.meshgrid(np.arange(len(rows)), r, indexing="ij")
            keep = rr < hc[cj][pr]
            if w_qkv is not None:
                tile_pieces(t, w_qkv, S["qkv"], rows[pr][keep], rr[keep], local, n,
                            (ho[cj][pr][keep] + rr[keep]) * n_qkv + gcol, stride=stride)
            if b_qkv is not None:
                t.pieces(b_qkv, rows, b_["b_qkv"] + local * ELEM, n, gcol, stride)
            for b in range(B if qkv_out is not None else 0):
                t.pieces(qkv_out, rows, b_["qkv"] + (b * L + local) * ELEM, n, b * n_qkv + gcol, stride)
        # cos and sin of the row's pairs, for each element of a half (by heads: a pair's g heads in a row)
        spans = [(dd * hb, hb, p0 + dd, 0) for dd in range(pp)] if vec else [(k * pp, pp, p0, 1) for k in range(hb)]
        spans += [(hb * pp + k * pp, pp, p0, 1) for k in range(len(kv))]
        for at, n, start, stride in spans if cos is not None else ():
            t.pieces(cos, rows, b_["cos"] + at * ELEM, n, start, stride)
            t.pieces(sin, rows, b_["sin"] + at * ELEM, n, start, stride)
        for r, grow in enumerate(o_rows(spec, kv, p0, kh, g, vec)):  # W_o: row j's attention dims
            if w_o is not None:
                tile_pieces(t, w_o, S["o"], rows, r, 0, hc[cj], grow * H + ho[cj])
            for b in range(B):
                t.pieces(attn, rows, b_["att"] + (b * plan.o_r[j] + r) * ELEM, 1, b * spec.attn_out_size + grow)
    _record_cache(t, plan, plan.P, pe_of)


def record_attention_kernel(t: TensorRecorder, plan) -> None:
    """/tensors of the attention kernel (`--op attention`, flash): a layer region running only its
    attention, at the mesh origin; q | k | v (after RoPE) and the caches in, the output out."""
    P, Q, b_ = plan.P, plan.Q, plan.buf
    ii, jj = np.meshgrid(np.arange(P), np.arange(Q))
    pe, col = (jj * P + ii).reshape(-1), ii.reshape(-1)
    z = plan.mem.buffers["zeros"]
    t.pieces(t.add("zeros", "zero", (z[1] // ELEM,)), pe, z[0], z[1] // ELEM, 0)
    scale = t.add("attn_scale", "constant", (1,), value=attn_scale(plan.spec))
    t.pieces(scale, pe, b_["consts"] + C_ATTN * ELEM, 1, 0)
    _record_attention(t, plan, pe, col, jj.reshape(-1), lambda i, j: j * P + i, kernel=True)


def qkv_runs(spec, kv: tuple[int, ...], p0: int, kh: int, g: int, by_heads: bool = False
             ) -> list[tuple[int, int, int, int]]:
    """Row layout of q | k | v (attention.dense_row) as runs (local offset, global column, count,
    column stride): [qa | ka | qb | kb | v], a head's pairs p0.. in each half (by_heads: the
    query halves dim-major, pair dd of the g heads of each KV head a run of stride head_dim),
    its dims in that order in v."""
    hd, pp, qs = spec.head_dim, kh // 2, spec.q_size
    hb = g * len(kv)
    q_heads = [k * g + m for k in kv for m in range(g)]
    runs, at = [], 0
    for half in (0, hd // 2):
        if by_heads:
            runs += [(at + dd * hb + n * g, k * g * hd + half + p0 + dd, g, hd) for dd in range(pp)
                     for n, k in enumerate(kv)]
            at += hb * pp
        else:
            for h in q_heads:
                runs.append((at, h * hd + half + p0, pp, 1))
                at += pp
        for k in kv:
            runs.append((at, qs + k * hd + half + p0, pp, 1))
            at += pp
    for k in kv:
        for half in (0, hd // 2):
            runs.append((at, qs + spec.kv_size + k * hd + half + p0, pp, 1))
            at += pp
    return [r for r in runs if r[2]]


def dim_of(hd: int, p0: int, kh: int, dd: int) -> int:
    """A head's dim that a row's dim dd is (its pairs p0.., then their second halves)."""
    pp = kh // 2
    return p0 + dd if dd < pp else hd // 2 + p0 + dd - pp


def o_rows(spec, kv: tuple[int, ...], p0: int, kh: int, g: int, by_heads: bool = False) -> list[int]:
    """The attention-output dims of a row's att vector, in order: head by head (by_heads: dim by
    dim), a head's dims in dim_of's order."""
    hd = spec.head_dim
    heads = [k * g + m for k in kv for m in range(g)]
    if by_heads:
        return [h * hd + dim_of(hd, p0, kh, dd) for dd in range(kh) for h in heads]
    return [h * hd + dim_of(hd, p0, kh, dd) for h in heads for dd in range(kh)]


def _record_cache(t: TensorRecorder, plan, P: int, pe_of) -> None:
    """k_cache, v_cache [batch, tokens - 1, kv_size]: column i holds tokens in slots 1..tc-1 and
    (but the last column) the one it passes east in slot 0; slot tc receives this step's token."""
    from .attention import attn_row
    spec, hr, B = plan.spec, plan.rows, plan.params.batch
    T1, kvs, hd = sum(plan.T_c) - 1, spec.kv_size, spec.head_dim
    kc, vc = t.add("k_cache", "input", (B, T1, kvs)), t.add("v_cache", "input", (B, T1, kvs))
    stay = [tc - 1 for tc in plan.T_c]
    first_tok = offsets(stay)
    for j in range(plan.Q):
        kv, p0, kh = hr.kv_r[j], hr.p0_r[j], hr.kh_r[j]
        row = attn_row(plan, (hr.hb_r[j], len(kv), kh, False), plan.qkv_r[j], ())  # (the cache's layout only)
        for i in range(P):
            pe = pe_of(i, j)
            for b in range(B):
                for d in range(row.dims):
                    k, dd = divmod(d % row.kd, kh) if row.kd else (0, 0)
                    tensor = kc if d < row.kd else vc
                    gdim = kv[k] * hd + dim_of(hd, p0, kh, dd)
                    if stay[i] > 0:
                        t.pieces(tensor, pe, row.at(b, d, 1), stay[i], (b * T1 + first_tok[i]) * kvs + gdim, kvs)
                    if i < P - 1:
                        t.pieces(tensor, pe, row.at(b, d, 0), 1, (b * T1 + sum(stay) + i) * kvs + gdim)


def _record_ffn(t: TensorRecorder, plan, pe, col, row, ho, fo, H: int, F: int, experts: int = 0,
                copies: dict[int, int] | None = None, store: int | None = None) -> None:
    """W_gate, W_up [hidden, ffn] (the gate_up tile: gate columns, then up), W_down [ffn, hidden];
    with experts > 0, [experts, ...] of them, expert e in the e-th copy of the tiles, or in the
    copy `copies` maps it from (copy -> expert: the region holds those). Tensors made earlier
    (by the layer region, for its expert regions) get these pieces too; `store`: the element
    type the tensors are made with (default the tiles')."""
    S, hc, fr = plan.shapes, np.array(plan.Hc), np.array(plan.f_r)
    lead = (experts,) if experts else ()
    names = (("w_gate", lead + (H, F)), ("w_up", lead + (H, F)), ("w_down", lead + (F, H)))
    gu, dn = S["gate_up"], S["down"]
    wg, wu, wd = (weight_tensor(t, name, shape, store if store is not None else sh.store)
                  for (name, shape), sh in zip(names, (gu, gu, dn)))
    copies = copies if copies is not None else {e: e for e in range(max(experts, 1))}
    for c, e in copies.items():
        for r in range(int(hc.max())):  # gate_up tile row r of PE (i, j): hidden row ho[i] + r, the row's f dims
            m = (hc[col] > r) & (fr[row] > 0)
            for k, w in enumerate((wg, wu)):
                tile_pieces(t, w, gu, pe[m], r, k * fr[row[m]], fr[row[m]],
                            e * H * F + (ho[col[m]] + r) * F + fo[row[m]], c)
        if dn.dots:  # stored by output: output o of the column's chunk, the row's ffn dims (stride H)
            for o in range(int(hc.max())):
                m = (hc[col] > o) & (fr[row] > 0)
                t.pieces(wd, pe[m], tile_addr(dn, 0, o, c), fr[row[m]], e * F * H + fo[row[m]] * H + ho[col[m]] + o, H)
            continue
        for r in range(int(fr.max())):  # down tile row r: ffn dim fo[j] + r, the column's hidden chunk
            m = fr[row] > r
            t.pieces(wd, pe[m], tile_addr(dn, r, 0, c), hc[col[m]], e * F * H + (fo[row[m]] + r) * H + ho[col[m]])
    n = max(experts, 1)
    record_scale(t, "w_gate+w_up", gu, pe, copies, n)
    record_scale(t, "w_down", dn, pe, copies, n)
    if plan.spec.moe and plan.spec.moe.expert_bias and experts:
        _record_expert_bias(t, plan, pe, col, row, ho, fo, H, F, experts, copies)


def _record_expert_bias(t, plan, pe, col, row, ho, fo, H: int, F: int, n: int, copies: dict[int, int] | None) -> None:
    """Per expert: row j's [gate | up] biases, column i's down biases (copy c of b_gu / b_dn)."""
    b_ = plan.buf
    fr, gs, ds = np.array(plan.f_r), 2 * max(plan.f_r) * ELEM, max(plan.Hc) * ELEM
    hc = np.array(plan.Hc)
    bg, bu, bd = (weight_tensor(t, name, (n, w)) for name, w in (("b_gate", F), ("b_up", F), ("b_down", H)))
    sel = fr[row] > 0
    for c, e in (copies if copies is not None else {e: e for e in range(n)}).items():
        for half, w in enumerate((bg, bu)):
            t.pieces(w, pe[sel], b_["b_gu"] + c * gs + half * fr[row[sel]] * ELEM, fr[row[sel]], e * F + fo[row[sel]])
        t.pieces(bd, pe, b_["b_dn"] + c * ds, hc[col], e * H + ho[col])


def _record_moe(t: TensorRecorder, plan, pe, col, row, ho, fo, H: int) -> None:
    """The router W_router [hidden, experts] (row j: its experts), its bias, every expert's tiles
    (routed experts, then shared: [experts + shared, ...]; with expert regions, only the shared
    ones here), and the router's logits and the gates as outputs."""
    S, b_, B, m = plan.shapes, plan.buf, plan.params.batch, plan.spec.moe
    hc, er = np.array(plan.Hc), np.array(plan.e_r)
    eo = np.array(offsets(plan.e_r))
    E, k = m.experts, m.experts_per_token
    wr = t.add("w_router", "weight", (H, E))
    logits = t.add("router", "output", (B, E))
    for r in range(int(hc.max())):
        sel = (hc[col] > r) & (er[row] > 0)
        tile_pieces(t, wr, S["router"], pe[sel], r, 0, er[row[sel]], (ho[col[sel]] + r) * E + eo[row[sel]])
    sel = er[row] > 0
    for b in range(B):
        t.pieces(logits, pe[sel], b_["qkv"] + b * er[row[sel]] * ELEM, er[row[sel]], b * E + eo[row[sel]])
    if "b_router" in b_:
        t.pieces(t.add("b_router", "weight", (E,)), pe[sel], b_["b_router"], er[row[sel]], eo[row[sel]])
    t.pieces(t.add("gates", "output", (B, k)), pe, b_["gates"], k * B, 0)
    if plan.routed:
        _record_ffn(t, plan, pe, col, row, ho, fo, H, m.expert_ffn_size, E + m.shared_experts)
    elif shared_apart(plan.spec, plan.params):  # the shared experts at their own precision: shared.*
        _record_ffn(Prefixed(t, "shared."), plan, pe, col, row, ho, fo, H, m.expert_ffn_size, m.shared_experts)
    else:  # with expert regions: into the layer's expert tensors, at the routed experts' precision
        from .precision import STORE, weights_of
        _record_ffn(t, plan, pe, col, row, ho, fo, H, m.expert_ffn_size, E + m.shared_experts,
                    {c: E + c for c in range(m.shared_experts)}, STORE[weights_of(plan.spec, plan.params.weights)[1]])


def shared_apart(spec, params) -> bool:
    """Whether a layer with expert regions records its shared experts as tensors of their own
    (`shared.w_gate`, ... [shared, ...]): when they are stored at another precision than the
    routed ones (the layer region's tiles at the dense weights', the expert regions' at the
    experts'); else the layer's expert tensors hold them after the routed experts."""
    from .precision import weights_of
    dense, expert = weights_of(spec, params.weights)
    return bool(spec.moe and spec.moe.shared_experts) and dense != expert


def record_experts(t, ep, origin: tuple[int, int, int], collector: bool, use: bool, boundary: bool = False) -> None:
    """An expert region's tiles (plan: experts.ExpertPlan of routed experts e0..e1-1) into its
    layer's expert tensors, and, at the collector, the layer's output h on its lane PEs (at a
    wafer's boundary, where the layer's experts continue on the next wafer: the combine so far,
    `combine_out`)."""
    W, x0, y0 = origin
    P, Q, H, m = ep.P, ep.Q, ep.spec.hidden_size, ep.spec.moe
    ii, jj = np.meshgrid(np.arange(P), np.arange(Q))
    pe, col, row = ((y0 + jj) * W + x0 + ii).reshape(-1), ii.reshape(-1), jj.reshape(-1)
    ho, fo = np.array(offsets(ep.Hc)), np.array(offsets(ep.f_r))
    e0, e1 = ep.experts
    z = ep.mem.buffers["zeros"]
    t.pieces(t.add(f"experts{e0}.zeros", "zero", (z[1] // ELEM,)), pe, z[0], z[1] // ELEM, 0)
    n = m.experts + (0 if shared_apart(ep.spec, ep.params) else m.shared_experts)
    _record_ffn(t, ep, pe, col, row, ho, fo, H, m.expert_ffn_size, n, {c: e0 + c for c in range(e1 - e0)})
    if collector or boundary:
        out = t.add("out" if collector else "combine_out", "output", (ep.params.batch, H))
        h = ep.buf["h"] if use else ep.buf["hin"]
        for d, hi in enumerate(ep.Hc):  # lane d: PE (d, d), chunk d per sequence back to back
            for b in range(ep.params.batch):
                t.pieces(out, (y0 + d) * W + x0 + d, h + b * hi * ELEM, hi, b * H + ho[d])


def reference(meta: dict, x: dict) -> dict:
    """One decode layer in float64: RMSNorm, q|k|v, RoPE (rotate-half), attention over the cache
    and this token (with attention sinks where given), O, residual, RMSNorm, then SiLU(gate) * up,
    down, residual — or a MoE layer's router, gates and experts (_moe); latent attention in its
    absorbed form (mla_tensors.reference_mla)."""
    from .models import spec_of
    spec = spec_of(meta)
    h = x["h"]

    def rms(v, w):
        return v * w / np.sqrt((v ** 2).mean(axis=-1, keepdims=True) + NORM_EPS)
    moe = spec.is_moe_layer(int(meta["layer"]))
    if spec.mla:
        from .mla_tensors import reference_mla
        h1, att = reference_mla(spec, x, h, rms)
    else:
        h1, att = _attention(spec, x, h, rms, moe)
    xn = rms(h1, x["g2"])

    if moe:
        return dict(att, **_moe(spec, meta, x, xn, h1))
    a, down = _ffn(spec, x, xn)
    y = down(a)
    return dict(att, out=h1 + y, ffn_out=y, ffn_act=a, mid=h1)  # (mid: what a split layer's layer region passes on)


def _attention(spec, x: dict, h, rms, moe: bool) -> tuple[np.ndarray, dict]:
    """A dense layer's attention in float64: (h after its residual, the intermediates recorded as
    outputs: the attention output, and q | k | v after RoPE unless a MoE FFN reuses their buffer)."""
    hd, qs, kvs = spec.head_dim, spec.q_size, spec.kv_size
    B = h.shape[0]

    def rope(v):
        a, c = v[..., : hd // 2], v[..., hd // 2:]
        return np.concatenate([a * x["rope_cos"] - c * x["rope_sin"], c * x["rope_cos"] + a * x["rope_sin"]], -1)
    qkv = rms(h, x["g1"]) @ x["w_qkv"] + (x["b_qkv"] if "b_qkv" in x else 0)
    q = rope(qkv[:, :qs].reshape(B, spec.heads, hd))
    k = rope(qkv[:, qs:qs + kvs].reshape(B, spec.kv_heads, hd))
    v = qkv[:, qs + kvs:].reshape(B, spec.kv_heads, hd)
    att = attend(spec, q, k, v, x)
    h1 = h + att.reshape(B, -1) @ x["w_o"] + (x["b_o"] if "b_o" in x else 0)
    out = {"attn": att.reshape(B, -1)}
    if not moe:
        out["qkv"] = np.concatenate([q.reshape(B, -1), k.reshape(B, -1), v.reshape(B, -1)], axis=1)
    return h1, out


def attend(spec, q, k, v, x: dict) -> np.ndarray:
    """Grouped-query attention of this token's q [B, heads, hd] over the cache (x's k_cache and
    v_cache [B, tokens - 1, kv_size]) and its own k, v [B, kv_heads, hd], attention sinks where x
    has them: [B, heads, hd]."""
    B, hd, g = q.shape[0], spec.head_dim, spec.heads // spec.kv_heads
    K = np.concatenate([x["k_cache"].reshape(B, -1, spec.kv_heads, hd), k[:, None]], axis=1)
    V = np.concatenate([x["v_cache"].reshape(B, -1, spec.kv_heads, hd), v[:, None]], axis=1)
    att = np.empty((B, spec.heads, hd))
    for hq in range(spec.heads):
        s = np.einsum("btd,bd->bt", K[:, :, hq // g], q[:, hq]) / np.sqrt(hd)
        top = s.max(axis=1, keepdims=True)
        sink = 0.0
        if "sinks" in x:  # a learned logit that joins the softmax and weights no value
            top = np.maximum(top, x["sinks"][hq])
            sink = np.exp(x["sinks"][hq] - top[:, 0])
        p = np.exp(s - top)
        att[:, hq] = np.einsum("bt,btd->bd", p / (p.sum(axis=1) + sink)[:, None], V[:, :, hq // g])
    return att


def _ffn(spec, x: dict, xn, e: int | None = None):
    """SiLU(gate) * up, and the down projection (with the expert's biases, if any): the dense
    FFN, or expert e's (a shared one's from shared.* when the layer records them apart)."""
    pre, k = "", e
    if e is not None and e >= spec.moe.experts and "shared.w_gate" in x:
        pre, k = "shared.", e - spec.moe.experts
    w = {n: x[pre + n] if e is None else x[pre + n][k]
         for n in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down") if pre + n in x}
    gate, up = xn @ w["w_gate"] + w.get("b_gate", 0), xn @ w["w_up"] + w.get("b_up", 0)
    return gate / (1 + np.exp(-gate)) * up, lambda a: a @ w["w_down"] + w.get("b_down", 0)


def routed_sum(spec, layer: int, skew: float, x: dict, xn, gates, experts: tuple[int, int]):
    """The gate-weighted outputs of the routed experts [first, last) each sequence chose
    (gates[b, j] weights its j-th choice), summed per sequence: [B, hidden]."""
    from .ffn import moe_choices
    B = xn.shape[0]
    choices = moe_choices(spec, layer, B, skew)
    out = np.zeros((B, spec.hidden_size))
    for e in range(*experts):
        users = [b for b in range(B) if e in choices[b]]
        if users:
            a, down = _ffn(spec, x, xn, e)
            y = down(a)
            for b in users:
                out[b] += gates[b, choices[b].index(e)] * y[b]
    return out


def _moe(spec, meta: dict, x: dict, xn, h1) -> dict:
    """A MoE layer's FFN: router logits, the gates of the experts each sequence chose (softmax
    over their logits), their FFNs and the shared experts' summed into the residual stream (and
    h with the shared experts' alone: what a layer region with expert regions passes on; with
    meta `experts` "e0,e1", `combine_out`: that plus only those routed experts' — what a wafer
    whose layer's experts continue on the next wafer hands on)."""
    from .ffn import moe_choices
    m, B = spec.moe, xn.shape[0]
    layer, skew = int(meta["layer"]), float(meta.get("expert_skew", 0))
    logits = xn @ x["w_router"] + (x["b_router"] if "b_router" in x else 0)
    choices = moe_choices(spec, layer, B, skew)
    shared, gates = h1.copy(), np.zeros((B, m.experts_per_token))
    for b, chosen in enumerate(choices):
        z = logits[b, chosen]
        gates[b] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    for e in range(m.experts, m.experts + m.shared_experts):
        a, down = _ffn(spec, x, xn, e)
        shared += down(a)
    out = {"out": shared + routed_sum(spec, layer, skew, x, xn, gates, (0, m.experts)), "router": logits,
           "gates": gates, "shared_out": shared}
    if meta.get("experts"):
        part = tuple(int(v) for v in meta["experts"].split(","))
        out["combine_out"] = shared + routed_sum(spec, layer, skew, x, xn, gates, part)
    return out


def functional_gap(spec, layer: int, params, plan=None, in_step: bool = False) -> str | None:
    """Why a layer's values cannot be checked yet (None: they can); in_step: in the whole decode
    step (a layer with expert regions is checked there, with them)."""
    if spec.is_moe_layer(layer) and plan is not None and not plan.routed and not in_step:
        return "a MoE layer with expert regions is checked with them, in the whole step (give --full)"
    if plan is not None and min(min(t) for t in plan.T_g) < 1:
        groups = f" x {len(plan.T_g)} row groups" if len(plan.T_g) > 1 else ""
        return (f"it attends to {sum(plan.T_c)} tokens, fewer than the region's {plan.P} columns{groups} (a column "
                "would hold none)")
    return None


def layer_trace(spec, layer: int, P: int, Q: int, cfg, params):
    """One dense decode layer on a P x Q region at the mesh origin, with its /tensors: h in by
    /tensors (no lanes), out in place. WseError naming what is missing when it cannot be checked."""
    from ..errors import WseError
    from .layer import decode_layer
    from .layer_sizes import plan_layer
    from .mesh import MeshBuilder, Region
    from .models import model_meta
    from .region import THREADS, Lanes
    plan = plan_layer(spec, layer, P, cfg, params, Q=Q)
    gap = functional_gap(spec, layer, params, plan)
    if gap:
        raise WseError(f"{spec.name} layer {layer}: not checkable functionally: {gap}")
    b = MeshBuilder(P, Q, THREADS, kernel="layer", **model_meta(spec), layer=layer, region=f"{P}x{Q}",
                    batch=params.batch, context=params.context, expert_skew=params.expert_skew)
    decode_layer(plan, Region(0, 0, P, Q), b, Lanes(None, {}, None, {}))
    record_layer(b.tensors, plan, P)
    return b.build()
