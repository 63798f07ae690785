"""A decoder layer's decode step on a layer region (docs/workloads.md).

Layout on a region of P columns and Q >= P rows (square: Q = P): the hidden vector is split
into P chunks, chunk i living on every PE of column i ("column layout"); vectors split over
rows are cut into Q chunks. GEMVs alternate their reduction axis: QKV and gate/up reduce along
X and leave their outputs split over rows ("row layout"); O and down reduce along Y and return
to column layout, so no transpose crosses the mesh. Attention is in attention.py, latent
attention's projections in mla.py, the FFN and the MoE router in ffn.py, the closed-form FLOPs
and weights in layer_costs.py; this module sizes the layer (plan_layer) and sequences its parts
(decode_layer).
"""
from __future__ import annotations

import dataclasses

from ..errors import WseError
from ..hardware import WaferConfig
from ..trace import Op, compute, with_tag
from .attention import (HeadRows, attention_segments, attn_row, block_tokens, by_heads, classic_ops,
                        head_rows, owned_heads)
from .flash import flash_ops
from .ffn import (down_reduce_ops, experts_run, ffn_ops, moe_expert_ops, moe_experts, moe_router_ops, norm_scale_ops,
                  weighted_sum_ops)
from .gemv import ELEM, FP16, GemvShape, alloc_scales, dots_cheaper, gemv_ops
from .mesh import HI, LO, RAMP, X, Y, Allocator, MeshBuilder, Region, RegionProgram, offsets, split
from .mla import MlaSplit, mla_output_ops, mla_project_parts, mla_split, most_mla_rows
from .models import ModelSpec
from .params import DecodeParams
from .precision import weights_of
from .plan import COMBINE, DIAG_BCAST, KV_SHIFT, FitError, fit_check
from .collectives import LineBroadcast
from .layer_costs import SPLIT_PARTS, fused_handoff, fused_norms, layer_flops, layer_weight_bytes
from .region import (ADD, C_EPS, C_INV_H, G0, G1, G2, G3, MOV, MUL, N_CONSTS, THREADS, Lanes, Ops, PartCache,
                     RegionBuild, anchor_of, handoff, handoff_sync, i_chunk, mean_square_ops, merge, reducers,
                     rms_apply_ops, rope_ops, special_key)
from .experts import dispatch_parts


