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
import functools
from typing import Callable

from .. import isa
from ..errors import WseError
from ..trace import compute, fill
from .gemv import ELEM, GemvShape, gemv_ops
from .mesh import X, Y
from .models import ModelSpec
from .params import DecodeParams
from .region import (ADD, C_EPS, C_ONE, EXP, FMAC, MOV, MUL, RECIP, RMAX, RSQRT, RSUM, SCALE, SILU, Ops,
                     merge)


def norm_scale_ops(n: int, batch: int, out: int, scal: int, consts: int) -> list:
    """An RMSNorm's end: 1/RMS = rsqrt(mean + eps) of each sequence's reduced mean square (at
    out + n * batch elements) into scal, then (fused) each sequence's n reduced GEMV outputs at
    out scaled by it."""
    sums = out + n * batch * ELEM
    ops = [compute(RSQRT, batch, dst=scal, src0=sums, src1=consts + C_EPS * ELEM)]
    return ops + [compute(SCALE, n, dst=out + b * n * ELEM, src0=out + b * n * ELEM, src1=scal + b * ELEM)
                  for b in range(batch) if n]


def ffn_ops(S: dict[str, GemvShape], f_r: list[int], Hc: list[int], red: dict, buf: dict[str, int], i: int,
            j: int, xrole: tuple, yrole: tuple, expert: int, batch: int, norm: bool = False,
            seqs: tuple[int, ...] | None = None, at_root: Ops | None = None) -> Ops:
    """Gated FFN of PE (i, j) on `batch` sequences: gate/up (reduce X), SiLU(gate) * up, down
    (reduce Y).

    norm: xn is the RMSNorm's weighted input not yet divided by its RMS; the gate/up
    all-reduce carries the mean squares (layer.norm_ops, which cleared the accumulators)
    and the outputs are scaled after it.

    Reads xn (the column's chunk per sequence, back to back), leaves the output chunk in y
    (likewise); the row's [gate | up] per sequence in gate_up. `expert` selects the expert's
    copy of the tiles (and of the biases, where buf holds b_gu and b_dn: experts with biases add
    them to the reduced gate/up and down outputs). seqs: the sequences of xn the `batch` outputs
    are for (default the first `batch`; a routed expert serves the sequences that chose it).
    at_root: ops nested at the down all-reduce's root (down_reduce_ops).
    """
    out: Ops = {0: []}
    for _, make in ffn_parts(S, f_r, Hc, red, buf, i, j, xrole, yrole, expert, batch, norm, seqs)[:-1]:
        merge(out, make())
    return merge(out, down_reduce_ops(red, buf, Hc, i, yrole, batch, expert, at_root))


def ffn_parts(S: dict[str, GemvShape], f_r: list[int], Hc: list[int], red: dict, buf: dict[str, int], i: int,
              j: int, xrole: tuple, yrole: tuple, expert: int, batch: int, norm: bool = False,
              seqs: tuple[int, ...] | None = None) -> list[tuple[tuple, Callable[[], Ops]]]:
    """ffn_ops (without at_root) in four steps, each as (key, make): gate/up's products, their X
    all-reduce, the products' end and down's products, down's Y all-reduce. The key is what a
    step depends on beyond the region (S, f_r, Hc, red and buf), so a region builder shares each
    step among the PEs that agree on it (region.PartCache): the all-reduces by role, the
    products by tile, where one key of the whole FFN had every PE class build it afresh."""
    seqs = tuple(seqs) if seqs is not None else None
    whole = seqs is None or seqs == tuple(range(batch))
    fj, hi = f_r[j], Hc[i]
    gs, ys = 2 * fj * ELEM, hi * ELEM
    gu, yb, tmp, z = buf["gu"], buf["y"], buf["tmp"], buf["zeros"]

    def gate_up() -> Ops:
        s_gu = _expert_shape(S["gate_up"], expert)
        ops = [] if norm or not fj else [fill(2 * fj * batch, gu, z)]
        if whole:
            return {0: ops + gemv_ops(s_gu, i, j, buf["xn"], gu, batch, ys, gs)}
        for n, b in enumerate(seqs):
            ops += gemv_ops(s_gu, i, j, buf["xn"] + b * ys, gu + n * gs, 1, ys, gs)
        return {0: ops}

    def end_and_down() -> Ops:
        ops = norm_scale_ops(2 * fj, batch, gu, buf["scal"], buf["consts"]) if norm else []
        if "b_gu" in buf and fj:
            gb = buf["b_gu"] + expert * 2 * max(f_r) * ELEM
            ops += [compute(ADD, 2 * fj, dst=gu + b * gs, src0=gu + b * gs, src1=gb) for b in range(batch)]
        for b in range(batch if fj else 0):  # (a row with no FFN dims when there are more rows than FFN dims)
            g = gu + b * gs
            ops += [compute(SILU, fj, dst=g, src0=g), compute(MUL, fj, dst=g, src0=g, src1=g + fj * ELEM)]
        ops.append(fill(hi * batch, yb, z))
        return {0: ops + gemv_ops(_expert_shape(S["down"], expert), j, i, gu, yb, batch, gs, ys)}

    m = 2 * fj * batch + (batch if norm else 0)
    return [(("gate_up", i, j, expert, batch, norm, None if whole else seqs), gate_up),
            (("gate_up_reduce", xrole, m), lambda: red[X].role_ops(xrole, m, gu, tmp)),
            (("down", i, j, expert, batch, norm), end_and_down),
            (("down_reduce", i, yrole, batch, expert if "b_dn" in buf else None),
             lambda: down_reduce_ops(red, buf, Hc, i, yrole, batch, expert))]


