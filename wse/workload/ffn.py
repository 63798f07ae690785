"""Feed-forward blocks of a decode step: the gated FFN on a region, the MoE router and top-k,
and which routed experts a batch chooses (docs/workloads.md).

The gated FFN reads the FFN input from column layout: gate/up reduce along X (outputs split
over rows), SiLU . up on the rows, down reduces along Y back to column layout. A MoE layer runs
the router GEMV, a top-k (k max passes plus an all-reduce of the k winners), and each chosen
expert's FFN over the sequences routed to it, adding its gate-weighted output into the
residual stream.
"""
from __future__ import annotations

import dataclasses

from ..errors import WseError
from ..trace import compute
from .gemv import ELEM, GemvShape, gemv_ops
from .mesh import X, Y
from .models import ModelSpec
from .params import DecodeParams
from .region import ADD, C_EPS, FMAC, MAX, MOV, MUL, RSQRT, SCALE, SILU, Ops, merge


def norm_scale_ops(n: int, batch: int, out: int, scal: int, consts: int) -> list:
    """An RMSNorm's end: 1/RMS = rsqrt(mean + eps) of each sequence's reduced mean square (at
    out + n * batch elements) into scal, then (fused) each sequence's n reduced GEMV outputs at
    out scaled by it."""
    sums = out + n * batch * ELEM
    ops = [compute(RSQRT, batch, dst=scal, src0=sums, src1=consts + C_EPS * ELEM)]
    return ops + [compute(SCALE, n, dst=out + b * n * ELEM, src0=out + b * n * ELEM, src1=scal + b * ELEM)
                  for b in range(batch) if n]


def ffn_ops(S: dict[str, GemvShape], f_r: list[int], Hc: list[int], red: dict, buf: dict[str, int], i: int,
            j: int, xrole: tuple, yrole: tuple, expert: int, batch: int, norm: bool = False) -> Ops:
    """Gated FFN of PE (i, j) on `batch` sequences: gate/up (reduce X), SiLU(gate) * up, down
    (reduce Y).

    norm: xn is the RMSNorm's weighted input not yet divided by its RMS; the gate/up
    all-reduce carries the sums of squares (layer.norm_ops, which cleared the accumulators)
    and the outputs are scaled after it.

    Reads xn (the column's chunk per sequence, back to back), leaves the output chunk in y
    (likewise); the row's [gate | up] per sequence in gate_up. `expert` selects the expert's
    copy of the tiles (and of the biases, where buf holds b_gu and b_dn: experts with biases add
    them to the reduced gate/up and down outputs).
    """
    s_gu = dataclasses.replace(S["gate_up"], weights=S["gate_up"].weights + expert * S["gate_up"].tile_bytes())
    s_dn = dataclasses.replace(S["down"], weights=S["down"].weights + expert * S["down"].tile_bytes())
    gu, yb, tmp, z = buf["gu"], buf["y"], buf["tmp"], buf["zeros"]
    fj, hi = f_r[j], Hc[i]
    gs, ys = 2 * fj * ELEM, hi * ELEM
    out = {0: [] if norm or not fj else [compute(MOV, 2 * fj * batch, dst=gu, src0=z)]}
    out[0] += gemv_ops(s_gu, i, j, buf["xn"], gu, batch, ys, gs)
    merge(out, red[X].role_ops(xrole, 2 * fj * batch + (batch if norm else 0), gu, tmp))
    if norm:
        out[0] += norm_scale_ops(2 * fj, batch, gu, buf["scal"], buf["consts"])
    bias = "b_gu" in buf
    if bias and fj:
        gb = buf["b_gu"] + expert * 2 * max(f_r) * ELEM
        out[0] += [compute(ADD, 2 * fj, dst=gu + b * gs, src0=gu + b * gs, src1=gb) for b in range(batch)]
    for b in range(batch if fj else 0):  # (a row with no FFN dims when there are more rows than FFN dims)
        g = gu + b * gs
        out[0] += [compute(SILU, fj, dst=g, src0=g), compute(MUL, fj, dst=g, src0=g, src1=g + fj * ELEM)]
    out[0].append(compute(MOV, hi * batch, dst=yb, src0=z))
    out[0] += gemv_ops(s_dn, j, i, gu, yb, batch, gs, ys)
    merge(out, red[Y].role_ops(yrole, hi * batch, yb, tmp))
    if bias:
        db = buf["b_dn"] + expert * max(Hc) * ELEM
        out[0] += [compute(ADD, hi, dst=yb + b * ys, src0=yb + b * ys, src1=db) for b in range(batch)]
    return out