@dataclasses.dataclass
class LayerPlan:
    """Sizes and buffers of one decoder layer on a region of P columns and Q rows."""

    spec: ModelSpec
    layer: int
    P: int
    params: DecodeParams
    mem: Allocator
    Hc: list[int]
    q_r: list[int]
    k_r: list[int]
    qkv_r: list[int]
    o_r: list[int]
    f_r: list[int]
    e_r: list[int]
    T_c: list[int]
    heads_r: list[int]  # attention heads whose softmax row j computes (flash: its block's; classic: those it owns)
    shapes: dict[str, GemvShape]
    buf: dict[str, int]
    routed: bool = True  # a MoE layer's routed experts live in this region (else in expert regions)
    mla: MlaSplit | None = None  # latent attention's cut over the region (mla.py)
    Q: int = 0  # rows (0: P, a square region)
    segments: int = 0  # flash: row blocks reducing their heads' scores (attention_segments)
    rows: HeadRows | None = None  # dense layers: the rows' KV heads and rotary pairs (attention.head_rows)
    part: str = "all"  # a dense layer split over two slots: "attention" (its layer region) or "ffn"
    cfg: WaferConfig | None = None  # the wafer (the auto all-reduce's latencies, region.reducers)
    # flash reduces a block's scores on a thread of its own while thread 0 runs the previous block's
    # softmax (flash._run_blocks; --flash-blocks): two score buffers, one more thread
    overlap: bool = False

    def __post_init__(self) -> None:
        self.Q = self.Q or self.P

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts of the layer its region runs (layer_costs.SPLIT_PARTS)."""
        return SPLIT_PARTS[self.part]

    @property
    def has_attention(self) -> bool:
        """The region runs the layer's attention and holds its KV cache (not a split layer's FFN half)."""
        return self.part != "ffn"

    @property
    def has_ffn(self) -> bool:
        """The region runs the layer's FFN (not a split layer's attention half)."""
        return self.part != "attention"

    @property
    def flash(self) -> bool:
        return self.params.attention == "flash"

    @property
    def threads(self) -> int:
        return THREADS + 1 if self.overlap else THREADS

    @property
    def column_scores(self) -> bool:
        """Flash reduces a block's scores down the whole column: every row attends with one
        latent (MLA) or one KV head; otherwise inside row blocks (segments) or not at all."""
        return bool(self.spec.mla) or self.spec.kv_heads == 1

    def seg_flops(self, m: int) -> int:
        """Adds of flash's score reductions of m tokens x batch on one column."""
        if self.segments:  # (Q - segments) combining stages, each over its block's heads
            return sum((n - 1) * self.heads_r[0] * m for n in split(self.Q, self.segments))
        if self.column_scores:
            return (self.Q - 1) * self.heads_r[0] * m
        return 0  # rows hold whole KV heads

    @property
    def moe(self) -> bool:
        return self.spec.is_moe_layer(self.layer)

    @property
    def fused_handoff(self) -> bool:
        """The region's hand-off sync rides its FFN's last down all-reduce (--handoff fused;
        region.handoff_sync): a dense FFN's, or a MoE layer's last expert's where the region
        computes one; a region ending otherwise (a split layer's attention half, a MoE layer
        region whose experts all live in expert regions) keeps the barrier."""
        return self.params.handoff == "fused" and self.has_ffn and (not self.moe or bool(experts_run(self)))

    def handoff_key(self) -> tuple:
        """What a stage trace standing in for this region's hand-off depends on beyond the slot
        (stages.py): the barrier's nothing; the fused one's the FFN end's buffers (a MoE layer:
        its last expert's tile copy and the gates its outputs are weighted by)."""
        if not self.fused_handoff:
            return ("barrier",)
        b = self.buf
        key = ("fused", b["y"], b["h"], b["tmp"], b["scal"], b.get("b_dn", -1))
        if not self.moe:
            return key
        e, seqs, c = experts_run(self)[-1]
        return key + (c, tuple((op.src0, op.src1) for op in weighted_sum_ops(self, 0, e, seqs)))

    @property
    def kv_bytes_per_pe(self) -> int:
        """KV-cache data of one micro-batch on the fullest PE: its column's tokens (and the one
        arriving) times its row's cache dimensions. The kv_cache buffer can be longer: it also
        spans the weighted-value FMACs' reads (one op per token over all the row's heads, which
        re-read the row's value dimensions once per head), a footprint the data of whichever
        micro-batch is in the region serves; another micro-batch in flight needs only its data."""
        per_token = max(self.k_r) if self.mla else 2 * max(self.k_r)
        return (max(self.T_c) + 1) * per_token * self.params.batch * ELEM

    def local_experts(self) -> dict[int, int]:
        """Experts this region computes (index of its tile copy -> sequences using it)."""
        m = self.spec.moe
        use = moe_experts(self.spec, self.layer, self.params.batch, self.params.expert_skew)
        if self.routed:
            return use
        return {e - m.experts: u for e, u in use.items() if e >= m.experts}


