"""A decoder layer's decode step on a layer region (docs/workloads.md).

Layout on a region of P columns and Q >= P rows (square: Q = P): the hidden vector is split
into P chunks, chunk i living on every PE of column i ("column layout"); vectors split over
rows are cut into Q chunks. GEMVs alternate their reduction axis: QKV and gate/up reduce along
X and leave their outputs split over rows ("row layout"); O and down reduce along Y and return
to column layout, so no transpose crosses the mesh. Attention is in attention.py, latent
attention's projections in mla.py, the FFN and the MoE router in ffn.py, the closed-form FLOPs
and weights in layer_costs.py, the layer's sizes and SRAM in layer_sizes.py (plan_layer); this
module sequences its parts (decode_layer).
"""
from __future__ import annotations

import dataclasses

from ..errors import WseError
from ..trace import Op, compute, with_tag, fill
from .attention import attn_row, by_heads, classic_ops, owned_heads
from .collectives import LineBroadcast
from .experts import dispatch_parts
from .ffn import (down_reduce_ops, experts_run, ffn_ops, moe_expert_ops, moe_router_ops, norm_scale_ops,
                  weighted_sum_ops)
from .flash import flash_ops
from .gemv import ELEM, gemv_ops
from .layer_costs import fused_handoff, fused_norms, layer_flops, layer_weight_bytes
from .layer_sizes import LayerPlan
from .mesh import HI, LO, RAMP, X, Y, MeshBuilder, Region, RegionProgram, offsets
from .mla import mla_output_ops, mla_project_parts
from .plan import COMBINE, DIAG_BCAST, KV_SHIFT
from .region import (ADD, C_EPS, C_INV_H, MUL, Lanes, Ops, PartCache, RegionBuild, anchor_of, handoff,
                     handoff_sync, i_chunk, mean_square_ops, merge, reducers, rms_apply_ops, rope_ops, special_key)


@dataclasses.dataclass
class LayerCtx:
    """What the parts of a layer's program share: its plan and its region's all-reduces."""

    plan: LayerPlan
    red: dict

    @property
    def rx(self):
        return self.red[X]

    @property
    def ry(self):
        return self.red[Y]

    def seg_reduce(self, srole: tuple, m: int, buf: int) -> Ops:
        """Flash's all-reduce of a block's scores among the rows that share their heads."""
        p = self.plan
        if p.segments:
            return self.ry.segment_ops(srole, m, buf, p.buf["tmp"])
        if p.column_scores:
            return self.ry.role_ops(srole, m, buf, p.buf["tmp"])
        return {}


def norm_ops(ctx: LayerCtx, hi: int, xrole: tuple, g: int, fused: tuple[int, int] | None = None):
    """RMSNorm of h into xn: mean squares (DOT of h and h / H), row all-reduce, 1/RMS =
    rsqrt(mean + eps), scale, weight. fused = (buffer, n): the sums wait after the next GEMV's n outputs per
    sequence, in its accumulator buffer (cleared here with them), for its row all-reduce; xn
    is h times the weight and the GEMV's outputs are divided by the RMS after its all-reduce
    (ffn.norm_scale_ops)."""
    b_, B = ctx.plan.buf, ctx.plan.params.batch
    h, xn, scal, tmp, z = b_["h"], b_["xn"], b_["scal"], b_["tmp"], b_["zeros"]
    hs = hi * ELEM  # column-layout vectors: the column's chunk per sequence, back to back
    sums, n = (fused[0] + fused[1] * B * ELEM, fused[1]) if fused else (scal, 0)
    out = {0: [fill((n + 1) * B, sums - n * B * ELEM, z)]}
    out[0] += mean_square_ops(B, h, xn, hs, hi, sums, b_["consts"] + C_INV_H * ELEM)
    if fused:
        out[0] += [compute(MUL, hi, dst=xn + b * hs, src0=h + b * hs, src1=g) for b in range(B)]
        return out
    merge(out, ctx.rx.role_ops(xrole, B, scal, tmp))
    out[0] += rms_apply_ops(B, h, xn, hs, hi, scal, g, b_["consts"] + C_EPS * ELEM)
    return out