def moe_ffn_ops(ctx, i: int, jf: int, je: int, xrole: tuple, yrole: tuple) -> Ops:
    """A MoE layer's FFN on a layer region: router GEMV (reduce X), router bias, top-k (k max
    passes over the row's logits, merged down the columns), then each expert this region
    computes, its gate-weighted output added into the residual stream (`ctx`: LayerCtx)."""
    plan, rx, ry = ctx.plan, ctx.rx, ctx.ry
    spec, b_, B, S = plan.spec, plan.buf, plan.params.batch, plan.shapes
    m = spec.moe
    e_r, Hc = plan.e_r, plan.Hc
    xn, qkv, tmp, dot, h, yb = b_["xn"], b_["qkv"], b_["tmp"], b_["dot"], b_["h"], b_["y"]
    hstride = max(Hc) * ELEM
    ej = e_r[je]
    out = {0: gemv_ops(S["router"], i, je, xn, qkv, B, hstride, max(e_r) * ELEM)}
    merge(out, rx.role_ops(xrole, ej * B, qkv, tmp))
    if "b_router" in b_ and ej:
        out[0] += [compute(ADD, ej, dst=qkv + b * max(e_r) * ELEM, src0=qkv + b * max(e_r) * ELEM,
                           src1=b_["b_router"]) for b in range(B)]
    if ej:  # top-k: k max passes over the row's logits, merged down the columns
        out[0] += [compute(MAX, ej * B, dst=qkv, src0=qkv, src1=dot) for _ in range(m.experts_per_token)]
    merge(out, ry.role_ops(yrole, m.experts_per_token * B, b_.get("gates", b_["scal"]), tmp, MAX))
    for e, users in plan.local_experts().items():
        merge(out, ffn_ops(S, plan.f_r, Hc, ctx.red, b_, i, jf, xrole, yrole, e, users))
        out[0].append(compute(FMAC, Hc[i] * users, dst=h, src0=yb))  # gate-weighted sum into h
    return out


def moe_experts(spec: ModelSpec, layer: int, batch: int, skew: float = 0.0) -> dict[int, int]:
    """Experts computed in a MoE layer's decode step -> how many sequences use each.

    Each sequence picks k distinct routed experts by weighted sampling without replacement,
    from a generator seeded by (layer, sequence), so runs are reproducible: uniformly for
    skew = 0 (default: a token's experts land anywhere among the layer's, as a trained router's
    choices do for any one token), or for skew = s > 0 by a Zipf law, the r-th most popular
    expert of the layer (a fixed per-layer order) drawing weight 1 / (r + 1)^s. Shared experts
    serve every sequence.
    """
    import numpy as np
    m = spec.moe
    assert m
    if not skew >= 0:
        raise WseError(f"--expert-skew {skew} must be at least 0")
    p = None
    k = m.experts_per_token
    if skew > 0:
        order = np.random.default_rng([layer, 7919]).permutation(m.experts)
        log_w = -skew * np.log(np.arange(1, m.experts + 1))  # in logs: no overflow at any skew
        weight = np.empty(m.experts)
        weight[order] = np.exp(log_w - log_w.max())
        p = weight / weight.sum()
        if np.count_nonzero(p) < k:  # so skewed that only the most popular can be drawn: those k
            return _counted({int(e): batch for e in order[:k]}, m, batch)
    use: dict[int, int] = {}
    for b in range(batch):
        rng = np.random.default_rng([layer, b, 104729])
        for e in rng.choice(m.experts, size=k, replace=False, p=p):
            use[int(e)] = use.get(int(e), 0) + 1
    return _counted(use, m, batch)


def _counted(use: dict[int, int], m, batch: int) -> dict[int, int]:
    """`use` with the shared experts (every sequence uses them), in expert order."""
    use = dict(use)
    for s in range(m.shared_experts):
        use[m.experts + s] = batch
    return dict(sorted(use.items()))


def chosen_experts(spec: ModelSpec, layer: int, experts: tuple[int, int], params: DecodeParams) -> dict[int, int]:
    """Of routed experts [first, last) of a MoE layer, those the batch chose this step
    (index from first -> sequences using it)."""
    e0, e1 = experts
    use = moe_experts(spec, layer, params.batch, params.expert_skew)
    return {e - e0: u for e, u in use.items() if e0 <= e < e1}
