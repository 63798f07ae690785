"""What one decoder layer's decode step costs, in closed form: its FLOPs by component
(executed, and the model's own) and its resident weight bytes — the analytic side that tests
hold the simulated counters to (docs/workloads.md). The parts a layer's program runs, and which
RMSNorms end in the next GEMV's all-reduce, are decided here for both sides.
"""
from __future__ import annotations

from .attention import SINK_FLOPS, classic_flops
from .flash import flash_flops
from .ffn import moe_gate_flops
from .gemv import ELEM
from .mesh import Region
from .region import NORM_SCALE_FLOPS, SILU_MUL_FLOPS, SOFTMAX_FLOPS, handoff_flops


PARTS = ("norm1", "qkv", "attention", "o", "norm2", "ffn", "handoff")
# a dense layer split over two slots (--dense-ffn region): the layer region, then its FFN region
SPLIT_PARTS = {"all": PARTS, "attention": ("norm1", "qkv", "attention", "o", "handoff"),
               "ffn": ("norm2", "ffn", "handoff")}


def fused_norms(plan) -> tuple[bool, bool]:
    """Whether the layer's two RMSNorms end in the next GEMV's all-reduce (--norms fused):
    the first before the QKV projection (not latent attention's), the second before a dense FFN."""
    f = plan.params.norms == "fused"
    return f and not plan.mla, f and not plan.moe


def fused_handoff(plan, parts) -> bool:
    """Whether a program of these parts nests its hand-off's sync in the FFN's last down
    all-reduce (LayerPlan.fused_handoff) rather than ending with the barrier."""
    return plan.fused_handoff and "ffn" in parts and "handoff" in parts


def layer_weight_bytes(plan) -> int:
    """Weight bytes (at their precision, no padding) the layer's region holds: its part's of a
    split layer (LayerPlan.part)."""
    spec, H = plan.spec, plan.spec.hidden_size
    S = plan.shapes
    n = 0
    if plan.has_attention:
        if plan.mla:  # the absorbed GEMVs' shapes count their blocks only; plus the two latent norms
            n = sum(S[k].weight_bytes() for k in ("a", "qb", "uk", "uv", "o")) + H * ELEM
            n += (sum(plan.mla.qa_r) + sum(plan.mla.v_r)) * ELEM
        else:
            n = S["qkv"].weight_bytes() + S["o"].weight_bytes() + H * ELEM
        n += (S["qkv"].n if spec.qkv_bias else 0) * ELEM + (H if spec.o_bias else 0) * ELEM
        n += (spec.heads if spec.attention_sinks else 0) * ELEM
    if not plan.has_ffn:
        return n
    n += H * ELEM  # the FFN's RMSNorm weight
    if plan.moe:
        m = spec.moe
        n += S["router"].weight_bytes() + (m.experts if m.router_bias else 0) * ELEM
        bias = (2 * m.expert_ffn_size + H) * ELEM if m.expert_bias else 0
        n += ((m.experts if plan.routed else 0) + m.shared_experts) * (S["gate_up"].weight_bytes()
                                                                        + S["down"].weight_bytes() + bias)
    else:
        n += S["gate_up"].weight_bytes() + S["down"].weight_bytes()
    return n


