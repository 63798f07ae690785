"""The sizes and buffers of one decoder layer on a layer region (docs/workloads.md): how the
hidden vector, the heads, the KV cache, the FFN and the experts are cut over P columns and Q
rows (LayerPlan, plan_layer), the SRAM each PE holds for them and the fit check, and the
longest context a slot holds. layer.py sequences the layer's program on such a plan.
"""

from __future__ import annotations

import dataclasses

from ..errors import WseError
from ..hardware import WaferConfig
from .attention import HeadRows, attention_segments, block_tokens, head_rows, owned_heads
from .ffn import experts_run, moe_experts, weighted_sum_ops
from .gemv import ELEM, GemvShape, alloc_scales, choose_form, tile_form
from .layer_costs import SPLIT_PARTS
from .mesh import X, Y, Allocator, split
from .mla import MlaSplit, mla_split, most_mla_rows
from .models import ModelSpec
from .params import DecodeParams
from .plan import FitError, fit_check
from .precision import weights_of
from .region import G0, G1, G2, G3, N_CONSTS, THREADS, ZERO_BYTES


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
    def T_g(self) -> list[list[int]]:
        """Cached tokens per row group (latent attention's --mla-groups) and column: the context
        split over the groups, each group's share over the columns; one group: T_c."""
        G = self.mla.groups if self.mla else 1
        return [self.T_c] if G == 1 else [split(n, self.P) for n in split(sum(self.T_c), G)]

    @property
    def tc_max(self) -> int:
        """The most cached tokens one PE holds (a column's, or a column's in one row group)."""
        return max(max(t) for t in self.T_g)

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
        return (self.tc_max + 1) * per_token * self.params.batch * ELEM

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
        if params.mla_groups > 1 and params.attention != "flash":
            raise WseError(f"--mla-groups {params.mla_groups} needs --attention flash (its blocks reduce inside a group)")
        ms = mla_split(spec, P, Q, params.mla_groups)
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
        if name not in ("uk", "uv"):  # (the absorbed up-projections run loops of their own: mla.py)
            choose_form(s, tile_form(plan.params, name, precision), plan.cfg)
        s.set_pitch()
        s.weights = mem.alloc(f"w_{name}", s.tile_bytes() * copies, "weights", G0)
        shapes[name], n_copies[name] = s, copies

    if ms and att_here:
        m_ = spec.mla
        weights("a", H, m_.q_lora_rank + sum(ms.c_r), X, Hc, qkv_r)
        weights("qb", m_.q_lora_rank, spec.q_size, Y, ms.qa_r, ms.qn_r)
        # block-diagonal absorbed up-projections: a PE's tile covers its column's heads only
        # (with row groups every group holds the blocks of all its latent dims: kv_lora_rank x groups)
        weights("uk", spec.heads * m_.qk_nope_head_dim, sum(ms.v_r), X, ms.nope_n, ms.v_r, precision="bf16")
        weights("uv", sum(ms.v_r), spec.heads * m_.v_head_dim, Y, ms.v_r, ms.oh_r, precision="bf16")
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
    scores = max(h * min(block_tokens(params, h), plan.tc_max) for h in set(heads_r)) if flash \
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
        buf["kv"] = mem.alloc("kv_cache", max((plan.tc_max + 1) * kv_tok, max(o_r)) * B * ELEM, "kv_cache", G3)
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
    # the zero scalar accumulators are filled from (GEMV outputs and the norms' sums; scores) and
    # exponentials subtract (an fp32 zero: 4 bytes)
    buf["zeros"] = mem.alloc("zeros", ZERO_BYTES, "constants", G1)
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