def qkv_ops(ctx: LayerCtx, i: int, jq: int, qkv_row: tuple, xrole: tuple, norm: bool = False):
    """Fused QKV projection (reduce X): slice j of q|k|v on every PE of row j; bias; RoPE.
    norm: the RMSNorm before it is fused (norm_ops) and ends here. qkv_row = (hb, nk, kh):
    the row's query heads, KV pieces and dims per piece (attention.dense_row's layout; latent
    attention projects in mla.py)."""
    plan = ctx.plan
    b_, B, S, qkv_r = plan.buf, plan.params.batch, plan.shapes, plan.qkv_r
    xn, qkv, tmp = b_["xn"], b_["qkv"], b_["tmp"]
    qkvj = qkv_r[jq]
    ls = qkvj * ELEM  # the row's q|k|v per sequence, back to back
    out: Ops = {0: [] if norm or not qkvj else [fill(qkvj * B, qkv, b_["zeros"])]}
    out[0] += gemv_ops(S["qkv"], i, jq, xn, qkv, B, plan.Hc[i] * ELEM, ls)
    merge(out, ctx.rx.role_ops(xrole, qkvj * B + (B if norm else 0), qkv, tmp))
    if norm:
        out[0] += norm_scale_ops(qkvj, B, qkv, b_["scal"], b_["consts"])
    if "b_qkv" in b_ and qkvj:
        out[0] += [compute(ADD, qkvj, dst=qkv + b * ls, src0=qkv + b * ls, src1=b_["b_qkv"]) for b in range(B)]
    hb, nk, kh = qkv_row[:3]
    r = (hb + nk) * kh // 2  # the first halves [qa | ka], then the second halves [qb | kb]
    for b in range(B if r else 0):
        out[0] += rope_ops(qkv + b * ls, r, b_["cos"], b_["sin"], b_["rope"])
    return out


def o_ops(ctx: LayerCtx, i: int, jo: int, yrole: tuple):
    """O projection (reduce Y) back to column layout, bias, residual."""
    plan = ctx.plan
    b_, B, S, o_r, Hc = plan.buf, plan.params.batch, plan.shapes, plan.o_r, plan.Hc
    att, yb, tmp, h = b_["att"], b_["y"], b_["tmp"], b_["h"]
    hi = Hc[i]
    hs = hi * ELEM
    ostride = o_r[jo] * ELEM
    out = {0: [fill(hi * B, yb, b_["zeros"])]}
    out[0] += gemv_ops(S["o"], jo, i, att, yb, B, ostride, hs)
    merge(out, ctx.ry.role_ops(yrole, hi * B, yb, tmp))
    if "b_o" in b_:
        out[0] += [compute(ADD, hi, dst=yb + b * hs, src0=yb + b * hs, src1=b_["b_o"]) for b in range(B)]
    out[0].append(compute(ADD, hi * B, dst=h, src0=h, src1=yb))
    return out