def plan_layer(spec: ModelSpec, layer: int, P: int, cfg, params: DecodeParams, routed: bool = True,
               Q: int | None = None, part: str = "all") -> LayerPlan:
    """Split the layer over a region of P columns and Q rows (default P) and allocate its SRAM
    (FitError if it does not fit).

    routed=False: a MoE layer keeps only its router and shared experts; the routed experts
    live in expert regions that follow it in the chain (plan_experts). part: a dense layer
    split over two slots (--dense-ffn region) keeps attention and its norm ("attention", the
    layer region: the KV cache) or the FFN and its norm ("ffn", the next slot). Q >= P: lanes
    enter and leave on the diagonal, which needs a row for every column."""
    H, B, T = spec.hidden_size, params.batch, spec.attended(layer, params.context)
    Q = Q or P
    if part not in SPLIT_PARTS or (part != "all" and spec.is_moe_layer(layer)):
        raise WseError(f"{spec.name} layer {layer}: no {part!r} part (a dense layer splits into attention and ffn)")
    if P > H:
        raise WseError(f"a {P}x{Q} region is larger than the hidden size {H}")
    if Q < P:
        raise WseError(f"a {P}x{Q} region has fewer rows than columns (lanes enter on the diagonal)")
    if Q > most_rows(spec):
        raise FitError(f"{spec.name}: a layer region has at most {most_rows(spec)} rows (one per row-split "
                       f"dimension), not {Q}")
    moe = spec.is_moe_layer(layer)
    Hc = split(H, P)
    ms = hr = None
    if spec.mla:  # rows own the latent cache's dims: q_r, k_r, o_r are the per-token lengths
        ms = mla_split(spec, P, Q)
        q_r, k_r, qkv_r = [spec.heads * c for c in ms.c_r], ms.c_r, ms.a_r
        o_r = [spec.heads * v for v in ms.v_r]
    else:
        hr = head_rows(spec, Q)  # head-aligned rows (both mappings)
        q_r, k_r, o_r = hr.q_r, hr.k_r, hr.o_r
        qkv_r = [q + 2 * k for q, k in zip(q_r, k_r)]
    ffn = spec.moe.expert_ffn_size if moe else spec.ffn_size
    f_r = split(ffn, Q)
    e_r = split(spec.moe.experts, Q) if moe else [0] * Q
    T_c = split(T, P)
    if params.attention == "classic":  # the heads whose softmax the row computes (attention.owned_heads)
        heads_r = [n for _, _, n in owned_heads(spec, Q, hr)]
    else:  # flash: the heads of the row's block (latent attention: every head)
        heads_r = hr.hb_r if hr else [spec.heads] * Q
    what = "" if part == "all" else f" ({part})"
    # overlapped flash blocks need a second score buffer and a sixth thread: "auto" takes them where
    # both are there (an explicit "overlapped" on a wafer with fewer microthreads fails its trace check)
    overlap = params.attention == "flash" and part != "ffn" and params.flash_blocks != "serial" and \
        (params.flash_blocks == "overlapped" or cfg.microthreads > THREADS)
    while True:
        mem = Allocator(0, cfg.sram_bytes - cfg.sram_reserved_bytes)
        plan = LayerPlan(spec, layer, P, params, mem, Hc, q_r, k_r, qkv_r, o_r, f_r, e_r, T_c, heads_r, {}, {},
                         routed or not moe, ms, Q, attention_segments(spec, Q, params), hr, part, cfg, overlap)
        _alloc_buffers(plan, _alloc_weights(plan))
        try:
            fit_check(mem, cfg, f"{spec.name} layer {layer}{what} on a {P}x{Q} region (batch {B}, context {T})")
            return plan
        except FitError:
            if not (overlap and params.flash_blocks == "auto"):
                raise
            overlap = False


def _alloc_weights(plan: LayerPlan) -> dict[str, int]:
    """The GEMV tiles of the plan's part of the layer (first in its SRAM); returns the copies of
    each tile (a MoE layer's experts)."""
    spec, ms, mem, shapes = plan.spec, plan.mla, plan.mem, plan.shapes
    H, P, Q, Hc, qkv_r, o_r = spec.hidden_size, plan.P, plan.Q, plan.Hc, plan.qkv_r, plan.o_r
    f_r, e_r = plan.f_r, plan.e_r
    moe, routed = plan.moe, plan.routed
    att_here, ffn_here = plan.has_attention, plan.has_ffn
    ffn = spec.moe.expert_ffn_size if moe else spec.ffn_size
    n_copies: dict[str, int] = {}
    dense_w, expert_w = weights_of(spec, plan.params.weights)

    def weights(name: str, m: int, n: int, axis, ins: list[int], outs: list[int], copies: int = 1,
                precision: str = dense_w) -> None:
        s = GemvShape(m, n, axis, ins, outs, precision=precision)
        if name == "down":  # (--down-gemv; a low-precision tile stays by input row)
            form = plan.params.down_gemv
            s.dots = s.store == FP16 and (form == "dot" or (form == "auto" and plan.cfg is not None
                                                             and dots_cheaper(s, plan.cfg)))
        s.set_pitch()
        s.weights = mem.alloc(f"w_{name}", s.tile_bytes() * copies, "weights", G0)
        shapes[name], n_copies[name] = s, copies

    if ms and att_here:
        m_ = spec.mla
        weights("a", H, m_.q_lora_rank + sum(ms.c_r), X, Hc, qkv_r)
        weights("qb", m_.q_lora_rank, spec.q_size, Y, ms.qa_r, ms.qn_r)
        # block-diagonal absorbed up-projections: a PE's tile covers its column's heads only
        weights("uk", spec.heads * m_.qk_nope_head_dim, m_.kv_lora_rank, X, ms.nope_n, ms.v_r, precision="bf16")
        weights("uv", m_.kv_lora_rank, spec.heads * m_.v_head_dim, Y, ms.v_r, ms.oh_r, precision="bf16")
        weights("o", spec.attn_out_size, H, X, ms.oh_r, Hc + [0] * (Q - P))  # rows j >= P: none
    elif att_here:
        weights("qkv", H, spec.q_size + 2 * spec.kv_size, X, Hc, qkv_r)
        weights("o", spec.attn_out_size, H, Y, o_r, Hc)
    if moe:
        n_exp = (spec.moe.experts if routed else 0) + spec.moe.shared_experts
        weights("router", H, spec.moe.experts, X, Hc, e_r, precision="bf16")
        # (local experts: shared and routed ones in one tile block, at one precision)
        w = expert_w if routed else dense_w
        if routed and spec.moe.shared_experts and expert_w != dense_w:
            raise WseError(f"{spec.name}: local experts keep shared and routed experts in one tile block, "
                           f"not at {dense_w} and {expert_w}; give --weights or --moe-mapping regions")
        weights("gate_up", H, 2 * ffn, X, Hc, [2 * f for f in f_r], n_exp, w)
        weights("down", ffn, H, Y, f_r, Hc, n_exp, w)
    elif ffn_here:
        weights("gate_up", H, 2 * ffn, X, Hc, [2 * f for f in f_r])
        weights("down", ffn, H, Y, f_r, Hc)
    return n_copies