def _expert_shape(shape: GemvShape, expert: int) -> GemvShape:
    """shape with its weights and scales at expert's copy of the tiles."""
    return dataclasses.replace(shape, weights=shape.weights + expert * shape.tile_bytes(),
                               scales=shape.scales + expert * ELEM)


def down_reduce_ops(red: dict, buf: dict[str, int], Hc: list[int], i: int, yrole: tuple, batch: int,
                    expert: int = 0, at_root: Ops | None = None) -> Ops:
    """The end of a gated FFN on column i: the down projection's column all-reduce of the batch's
    output chunks at y (`at_root`: ops nested at its root between the sum and the broadcast, a
    fused hand-off's sync) and, where buf holds b_dn, the expert's down biases added after it."""
    hi, yb = Hc[i], buf["y"]
    out = red[Y].role_ops(yrole, hi * batch, yb, buf["tmp"], at_root=at_root)
    if "b_dn" in buf:
        out.setdefault(0, [])
        db, ys = buf["b_dn"] + expert * max(Hc) * ELEM, hi * ELEM
        out[0] += [compute(ADD, hi, dst=yb + b * ys, src0=yb + b * ys, src1=db) for b in range(batch)]
    return out


def moe_router_ops(ctx, i: int, je: int, e0: int, xrole: tuple, yrole: tuple) -> Ops:
    """A MoE layer's FFN on a layer region, first half: router GEMV (reduce X; row j's logits
    are experts e0.. of its chunk), router bias, the chosen experts' logits gathered (each from
    the row that holds it, summed down the columns), their softmax per sequence (the gates).
    The choice itself is the workload's (moe_choices), not the logits' top-k (`ctx`: LayerCtx).
    This half depends on the row's router experts (je, e0), the second (moe_expert_ops) on its
    FFN rows (jf) only, so a builder shares each among more PEs than it would the pair."""
    plan, rx, ry = ctx.plan, ctx.rx, ctx.ry
    spec, b_, B, S = plan.spec, plan.buf, plan.params.batch, plan.shapes
    m = spec.moe
    k = m.experts_per_token
    e_r, Hc = plan.e_r, plan.Hc
    xn, qkv, tmp, z = b_["xn"], b_["qkv"], b_["tmp"], b_["zeros"]
    gates, scal = b_["gates"], b_["scal"]
    ej = e_r[je]
    hs = Hc[i] * ELEM
    out = {0: [fill(ej * B, qkv, z)] if ej else []}
    out[0] += gemv_ops(S["router"], i, je, xn, qkv, B, hs, ej * ELEM)
    merge(out, rx.role_ops(xrole, ej * B, qkv, tmp))
    if "b_router" in b_ and ej:
        out[0] += [compute(ADD, ej, dst=qkv + b * ej * ELEM, src0=qkv + b * ej * ELEM, src1=b_["b_router"])
                   for b in range(B)]
    choices = moe_choices(spec, plan.layer, B, plan.params.expert_skew)
    out[0].append(fill(k * B, gates, z))
    out[0] += [compute(MOV, 1, dst=gates + (b * k + n) * ELEM, src0=qkv + (b * ej + e - e0) * ELEM)
               for b in range(B) for n, e in enumerate(choices[b]) if e0 <= e < e0 + ej]
    merge(out, ry.role_ops(yrole, k * B, gates, tmp))
    for b in range(B):  # softmax over the sequence's k logits
        g, mx, sm = gates + b * k * ELEM, scal + 2 * b * ELEM, scal + (2 * b + 1) * ELEM
        out[0] += [compute(MOV, 1, dst=mx, src0=g), compute(RMAX, k, dst=mx, src0=g),
                   compute(EXP, k, dst=g, src0=g, src1=mx), fill(1, sm, z),
                   compute(RSUM, k, dst=sm, src0=g), compute(RECIP, 1, dst=sm, src0=sm),
                   compute(SCALE, k, dst=g, src0=g, src1=sm)]
    return out