def decode_layer(plan: LayerPlan, region: Region, builder: MeshBuilder, lanes: Lanes,
                 parts: tuple[str, ...] | None = None) -> RegionBuild:
    """Programs and routes of one decoder layer's decode step on `region` (or some `parts`;
    default: the plan's, all of a layer or one half of a split one)."""
    parts = plan.parts if parts is None else parts
    if not set(parts) <= set(plan.parts):
        raise WseError(f"layer {plan.layer}'s {plan.part} region has no parts {sorted(set(parts) - set(plan.parts))}")
    spec, P, Q, prm = plan.spec, plan.P, plan.Q, plan.params
    B = prm.batch
    b_ = plan.buf
    Hc, qkv_r, o_r, f_r, e_r = plan.Hc, plan.qkv_r, plan.o_r, plan.f_r, plan.e_r
    red = reducers(region, builder, prm, spec, plan.cfg)
    ctx = LayerCtx(plan, red)
    h, yb, qkv = b_["h"], b_["y"], b_.get("qkv", 0)
    prog = RegionProgram(region, plan.threads)
    prog.add_roles(X, [(i_chunk(Hc, i), i % 2, red[X].role(i), plan.T_c[i], i == 0, i == P - 1) for i in range(P)])
    seg = red[Y].segment_role if plan.segments else red[Y].role
    hr = plan.rows  # the rows of a dense layer: (query heads, KV pieces, dims per piece, by heads)
    qkv_rows = [(hr.hb_r[j], len(hr.kv_r[j]), hr.kh_r[j], by_heads(prm, hr.hb_r[j], plan.tc_max)) if hr else None
                for j in range(Q)]
    e0_r = offsets(e_r)  # the first expert of each row's router logits (MoE: the gates are gathered by it)
    own = owned_heads(spec, Q, hr) if not plan.flash else [None] * Q  # classic: the heads whose softmax it computes
    prog.add_roles(Y, [(i_chunk(qkv_r, j), plan.q_r[j], plan.k_r[j], i_chunk(o_r, j), i_chunk(f_r, j),
                        i_chunk(e_r, j), plan.heads_r[j], red[Y].role(j), seg(j) if plan.flash else None,
                        qkv_rows[j], e0_r[j], own[j]) for j in range(Q)])
    lanes.install(builder, prog)
    ms = plan.mla
    if ms:
        T_g = plan.T_g  # (each column's tokens per row group)
        prog.add_roles(X, [(i_chunk(ms.qn_r, i), ms.qn_r[i], ms.nope_runs[i], ms.pe_runs[i], i_chunk(ms.oh_r, i),
                            ms.oh_r[i], ms.oh_runs[i], tuple(t[i] for t in T_g)) for i in range(P)])
        hc_rows = Hc + [0] * (Q - P)  # the O projection's rows: column chunks on the first P
        prog.add_roles(Y, [(i_chunk(ms.qa_r, j), ms.qa_r[j], ms.c_r[j], ms.v_r[j], ms.rope_lo[j], ms.r_r[j],
                            i_chunk(hc_rows, j), hc_rows[j], ms.group_r[j], ms.lead_r[j] == j) for j in range(Q)])
        if Q > 1 and "o" in parts:  # the transpose back to column layout: each diagonal PE broadcasts down its column
            bc = LineBroadcast(Q, DIAG_BCAST)
            for d in range(P):
                prog.mark(d, d, "diag", 1)
                if lanes.in_lanes.get(d) != (d, d):  # (lanes entering on the diagonal already route it)
                    builder.line_routes(region, Y, DIAG_BCAST, bc.routes_for_root(d), lines=[d])
    for i in range(P - 1 if "attention" in parts else 0):  # KV shift: column i sends east on KV_SHIFT[i % 2]
        builder.line_routes(region, X, KV_SHIFT[i % 2], {i: (RAMP, (HI,)), i + 1: (LO, (RAMP,))})

    L_ = plan.layer
    fused1, fused2 = fused_norms(plan)
    tag = {name: builder.tag(f"layer {L_} {name}", L_, kind) for name, kind in (
        ("input", "transfer"), ("norm1", "norm"), ("qkv", "gemv"), ("attention", "attention"), ("o", "gemv"),
        ("norm2", "norm"), ("ffn", "ffn"), ("handoff", "barrier"), ("output", "transfer"))}

    cache = PartCache(tag)
    part = cache.add
    fused_end = fused_handoff(plan, parts)

    def fused_sync(xrole) -> Ops:  # (tagged as the hand-off: the FFN part nests it)
        return {t: [with_tag(op, tag["handoff"]) for op in ops]
                for t, ops in handoff_sync(red, xrole, b_["scal"], b_["tmp"]).items()}

    def body(xr, yr, sp):
        i, parity, xrole, tc, first_col, last_col = xr[0]
        jq, _, _, jo, jf, je, _, yrole, srole, qkv_row, e0, own_j = yr[0]
        hi, spk = Hc[i], special_key(sp)
        out: dict[int, list[Op]] = {0: []}
        part(out, "input", (spk, hi), lambda: lanes.receive(sp, hi * B, h, Q))
        if "norm1" in parts:
            part(out, "norm1", (hi, xrole, jq),
                 lambda: norm_ops(ctx, hi, xrole, b_["g1"], (qkv, qkv_r[jq]) if fused1 else None))
        if "qkv" in parts:
            if ms:  # (in three steps: each depends on less of the PE's roles than all of them)
                for key, make in mla_project_parts(ctx, i, jq, xr[1], yr[1], xrole, yrole):
                    part(out, "qkv", key, make)
            else:
                part(out, "qkv", (i, jq, qkv_row, xrole), lambda: qkv_ops(ctx, i, jq, qkv_row, xrole, fused1))
        if "attention" in parts:
            # latent attention in row groups: the group's tokens of the column; the first group takes
            # the new token and shifts, the groups' outputs merge down the columns (flash.flash_ops)
            grouped = None
            if ms and ms.groups > 1:
                tc, grouped = xr[1][7][yr[1][8]], (yrole, yr[1][9])  # (the column all-reduce, a group's first row)
            shift = grouped is None or yr[1][8] == 0

            def attention() -> Ops:
                row = attn_row(plan, qkv_row, qkv_r[jq], yr)
                if plan.flash:
                    return flash_ops(ctx, first_col, last_col, parity, tc, row, xrole, srole, shift, grouped)
                return classic_ops(ctx, first_col, last_col, parity, tc, row, own_j, xrole, yrole)
            # (attn_row reads the row's layout, and with latent attention its dims and offsets)
            row_key = (qkv_row, qkv_r[jq]) + ((yr[0][2], yr[1][1], yr[1][3]) if ms else ())
            part(out, "attention", (first_col, last_col, parity, tc, row_key, xrole, srole, own_j, yrole, shift,
                                    grouped), attention)
        if "o" in parts:
            if ms:
                def o_part() -> Ops:
                    ops = mla_output_ops(ctx, i, jo, xr[1], yr[1], xrole, yrole, sp)
                    ops[0].append(compute(ADD, hi * B, dst=h, src0=h, src1=yb))
                    return ops
                # (what mla_output_ops reads: the column's o dims and runs, the row's v dims and
                # O rows, the all-reduce roles, whether it is a diagonal PE; not the whole latent
                # layout, which differs on every PE)
                part(out, "o", (hi, xr[1][4:7], yr[1][3], yr[1][6:8], xrole, yrole, "diag" in sp), o_part)
            else:
                part(out, "o", (i, jo, yrole), lambda: o_ops(ctx, i, jo, yrole))
        if "norm2" in parts:
            part(out, "norm2", (hi, xrole, jf),
                 lambda: norm_ops(ctx, hi, xrole, b_["g2"], (b_["gu"], 2 * f_r[jf]) if fused2 else None))
        if "ffn" in parts:
            if plan.moe:  # (the experts' gate-weighted sums go into h themselves)
                # (two parts: the router's depends on the row's router experts, the experts' on its
                # FFN rows: each is shared by more PEs than their pair would be)
                part(out, "ffn", ("router", i, je, e0, xrole, yrole), lambda: moe_router_ops(ctx, i, je, e0, xrole, yrole))
                part(out, "ffn", ("experts", i, jf, xrole, yrole),
                     lambda: moe_expert_ops(ctx, i, jf, xrole, yrole, fused_sync(xrole) if fused_end else None))
            else:
                def ffn_part() -> Ops:
                    sync = fused_sync(xrole) if fused_end else None
                    ops = ffn_ops(plan.shapes, f_r, Hc, red, b_, i, jf, xrole, yrole, 0, B, fused2, at_root=sync)
                    ops[0].append(compute(ADD, hi * B, dst=h, src0=h, src1=yb))
                    return ops
                part(out, "ffn", (i, jf, xrole, yrole), ffn_part)
        if "handoff" in parts and not fused_end:
            part(out, "handoff", (xrole, yrole), lambda: handoff(red, xrole, yrole, b_["scal"], b_["tmp"]))
        if plan.routed:
            part(out, "output", (spk, hi), lambda: lanes.send(sp, hi * B, h))
        else:  # to the expert regions: the dispatch (FFN input, gate values) and the combine's start
            part(out, "output", (spk, hi),
                 lambda: lanes.send_parts(sp, dispatch_parts(spec, hi, B, b_, lanes.color_out, COMBINE[0])))
        return out

    prog.add(body)
    prog.program_ids(builder)
    executed, model = layer_flops(plan, parts)
    kv = spec.kv_cache_width * sum(plan.T_c) * B * ELEM if plan.has_attention else 0
    return RegionBuild("layer" if plan.has_attention else "ffn", region, plan.mem, executed, model,
                       layer_weight_bytes(plan), kv, anchor_of(red))


def fused_handoff_ops(plan: LayerPlan, red: dict, i: int, xrole: tuple, yrole: tuple) -> Ops:
    """A fused hand-off's region alone, column i: its FFN's end (the last down all-reduce with
    the sync nested, the down biases) and the residual add (a MoE layer: the last expert's
    gate-weighted sums), at the layer's own buffers — what a stage trace runs in place of the
    barrier (stages.py): from the anchor on it is the layer's."""
    hi, b_ = plan.Hc[i], plan.buf
    sync = handoff_sync(red, xrole, b_["scal"], b_["tmp"])
    if plan.moe:  # the last expert's down all-reduce, its gate-weighted sums
        e, seqs, c = experts_run(plan)[-1]
        out = down_reduce_ops(red, b_, plan.Hc, i, yrole, len(seqs), c, sync)
        out.setdefault(0, []).extend(weighted_sum_ops(plan, i, e, seqs))
        return out
    out = down_reduce_ops(red, b_, plan.Hc, i, yrole, plan.params.batch, 0, sync)
    out.setdefault(0, []).append(compute(ADD, hi * plan.params.batch, dst=b_["h"], src0=b_["h"], src1=b_["y"]))
    return out