def _alloc_buffers(plan: LayerPlan, n_copies: dict[str, int]) -> None:
    """The norms' weights, biases, KV cache, activations, scratch and constants of the plan's part
    of the layer, after its tiles (plan.buf), and the dequantization scratch and scales."""
    spec, params, mem, buf, shapes = plan.spec, plan.params, plan.mem, plan.buf, plan.shapes
    B, ms, hr, heads_r, T_c = params.batch, plan.mla, plan.rows, plan.heads_r, plan.T_c
    Hc, q_r, k_r, qkv_r, o_r, f_r, e_r = plan.Hc, plan.q_r, plan.k_r, plan.qkv_r, plan.o_r, plan.f_r, plan.e_r
    moe, routed = plan.moe, plan.routed
    att_here, ffn_here = plan.has_attention, plan.has_ffn
    if att_here:
        buf["g1"] = mem.alloc("g1", max(Hc) * ELEM, "weights", G0)
    if ffn_here:
        buf["g2"] = mem.alloc("g2", max(Hc) * ELEM, "weights", G0)
    if spec.qkv_bias and att_here:
        buf["b_qkv"] = mem.alloc("b_qkv", max(qkv_r) * ELEM, "weights", G0)
    if spec.o_bias and att_here:
        buf["b_o"] = mem.alloc("b_o", max(Hc) * ELEM, "weights", G0)
    if spec.attention_sinks and att_here:  # the row's heads' sink logits, at column 0
        buf["sinks"] = mem.alloc("sinks", max(hr.hb_r if hr else heads_r) * ELEM, "weights", G0)
        buf["sink_exp"] = mem.alloc("sink_exp", max(heads_r) * B * ELEM, "scratch", G1)
    flash = params.attention == "flash"
    hb = max(heads_r)
    # scores held at once: a block of the column's tokens (flash) or all of them (classic)
    scores = max(h * min(block_tokens(params, h), max(T_c)) for h in set(heads_r)) if flash \
        else spec.heads * max(T_c)
    if moe and spec.moe.expert_bias:  # every expert's gate/up and down biases, a copy per PE's chunk
        n_exp = (spec.moe.experts if routed else 0) + spec.moe.shared_experts
        buf["b_gu"] = mem.alloc("b_gate_up", n_exp * 2 * max(f_r) * ELEM, "weights", G0)
        buf["b_dn"] = mem.alloc("b_down", n_exp * max(Hc) * ELEM, "weights", G0)
    if moe and spec.moe.router_bias:
        buf["b_router"] = mem.alloc("b_router", max(e_r) * ELEM, "weights", G0)
    if ms and att_here:
        buf["g_qa"] = mem.alloc("g_qa", max(ms.qa_r) * ELEM, "weights", G0)
        buf["g_kv"] = mem.alloc("g_kv", max(ms.v_r) * ELEM, "weights", G0)
        buf["mla_c"] = mem.alloc("mla_consts", 2 * ELEM, "constants", G0)  # (mla.C_INV_QA, C_INV_KV)
    kv_tok = max(k_r) if ms else 2 * max(k_r)  # (LayerPlan.kv_bytes_per_pe)
    if att_here:
        buf["kv"] = mem.alloc("kv_cache", max((max(T_c) + 1) * kv_tok, max(o_r)) * B * ELEM, "kv_cache", G3)
    buf["h"] = mem.alloc("h", max(Hc) * B * ELEM, "activations", G3)
    buf["xn"] = mem.alloc("xn", max(Hc) * B * ELEM, "activations", G3)
    if att_here:
        buf["sc"] = mem.alloc("scores", max(scores, 1) * B * ELEM, "activations", G3)
        if plan.overlap:  # (the block being reduced while the one before runs its softmax)
            buf["sc2"] = mem.alloc("scores2", max(scores, 1) * B * ELEM, "activations", G3)
        buf["qkv"] = mem.alloc("qkv", (max(max(qkv_r), max(e_r)) + 1) * B * ELEM, "activations", G2)
        buf["att"] = mem.alloc("att", (max(o_r) + (hb if flash else 0)) * B * ELEM, "activations", G2)
    if ffn_here:
        buf["gu"] = mem.alloc("gate_up", (2 * max(f_r) + 1) * B * ELEM, "activations", G2)
    buf["y"] = mem.alloc("y", max(Hc) * B * ELEM, "activations", G2)
    if ms and att_here:
        buf["q"] = mem.alloc("q", max(ms.qn_r) * B * ELEM, "activations", G2)
        buf["qabs"] = mem.alloc("q_absorbed", max(q_r) * B * ELEM, "activations", G2)
        buf["oh"] = mem.alloc("o_heads", max(ms.oh_r) * B * ELEM, "activations", G2)
    # the longest vector a part's accumulators are cleared from `zeros` and all-reduced through `tmp`
    att_long = max(max(qkv_r), scores, max(o_r) + (hb if flash else 0), max(e_r), max(ms.qn_r) if ms else 0,
                   max(q_r) if ms else 0, max(ms.oh_r) if ms else 0) if att_here else 0
    longest = max(att_long, max(Hc), 2 * max(f_r) if ffn_here else 0) * B
    if (ms or moe) and att_here:  # scratch of latent attention and MoE routing
        buf["dot"] = mem.alloc("dot", longest * ELEM, "scratch", G1)
    # a zero source the accumulators are cleared from (GEMV outputs and the norms' sums; scores)
    buf["zeros"] = mem.alloc("zeros", (longest + B) * ELEM, "constants", G1)
    buf["consts"] = mem.alloc("consts", N_CONSTS * ELEM, "constants", G0)
    rope = 0
    if hr and att_here:  # RoPE's cos and sin of the row's pairs, once per head it rotates (attention.dense_row)
        rope = max((hb + len(kv)) * kh // 2 for hb, kv, kh in zip(hr.hb_r, hr.kv_r, hr.kh_r))
    elif ms and att_here:  # the column's q pairs, then the row's k pairs (mla.MlaSplit.rope_table)
        rope = ms.rope_table
    if rope:
        buf["cos"] = mem.alloc("rope_cos", max(rope, 1) * ELEM, "weights", G2)
        buf["sin"] = mem.alloc("rope_sin", max(rope, 1) * ELEM, "weights", G3)
        # RoPE's scratch (not tmp: thread 1 may receive the next all-reduce's partial into it meanwhile)
        buf["rope"] = mem.alloc("rope_tmp", 2 * max(rope, 1) * ELEM, "scratch", G1)
    buf["scal"] = mem.alloc("scalars", 16 * B * ELEM, "scratch", G1)
    if att_here:  # flash: running maxima (two, ping-pong) and rescale factors per head and sequence;
        # classic: maximum, sum and its reciprocal per owned head and sequence
        buf["stats"] = mem.alloc("softmax_stats", 3 * hb * B * ELEM, "scratch", G1)
    # (+ B: a fused norm's sums ride after the next GEMV's outputs in its all-reduce)
    buf["tmp"] = mem.alloc("tmp", (longest + B) * ELEM, "scratch", G0)
    if moe:
        buf["gates"] = mem.alloc("gates", spec.moe.experts_per_token * B * ELEM, "activations", G2)
    dequant = max(sh.scratch_bytes() for sh in shapes.values())
    if dequant:  # one fp16 scratch the low-precision tiles are dequantized into, block by block
        buf["dequant"] = mem.alloc("dequant", dequant, "scratch", G0)
        for sh in shapes.values():
            sh.scratch = buf["dequant"]
        alloc_scales(mem, shapes, n_copies)


def largest_context(spec: ModelSpec, layer: int, P: int, cfg, params: DecodeParams, Q: int | None = None) -> int:
    """The longest context whose layer `layer` fits a P x Q region (0: not even one token): a
    binary search over plan_layer, whose SRAM use grows with the context (the KV cache; with
    --attention classic also the scores)."""
    from .params import MAX_CONTEXT

    def fits(c: int) -> bool:
        try:
            plan_layer(spec, layer, P, cfg, dataclasses.replace(params, context=c), Q=Q)
            return True
        except FitError:
            return False
    if not fits(1):
        return 0
    lo, hi = 1, MAX_CONTEXT
    if fits(hi):
        return hi
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def most_rows(spec: ModelSpec) -> int:
    """The most rows a layer region may have: every row-split vector needs an element per row
    (the KV slice, or MLA's cache: a latent dim or a rotary pair, is the shortest)."""
    return min(most_mla_rows(spec) if spec.mla else spec.kv_cache_width // 2, spec.hidden_size)

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
    out = {0: [compute(MOV, (n + 1) * B, dst=sums - n * B * ELEM, src0=z)]}
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
    out: Ops = {0: [] if norm or not qkvj else [compute(MOV, qkvj * B, dst=qkv, src0=b_["zeros"])]}
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
    out = {0: [compute(MOV, hi * B, dst=yb, src0=b_["zeros"])]}
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
    qkv_rows = [(hr.hb_r[j], len(hr.kv_r[j]), hr.kh_r[j], by_heads(prm, hr.hb_r[j], max(plan.T_c))) if hr else None
                for j in range(Q)]
    e0_r = offsets(e_r)  # the first expert of each row's router logits (MoE: the gates are gathered by it)
    own = owned_heads(spec, Q, hr) if not plan.flash else [None] * Q  # classic: the heads whose softmax it computes
    prog.add_roles(Y, [(i_chunk(qkv_r, j), plan.q_r[j], plan.k_r[j], i_chunk(o_r, j), i_chunk(f_r, j),
                        i_chunk(e_r, j), plan.heads_r[j], red[Y].role(j), seg(j) if plan.flash else None,
                        qkv_rows[j], e0_r[j], own[j]) for j in range(Q)])
    lanes.install(builder, prog)
    ms = plan.mla
    if ms:
        prog.add_roles(X, [(i_chunk(ms.qn_r, i), ms.qn_r[i], ms.nope_runs[i], ms.pe_runs[i], i_chunk(ms.oh_r, i),
                            ms.oh_r[i], ms.oh_runs[i]) for i in range(P)])
        hc_rows = Hc + [0] * (Q - P)  # the O projection's rows: column chunks on the first P
        prog.add_roles(Y, [(i_chunk(ms.qa_r, j), ms.qa_r[j], ms.c_r[j], ms.v_r[j], ms.rope_lo[j], ms.r_r[j],
                            i_chunk(hc_rows, j), hc_rows[j]) for j in range(Q)])
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
            def attention() -> Ops:
                row = attn_row(plan, qkv_row, qkv_r[jq], yr)
                if plan.flash:
                    return flash_ops(ctx, first_col, last_col, parity, tc, row, xrole, srole)
                return classic_ops(ctx, first_col, last_col, parity, tc, row, own_j, xrole, yrole)
            # (attn_row reads the row's layout, and with latent attention its dims and offsets)
            row_key = (qkv_row, qkv_r[jq]) + ((yr[0][2], yr[1][1], yr[1][3]) if ms else ())
            part(out, "attention", (first_col, last_col, parity, tc, row_key, xrole, srole, own_j, yrole),
                 attention)
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