def moe_expert_ops(ctx, i: int, jf: int, xrole: tuple, yrole: tuple, sync: Ops | None = None) -> Ops:
    """A MoE layer's FFN on a layer region, second half: each expert this region computes over
    the sequences that chose it, its output added into the residual stream weighted by its gate
    (moe_router_ops computed them) or by 1 (shared experts). sync: a fused hand-off's, nested in
    the last expert's down all-reduce (region.handoff_sync)."""
    plan, b_, S = ctx.plan, ctx.plan.buf, ctx.plan.shapes
    out: Ops = {0: []}
    run = experts_run(plan)
    for n, (e, seqs, c) in enumerate(run):
        last = n == len(run) - 1
        merge(out, ffn_ops(S, plan.f_r, plan.Hc, ctx.red, b_, i, jf, xrole, yrole, c, len(seqs), seqs=seqs,
                           at_root=sync if last else None))
        out[0] += weighted_sum_ops(plan, i, e, seqs)
    return out


def experts_run(plan) -> list[tuple[int, tuple[int, ...], int]]:
    """The experts a MoE layer's region computes, in order: (expert, the sequences using it,
    its tile copy in the region) — routed ones only where they live in the region."""
    m = plan.spec.moe
    return [(e, seqs, e if plan.routed else e - m.experts)
            for e, seqs in expert_sequences(plan.spec, plan.layer, plan.params.batch, plan.params.expert_skew).items()
            if e >= m.experts or plan.routed]


def weighted_sum_ops(plan, i: int, e: int, seqs: tuple[int, ...]) -> list:
    """Expert e's outputs (at y, one per sequence in `seqs`) added into the residual stream of
    column i, each weighted by the sequence's gate for e (a shared expert's: 1)."""
    m, b_ = plan.spec.moe, plan.buf
    h, yb, gates = b_["h"], b_["y"], b_["gates"]
    one = b_["consts"] + C_ONE * ELEM
    hi, k = plan.Hc[i], m.experts_per_token
    hs = hi * ELEM
    choices = moe_choices(plan.spec, plan.layer, plan.params.batch, plan.params.expert_skew)
    return [compute(FMAC, hi, dst=h + b * hs, src0=yb + n * hs,
                    src1=one if e >= m.experts else gates + (b * k + choices[b].index(e)) * ELEM)
            for n, b in enumerate(seqs)]


def moe_gate_flops(k: int) -> int:
    """FLOPs of one sequence's gates: max (k), exp (k), sum (k), 1/sum (1), scale (k)."""
    return k + isa.KIND_FLOPS[isa.KIND_EXP] * k + k + isa.KIND_FLOPS[isa.KIND_RECIP] + k


def moe_choices(spec: ModelSpec, layer: int, batch: int, skew: float = 0.0) -> list[list[int]]:
    """(_moe_choices, remembered: region builders ask for it once per distinct program.)"""
    return [list(c) for c in _moe_choices(spec, layer, batch, skew)]


@functools.lru_cache(maxsize=4096)
def _moe_choices(spec: ModelSpec, layer: int, batch: int, skew: float = 0.0) -> tuple[tuple[int, ...], ...]:
    """The routed experts each sequence of a MoE layer's decode step chooses, in draw order:
    k distinct ones by weighted sampling without replacement from a generator seeded by
    (layer, sequence), uniformly for skew = 0 (default: a token's experts land anywhere among the
    layer's, as a trained router's choices do for any one token), or for skew = s > 0 by a Zipf
    law, the r-th most popular expert of the layer (a fixed per-layer order) drawing weight
    1 / (r + 1)^s. Runs are reproducible."""
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
            return tuple(tuple(int(e) for e in order[:k]) for _ in range(batch))
    return tuple(tuple(int(e) for e in np.random.default_rng([layer, b, 104729]).choice(m.experts, size=k, replace=False,
                                                                                        p=p))
                 for b in range(batch))


def expert_sequences(spec: ModelSpec, layer: int, batch: int, skew: float = 0.0) -> dict[int, tuple[int, ...]]:
    """Experts computed in a MoE layer's decode step -> the sequences using each (shared experts:
    every one), in expert order."""
    use: dict[int, list[int]] = {}
    for b, chosen in enumerate(moe_choices(spec, layer, batch, skew)):
        for e in chosen:
            use.setdefault(e, []).append(b)
    for s in range(spec.moe.shared_experts):
        use[spec.moe.experts + s] = list(range(batch))
    return {e: tuple(v) for e, v in sorted(use.items())}


def moe_experts(spec: ModelSpec, layer: int, batch: int, skew: float = 0.0) -> dict[int, int]:
    """Experts computed in a MoE layer's decode step -> how many sequences use each (moe_choices;
    shared experts serve every sequence), in expert order."""
    return {e: len(v) for e, v in expert_sequences(spec, layer, batch, skew).items()}


def chosen_experts(spec: ModelSpec, layer: int, experts: tuple[int, int], params: DecodeParams) -> dict[int, int]:
    """Of routed experts [first, last) of a MoE layer, those the batch chose this step
    (index from first -> sequences using it)."""
    e0, e1 = experts
    use = moe_experts(spec, layer, params.batch, params.expert_skew)
    return {e - e0: u for e, u in use.items() if e0 <= e < e1}