def layer_flops(plan, parts: tuple[str, ...] = PARTS) -> tuple[dict[str, int], int]:
    """Analytic FLOPs of one layer's decode step (or its `parts`): (executed by component,
    model FLOPs).

    Executed FLOPs include the elementwise work every PE of a line repeats on its replicated
    chunk (column-layout vectors: the Q PEs of a column; row-layout vectors: the P PEs of a
    row) and the all-reduces' adds ("allreduce"); model FLOPs count each operation once.
    """
    spec, P, Q, prm = plan.spec, plan.P, plan.Q, plan.params
    B, T, H = prm.batch, sum(plan.T_c), spec.hidden_size  # T: the tokens attended (a window's)
    qkv_n = spec.q_size + 2 * spec.kv_size
    nx, ny = P - 1, Q - 1  # combining stages of an all-reduce along a row / a column
    model: dict[str, int] = {}
    col: dict[str, int] = {}  # elementwise work on column-layout vectors, repeated down each column
    row: dict[str, int] = {}  # ... on row-layout vectors, repeated along each row

    def add(d: dict[str, int], k: str, v: int) -> None:
        d[k] = d.get(k, 0) + v

    ar = 0
    per_pe: dict[str, int] = {}  # executed on every PE of the region
    fused = fused_norms(plan)
    for part, f, consumer, n in (("norm1", fused[0], "qkv", qkv_n), ("norm2", fused[1], "ffn", 2 * spec.ffn_size)):
        if part in parts:  # h / H (1), mean square (2), weight (1), and unless fused the scale (1) after the all-reduce
            add(col, "norm", (4 if f else 5) * H * B)
        if (part if not f else consumer) in parts:  # fused: the sums ride in the consumer GEMV's all-reduce
            ar += Q * nx * B  # ... and every PE takes 1/RMS of them (and, fused, scales the outputs)
            per_pe["norm"] = per_pe.get("norm", 0) + NORM_SCALE_FLOPS * P * Q * B
        if f and consumer in parts:
            add(row, "norm", n * B)
    ml = spec.mla
    G = plan.mla.groups if ml else 1  # latent attention's row groups: each computes the new token's latent,
    extra: dict[str, int] = {}  # its norm and RoPE, and the absorbed query and output on its own rows
    if "qkv" in parts and ml:
        width, heads = spec.kv_cache_width, spec.heads
        a_n = ml.q_lora_rank + width
        absorb = 2 * heads * ml.qk_nope_head_dim * ml.kv_lora_rank * B
        model["qkv"] = 2 * H * a_n * B + 2 * ml.q_lora_rank * spec.q_size * B + absorb
        extra["qkv"] = (G - 1) * (2 * H * width * B + absorb)
        # the latent norms: x/n, mean square (2), 1/RMS scale, weight per element; 1/RMS of both on every PE
        add(row, "norm", 5 * (ml.q_lora_rank + G * ml.kv_lora_rank) * B)
        per_pe["norm"] = per_pe.get("norm", 0) + NORM_SCALE_FLOPS * P * Q * 2 * B
        add(row, "rope", 3 * G * ml.qk_rope_head_dim * B)
        add(col, "rope", 3 * heads * ml.qk_rope_head_dim * B)
        ar += nx * (a_n + (G - 1) * width) * B + P * ny * 2 * B + ny * spec.q_size * B + nx * G * heads * width * B
    elif "qkv" in parts:
        model["qkv"] = 2 * H * qkv_n * B
        add(row, "rope", 3 * (spec.q_size + spec.kv_size) * B)
        add(row, "bias", qkv_n * B if spec.qkv_bias else 0)
        ar += nx * qkv_n * B
    flash_exec = {}
    if "attention" in parts:
        # MLA: scores over the whole cached latent, values over its c_kv part, for every head
        q_len = spec.heads * spec.kv_cache_width if ml else spec.q_size
        o_len = spec.heads * ml.kv_lora_rank if ml else spec.attn_out_size
        model.update(scores=2 * q_len * T * B, softmax=SOFTMAX_FLOPS * spec.heads * T * B, values=2 * o_len * T * B)
        if spec.attention_sinks:
            model["softmax"] += SINK_FLOPS * spec.heads * B
        if plan.flash:  # executed: softmax repeated on every row of a head's block, rescales, merges
            flash_exec = flash_flops(plan)
            ar += flash_exec.pop("allreduce")
        else:  # scores and probabilities down the columns; maxima, sums and weighted values along the rows
            flash_exec = classic_flops(plan)
            ar += 2 * ny * spec.heads * T * B + 2 * nx * spec.heads * B + nx * o_len * B
    if "o" in parts:
        model["o"] = 2 * spec.attn_out_size * H * B
        if ml:  # W_uv reduces along Y, then W_o along X
            model["o"] += 2 * spec.heads * ml.kv_lora_rank * ml.v_head_dim * B
            extra["o"] = (G - 1) * 2 * spec.heads * ml.kv_lora_rank * ml.v_head_dim * B
            ar += ny * spec.attn_out_size * B + nx * H * B
        else:
            ar += ny * H * B
        add(col, "bias", H * B if spec.o_bias else 0)
        add(col, "residual", H * B)
    if "ffn" in parts:
        add(col, "residual", 0 if plan.moe else H * B)  # (MoE: the experts' weighted sums are the residual)
        if plan.moe:
            m = spec.moe
            u = sum(plan.local_experts().values())
            f = m.expert_ffn_size
            model["ffn"] = 2 * H * m.experts * B + u * (2 * H * 2 * f + 2 * f * H)
            add(row, "ffn", (m.experts * B if m.router_bias else 0) + u * SILU_MUL_FLOPS * f
                + (u * 2 * f if m.expert_bias else 0))
            gates = moe_gate_flops(m.experts_per_token) * B  # the gates' softmax, on every PE
            model["ffn"] += gates
            per_pe["ffn"] = per_pe.get("ffn", 0) + (P * Q - 1) * gates
            add(col, "ffn", u * 2 * H + (u * H if m.expert_bias else 0))  # gate-weighted sums (and down biases)
            ar += nx * m.experts * B + P * ny * m.experts_per_token * B + u * (nx * 2 * f + ny * H)
        else:
            f = spec.ffn_size
            model["ffn"] = B * (2 * H * 2 * f + 2 * f * H)
            add(row, "ffn", B * SILU_MUL_FLOPS * f)
            ar += nx * 2 * f * B + ny * H * B
    if "handoff" in parts:
        ar += handoff_flops(Region(0, 0, P, Q), fused_handoff(plan, parts))
    S = plan.shapes
    dq = {"qkv": ("a", "qb") if ml else ("qkv",), "o": ("o",), "ffn": ("gate_up", "down")}
    copies = {"ffn": len(plan.local_experts()) if plan.moe else 1}
    dequant = sum(S[k].dequant_flops() * copies.get(part, 1) for part, ks in dq.items() if part in parts for k in ks)
    executed = dict(model, dequant=dequant) if dequant else dict(model)
    executed.update(flash_exec)
    for k, v in extra.items():
        if v:
            executed[k] += v
    for reps, d in ((Q, col), (P, row)):
        for k, v in d.items():
            executed[k] = executed.get(k, 0) + reps * v
    for k, v in per_pe.items():
        executed[k] = executed.get(k, 0) + v
    executed["allreduce"] = ar
    return executed, sum(model.values()) + sum(col.values()) + sum(row.values())
