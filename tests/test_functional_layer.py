"""A decode layer computes what the model computes (docs/workloads.md, "Functional status"): the
dense layer with flash attention run functionally against its numpy reference for every mapping
option, the reduction and elementwise kinds it is built from against numpy in both evaluators,
their multi-pass timing in closed form, and `wse check --model`."""
import numpy as np
import pytest
from click.testing import CliRunner

from engine_compare import compare_values
from wse import hardware, isa
from wse.cli import cli
from wse.engine import functional as F
from wse.engine import reference
from wse.engine.run import simulate
from wse.errors import TraceError, WseError
from wse.results import functional as RF
from wse.trace import TraceBuilder, compute, recv_compute, send
from wse.workload.layer_tensors import layer_trace, reference as layer_reference
from wse.workload.models import load_model
from wse.workload.params import DecodeParams
from wse.trace_check import validate


@pytest.fixture(scope="module")
def roomy():
    """The small wafer with SRAM for a layer of the tiny model on a few PEs."""
    return hardware.load_preset("small").with_overrides(["sram.sram_bytes=2097152", "wafer.mesh_height=128"])


def _run(tr, cfg, seed=0):
    validate(tr, cfg)
    fn = RF.FunctionalRun(seed=seed)
    res = simulate(tr, cfg, **fn.prepare(tr, "test"))
    assert res.complete
    rows, _, _ = fn.finish(tr, res)
    return rows, res


# P x Q regions: uneven hidden and FFN chunks, rows holding parts of a KV head's pairs (Q >= kv_heads),
# whole heads (Q = 1 < kv_heads) or none, one or many attention blocks per column, fused and separate norms
@pytest.mark.parametrize("P, Q, batch, context, kw", [
    (4, 8, 1, 16, {}),
    (3, 5, 2, 13, dict(attention_block=2)),
    (3, 3, 3, 20, dict(norms="separate", attention_block=4)),
    (5, 7, 2, 23, dict(attention_block=3, norms="separate")),
    (1, 1, 2, 9, dict(attention_block=3)),
    (8, 16, 1, 40, dict(attention_block=1, algo="chain")),
    (2, 70, 2, 8, dict(attention_block=3)),  # 35 rows a KV head, 32 rotary pairs: three rows hold none
    (4, 8, 2, 16, dict(attention_block=1)),  # more heads than a block's tokens: vector ops over the heads
    (8, 16, 2, 40, dict(groups=2)),  # two-level all-reduces of two groups (rows; columns: the KV heads')
    (4, 8, 2, 256, {}),  # blocks of 256 scores a row: the segment all-reduces' pipelined roots (auto)
    (3, 5, 2, 13, dict(attention_block=2, flash_blocks="serial")),  # (the default overlaps them)
    # the classic mapping on the same rows: owners of a block's heads, rows owning none, whole heads per row
    (3, 5, 2, 13, dict(attention="classic")),
    (2, 70, 2, 8, dict(attention="classic")),
    (1, 1, 2, 9, dict(attention="classic", norms="separate")),
    (8, 16, 2, 40, dict(attention="classic", groups=2)),
    (4, 8, 2, 16, dict(down_gemv="dot")),  # the down tile by output (auto takes it on the 3x5 layers too)
])
def test_a_dense_layer_computes_the_models_layer(P, Q, batch, context, kw, roomy):
    tr = layer_trace(load_model("tiny"), 0, P, Q, roomy, DecodeParams(batch=batch, context=context, **kw))
    rows, res = _run(tr, roomy)
    assert sorted(r.name for r in rows) == ["attn", "ffn_act", "ffn_out", "out", "qkv"] and not res.raced
    assert all(r.error < 0.02 and r.copies_disagree == 0 for r in rows), rows  # fp16 sums: ~0.1-1.2%


def test_a_layer_with_qkv_and_o_biases_computes_them(roomy):
    import dataclasses
    biased = dataclasses.replace(load_model("tiny"), qkv_bias=True, o_bias=True)
    tr = layer_trace(biased, 0, 3, 4, roomy, DecodeParams(batch=2, context=11))
    assert {"b_qkv", "b_o"} <= {t.name for t in tr.tensors.tensors}
    rows, res = _run(tr, roomy)
    assert all(r.ok and r.error < 0.01 for r in rows) and not res.raced
    x = RF.random_inputs(tr, 0)  # (the reference adds the biases it is given: they matter)
    unbiased = layer_reference(tr.meta, dict(x, b_qkv=0 * x["b_qkv"], b_o=0 * x["b_o"]))["out"]
    assert np.abs(unbiased - layer_reference(tr.meta, x)["out"]).max() > 0.1


@pytest.mark.parametrize("attention", ["flash", "classic"])
def test_a_wrong_score_operand_is_caught(attention, roomy):
    """The first eight score FMACs of a program (the first query head's dims of a PE) each reading
    the query dim next to the right one: the layer is wrong."""
    tr = layer_trace(load_model("tiny"), 0, 4, 8, roomy, DecodeParams(context=16, attention=attention))
    tag = [k for k, t in enumerate(tr.tags) if t.name == "layer 0 attention"][0]
    tr.ops["src1"][np.flatnonzero((tr.ops["kind"] == isa.KIND_FMAC) & (tr.ops["tag"] == tag))[:8]] += 2
    rows, _ = _run(tr, roomy)
    err = {r.name: r for r in rows}
    assert err["qkv"].ok and not err["attn"].ok and err["attn"].error > 0.05


def test_the_layer_reference_is_the_textbook_layer():
    """Against a direct transcription: RMSNorm, GQA attention with rotate-half RoPE, SwiGLU."""
    spec = load_model("tiny")
    rng = np.random.default_rng(5)
    H, F_, hd, T = spec.hidden_size, spec.ffn_size, spec.head_dim, 6
    x = {"h": rng.standard_normal((1, H)), "g1": rng.standard_normal(H), "g2": rng.standard_normal(H),
         "w_qkv": rng.standard_normal((H, spec.q_size + 2 * spec.kv_size)) / 16,
         "w_o": rng.standard_normal((spec.q_size, H)) / 16, "w_gate": rng.standard_normal((H, F_)) / 16,
         "w_up": rng.standard_normal((H, F_)) / 16, "w_down": rng.standard_normal((F_, H)) / 23,
         "rope_cos": np.cos(np.arange(hd // 2)), "rope_sin": np.sin(np.arange(hd // 2)),
         "k_cache": rng.standard_normal((1, T - 1, spec.kv_size)),
         "v_cache": rng.standard_normal((1, T - 1, spec.kv_size))}
    h = x["h"][0]
    n = h * x["g1"] / np.sqrt(np.mean(h * h) + 1e-5)
    qkv = n @ x["w_qkv"]
    out = np.zeros(spec.q_size)
    for head in range(spec.heads):
        kvh = head // (spec.heads // spec.kv_heads)

        def rot(v):
            a, b = v[: hd // 2], v[hd // 2:]
            return np.concatenate([a * x["rope_cos"] - b * x["rope_sin"], b * x["rope_cos"] + a * x["rope_sin"]])
        q = rot(qkv[head * hd:(head + 1) * hd])
        ks = [x["k_cache"][0, t, kvh * hd:(kvh + 1) * hd] for t in range(T - 1)]
        ks.append(rot(qkv[spec.q_size + kvh * hd: spec.q_size + (kvh + 1) * hd]))
        vs = [x["v_cache"][0, t, kvh * hd:(kvh + 1) * hd] for t in range(T - 1)]
        vs.append(qkv[spec.q_size + spec.kv_size + kvh * hd: spec.q_size + spec.kv_size + (kvh + 1) * hd])
        s = np.array([q @ k for k in ks]) / np.sqrt(hd)
        p = np.exp(s) / np.exp(s).sum()
        out[head * hd:(head + 1) * hd] = sum(pi * v for pi, v in zip(p, vs))
    h1 = h + out @ x["w_o"]
    n2 = h1 * x["g2"] / np.sqrt(np.mean(h1 * h1) + 1e-5)
    g, u = n2 @ x["w_gate"], n2 @ x["w_up"]
    want = h1 + (g * u / (1 + np.exp(-g))) @ x["w_down"]
    assert np.allclose(layer_reference({"model": "tiny", "layer": "0"}, x)["out"][0], want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["tiny", "tiny-mla"])
def test_layer_tensors_cover_every_weight_once(name, roomy):
    tr = layer_trace(load_model(name), 0, 3, 5, roomy, DecodeParams(batch=2, context=13))
    t = tr.tensors
    for i, ten in enumerate(t.tensors):
        flat = np.concatenate([f for _, _, f in RF._spots(t, i)])
        assert np.array_equal(np.unique(flat), np.arange(ten.size)), ten.name  # every element somewhere
        # tiles: once (norm weights: down each column, or along each row)
        if ten.role == "weight" and ten.name not in ("g1", "g2", "g_qa", "g_kv"):
            assert len(flat) == ten.size, ten.name


@pytest.mark.parametrize("name, layer, P, Q, batch, kw", [
    ("tiny-moe", 0, 4, 8, 1, {}),
    ("tiny-moe", 1, 3, 5, 3, dict(attention_block=2)),  # three sequences choosing different experts
    ("tiny-moe", 0, 4, 8, 2, dict(down_gemv="dot")),  # every expert's down tile by output
    ("moe16", 1, 4, 8, 2, dict(expert_skew=1.0)),  # 16 experts, a router bias, skewed choices
    ("tiny-oss", 0, 8, 16, 2, dict(weights="bf16")),  # a sliding-window layer with sinks, biased experts
    ("tiny-oss", 1, 8, 16, 1, dict(weights="bf16", attention_block=5)),  # a full-attention one
    ("tiny-oss", 0, 8, 16, 2, dict(weights="bf16", attention="classic")),  # sinks at the heads' owners
])
def test_moe_and_gpt_oss_layers_compute_the_models_layer(name, layer, P, Q, batch, kw, roomy):
    """(Found the sinks maxed into a column's running maximum before its sum and output were
    rescaled by exp(m - M): a sink above the column's scores mis-scaled column 0.)"""
    tr = layer_trace(load_model(name), layer, P, Q, roomy, DecodeParams(batch=batch, context=40, **kw))
    rows, res = _run(tr, roomy)
    names = {r.name for r in rows}
    assert {"out", "attn", "router", "gates"} <= names and not res.raced
    assert all(r.error < 0.02 and r.copies_disagree == 0 for r in rows), rows


# latent attention: rows of single latent dims or rotary pairs (2 x 36), one PE, the flash steps over the
# heads (blocks shorter than the 4 heads), a chain all-reduce, MoE layers, batches of 2 and 3
@pytest.mark.parametrize("layer, P, Q, batch, context, kw", [
    (0, 4, 8, 1, 16, {}),
    (0, 3, 5, 2, 13, dict(attention_block=2)),
    (0, 3, 5, 2, 13, dict(attention_block=2, flash_blocks="serial")),
    (0, 1, 1, 2, 9, dict(attention_block=3)),
    (2, 2, 36, 1, 8, dict(attention_block=1)),
    (0, 5, 7, 3, 23, dict(attention_block=3, algo="chain")),
    (1, 8, 16, 2, 40, {}),
    (0, 3, 5, 2, 13, dict(attention="classic")),
    (2, 2, 36, 1, 8, dict(attention="classic")),
    (0, 4, 8, 2, 16, dict(gemv_form="dot", down_gemv="dot")),  # every weight tile by output (16-bit)
])
def test_a_latent_attention_layer_computes_the_models_layer(layer, P, Q, batch, context, kw, roomy):
    """(Found: the absorbed query written head-major while flash over the heads reads it dim-major,
    its output read head-major by W_uv; the latent norms were FMAC stand-ins; RoPE rotated rows'
    halves of pairs another row held; q_a, q, o and the O projection's outputs strided by the
    widest chunk while their all-reduces moved each line's back to back.)"""
    tr = layer_trace(load_model("tiny-mla"), layer, P, Q, roomy, DecodeParams(batch=batch, context=context, **kw))
    rows, res = _run(tr, roomy)
    names = {r.name for r in rows}
    assert {"out", "q", "latent", "attn_latent", "o_heads"} <= names and not res.raced
    assert all(r.error < 0.02 and r.copies_disagree == 0 for r in rows), rows


@pytest.mark.parametrize("layer, P, Q, batch, context, kw", [
    (0, 4, 8, 1, 16, dict(mla_groups=2)),  # groups of 4 rows: whole latent dims, the rotary pairs on the last
    (0, 3, 5, 2, 40, dict(attention_block=2, flash_blocks="serial", mla_groups=5)),  # one row a group
    (1, 8, 16, 2, 40, dict(mla_groups=3)),  # uneven groups (6, 5, 5 rows), a later group with fewer tokens
    (2, 2, 36, 1, 8, dict(attention_block=1, mla_groups=2)),  # a token a column in each group
])
def test_latent_attention_in_row_groups_computes_the_models_layer(layer, P, Q, batch, context, kw, roomy):
    """--mla-groups: each group attends its own tokens; the groups' maxima and sums merge down the
    columns and W_uv's all-reduce adds their shares, so o and the layer's output are the model's
    (a row's latent attention output is its group's share: not an output here)."""
    tr = layer_trace(load_model("tiny-mla"), layer, P, Q, roomy, DecodeParams(batch=batch, context=context, **kw))
    rows, res = _run(tr, roomy)
    names = {r.name for r in rows}
    assert {"out", "q", "latent", "o_heads"} <= names and "attn_latent" not in names and not res.raced
    assert all(r.error < 0.02 and r.copies_disagree == 0 for r in rows), rows


def test_a_wrong_absorbed_operand_is_caught(roomy):
    """One W_uk FMAC of one PE reading the q_nope scalar next to the right one: q is still right,
    the latent attention is not."""
    tr = layer_trace(load_model("tiny-mla"), 0, 4, 8, roomy, DecodeParams(context=16))
    tag = [k for k, t in enumerate(tr.tags) if t.name == "layer 0 qkv"][0]
    from wse.workload.layer_sizes import plan_layer
    uk = plan_layer(load_model("tiny-mla"), 0, 4, roomy, DecodeParams(context=16), Q=8).shapes["uk"]
    sel = (tr.ops["kind"] == isa.KIND_FMAC) & (tr.ops["tag"] == tag) & (tr.ops["src0"] >= uk.weights) \
        & (tr.ops["src0"] < uk.weights + uk.tile_bytes())
    tr.ops["src1"][int(np.flatnonzero(sel)[3])] += 2
    err = {r.name: r for r in _run(tr, roomy)[0]}
    assert err["q"].ok and not err["attn_latent"].ok and err["attn_latent"].error > 0.05


def test_the_latent_reference_is_the_textbook_attention():
    """The absorbed form against multi-head attention with the keys and values materialized:
    k[h] = [c_kv . W_uk[h]^T | k_pe], v[h] = c_kv . W_uv[h], scores over nope + rope dims."""
    from wse.workload.mla_tensors import reference_mla
    spec = load_model("tiny-mla")
    m, rng = spec.mla, np.random.default_rng(7)
    H, heads, kvl, nope, rope, vd, T = spec.hidden_size, spec.heads, m.kv_lora_rank, m.qk_nope_head_dim, \
        m.qk_rope_head_dim, m.v_head_dim, 5
    A = m.q_lora_rank + kvl + rope
    x = {"g1": rng.standard_normal(H), "g_qa": rng.standard_normal(m.q_lora_rank), "g_kv": rng.standard_normal(kvl),
         "w_a": rng.standard_normal((H, A)) / 16, "w_qb": rng.standard_normal((m.q_lora_rank, spec.q_size)) / 8,
         "w_uk": rng.standard_normal((heads, nope, kvl)) / 4, "w_uv": rng.standard_normal((heads, kvl, vd)) / 6,
         "w_o": rng.standard_normal((heads * vd, H)) / 8, "rope_cos": np.cos(np.arange(rope // 2) * 0.7),
         "rope_sin": np.sin(np.arange(rope // 2) * 0.7), "c_cache": rng.standard_normal((1, T - 1, kvl + rope))}
    h = rng.standard_normal((1, H))

    def rms(v, w):
        return v * w / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + 1e-5)

    def rot(v):
        a, b = v[: rope // 2], v[rope // 2:]
        return np.concatenate([a * x["rope_cos"] - b * x["rope_sin"], b * x["rope_cos"] + a * x["rope_sin"]])
    a = rms(h[0], x["g1"]) @ x["w_a"]
    q_a, c_kv = rms(a[:m.q_lora_rank], x["g_qa"]), rms(a[m.q_lora_rank:m.q_lora_rank + kvl], x["g_kv"])
    latent = np.concatenate([c_kv, rot(a[m.q_lora_rank + kvl:])])
    cache = np.concatenate([x["c_cache"][0], latent[None]])
    q = (q_a @ x["w_qb"]).reshape(heads, nope + rope)
    o = np.zeros((heads, vd))
    for hh in range(heads):
        keys = np.concatenate([cache[:, :kvl] @ x["w_uk"][hh].T, cache[:, kvl:]], axis=1)  # [T, nope + rope]
        values = cache[:, :kvl] @ x["w_uv"][hh]
        s = keys @ np.concatenate([q[hh, :nope], rot(q[hh, nope:])]) / np.sqrt(nope + rope)
        p = np.exp(s - s.max())
        o[hh] = (p / p.sum()) @ values
    h1, got = reference_mla(spec, x, h, rms)
    assert np.allclose(h1[0], h[0] + o.reshape(-1) @ x["w_o"], rtol=1e-9, atol=1e-9)
    assert np.allclose(got["latent"][0], latent) and np.allclose(got["o_heads"][0], o.reshape(-1))


# low-precision tiles: dense, MoE and latent-attention layers, every stored type, uneven tiles (int4
# pieces from odd nibbles), fused and separate norms
@pytest.mark.parametrize("name, layer, P, Q, batch, kw", [
    ("tiny", 0, 3, 5, 2, dict(weights="fp8")),
    ("tiny", 1, 4, 8, 1, dict(weights="int8", norms="separate")),
    ("tiny", 0, 3, 5, 2, dict(weights="int4")),
    ("tiny-moe", 1, 4, 8, 3, dict(weights="int4")),
    ("tiny-mla", 1, 3, 5, 2, dict(weights="fp8")),
    ("tiny-mla", 0, 4, 8, 1, dict(weights="int4", attention_block=2)),
    # every weight tile by output (--gemv-form dot --down-gemv dot): DOTs over dequantized blocks of
    # outputs' weights, int4 pieces a nibble each
    ("tiny", 0, 3, 5, 2, dict(weights="fp8", gemv_form="dot", down_gemv="dot")),
    ("tiny-moe", 1, 4, 8, 3, dict(weights="int4", gemv_form="dot", down_gemv="dot")),
])
def test_a_layer_with_low_precision_tiles_computes_the_models_layer(name, layer, P, Q, batch, kw, roomy):
    """(Found: the dequantize ops read their scale at SRAM address 0; and the all-reduce scratch
    `tmp` was B elements shorter than a GEMV's outputs and a fused norm's sums, so the all-reduce
    thread overwrote the dequantize scratch after it — a race the two schedules exposed.)"""
    tr = layer_trace(load_model(name), layer, P, Q, roomy, DecodeParams(batch=batch, context=40, **kw))
    low = [t for t in tr.tensors.tensors if t.dtype != isa.DTYPE_FP16]
    assert low and all(t.role == "weight" for t in low)
    rows, res = _run(tr, roomy)
    assert all(r.error < 0.02 and r.copies_disagree == 0 for r in rows) and not res.raced, rows


@pytest.mark.parametrize("name, layer, kw", [
    ("tiny", 0, {}), ("tiny", 0, dict(weights="int4")), ("tiny-moe", 1, dict(weights="fp8")),
    ("tiny-mla", 1, dict(attention_block=2)), ("tiny-oss", 0, dict(weights="bf16")),
    ("tiny", 0, dict(attention="classic")), ("tiny-mla", 1, dict(attention="classic")),
    ("tiny", 0, dict(context=256)),  # blocks of 256 scores: pipelined segment roots, broadcasts into tmp
])
def test_every_write_of_a_layer_stays_in_its_buffer(name, layer, kw, roomy):
    """Each op's SRAM writes lie inside one buffer of the layer's plan (a static check of what the
    race above was: a receive running past `tmp` into the next buffer)."""
    from wse.workload.layer_sizes import plan_layer
    prm = DecodeParams(**dict(dict(batch=2, context=40), **kw))
    plan = plan_layer(load_model(name), layer, 4, roomy, prm, Q=8)
    tr = layer_trace(load_model(name), layer, 4, 8, roomy, prm)
    spans = sorted((a, a + n, k) for k, (a, n, _) in plan.mem.buffers.items() if n)
    starts = np.array([a for a, _, _ in spans])
    o = tr.ops
    for i in np.unique(np.flatnonzero(o["opcode"] != isa.OP_SEND)):
        reads, writes = isa.op_streams(int(o["opcode"][i]), int(o["kind"][i]), int(o["dtype"][i]), int(o["dst"][i]),
                                       int(o["src0"][i]), int(o["src1"][i]))
        for addr, nbytes in writes:
            n = 1 if o["kind"][i] in isa.KIND_REDUCES and o["opcode"][i] == isa.OP_COMPUTE else int(o["length"][i])
            k = int(np.searchsorted(starts, addr, "right")) - 1
            a, b, buf = spans[k]
            assert a <= addr and addr + n * nbytes <= b, (tr.op(int(i)).describe(), buf, a, b)


def test_what_is_not_checkable_says_why(roomy):
    for name, params, what in (("tiny", DecodeParams(context=3), "fewer than the region.s 4 columns"),):
        with pytest.raises(WseError, match=what):
            layer_trace(load_model(name), 0, 4, 8, roomy, params)


def test_check_model_checks_every_layer(tmp_path):
    r = CliRunner().invoke(cli, ["check", "--model", "tiny", "--wafer", "small", "--region", "4x8", "--context", "16",
                                 "--batch", "2"])
    assert r.exit_code == 0, r.output
    assert r.output.count(" ok") == 10 and "layer 1 on 4x8" in r.output


@pytest.mark.parametrize("name, batch", [("tiny", 2), ("tiny-moe", 3), ("tiny-mla", 2)])
def test_a_whole_decode_step_computes_the_model(name, batch):
    """Embedding, every layer, the LM head and the lanes between them in one trace. (Found RoPE
    using the all-reduce scratch `tmp` while thread 1 could already receive the next all-reduce's
    partial into it: a race the schedules exposed once lanes let the threads drift apart.)"""
    from wse.workload.jobs import _model_plan
    from wse.workload.step_tensors import step_trace
    cfg = hardware.load_preset("small").with_overrides(
        ["sram.sram_bytes=1048576", "wafer.mesh_width=16", "wafer.mesh_height=16"])
    tr = step_trace(_model_plan(name, cfg, "decode", context=16, batch=batch, moe_mapping="local"))
    rows, res = _run(tr, cfg)
    names = {r.name for r in rows}
    assert {"layer0.out", "layer1.out", "logits", "best_logit", "token"} <= names and not res.raced
    assert all(r.ok and r.error < 0.03 and r.copies_disagree == 0 for r in rows), rows
    out = {o.name: o.values for o in RF.read_outputs(tr, res.sram)}  # the greedy token: the first largest logit
    assert np.array_equal(out["token"], np.argmax(out["logits"], axis=1))
    assert np.array_equal(out["best_logit"], out["logits"].max(axis=1))


# expert regions: one per expert (the dispatch multicast past several regions, resent at the turns that need
# it; regions none of the batch chose relaying the combine), biased experts (tiny-oss), latent attention,
# 16 experts on a 128 x 128 wafer (slow: 10 s)
@pytest.mark.parametrize("name, batch, kw, mesh", [
    ("tiny-moe", 3, {}, 64),
    ("tiny-oss", 2, dict(weights="bf16"), 64),
    ("tiny-mla", 2, {}, 64),
    pytest.param("moe16", 2, dict(expert_skew=1.0), 128, marks=pytest.mark.slow),  # (the tiny ones cover the path)
])
def test_a_step_with_expert_regions_computes_the_model(name, batch, kw, mesh):
    """(Found: an expert region's lane PEs weighted the experts' outputs by the scalar at SRAM
    address 0, not the gates; each chosen expert ran on the batch's first sequences, not those
    that chose it; a column's gates were read at the widest column's offset in the payload.)"""
    from wse.workload.chain import chain_of
    from wse.workload.jobs import _model_plan
    from wse.workload.step_tensors import step_trace
    cfg = hardware.load_preset("small").with_overrides([f"wafer.mesh_width={mesh}", f"wafer.mesh_height={mesh}"])
    plan = _model_plan(name, cfg, "decode", context=64, batch=batch, moe_mapping="regions", experts_per_region=1,
                       **kw)
    roles = chain_of(plan).roles.values()
    assert sum(s.kind == "experts" for s in plan.slots) >= 4 and (name == "tiny-mla" or any(r.d_out for r in roles))
    rows, res = _run(step_trace(plan), cfg)
    names = {r.name for r in rows}
    assert {"layer1.out", "layer1.shared_out", "layer1.gates", "logits"} <= names and not res.raced
    if name == "tiny-mla":  # its dense layer 0 split: attention in its layer region, the FFN in the next slot
        assert {"layer0.mid", "layer0.ffn_act", "layer0.out"} <= names and any(s.kind == "ffn" for s in plan.slots)
    assert all(r.ok and r.error < 0.03 and r.copies_disagree == 0 for r in rows), rows


def test_a_wrong_gate_in_an_expert_region_is_caught():
    from wse.workload.jobs import _model_plan
    from wse.workload.step_tensors import step_trace
    from wse.workload.experts import plan_experts
    cfg = hardware.load_preset("small")
    plan = _model_plan("tiny-moe", cfg, "decode", context=64, batch=2, moe_mapping="regions", experts_per_region=1)
    tr = step_trace(plan)
    slot = next(s for s in plan.slots if s.kind == "experts")
    acc, size = plan_experts(plan.spec, 0, slot.experts, plan.P, cfg, plan.params, plan.Q).mem.buffers["acc"][:2]
    tags = {k for k, t in enumerate(tr.tags) if t.name.startswith("layer 0 experts") and t.name.endswith(" ffn")}
    weighting = np.flatnonzero(np.isin(tr.ops["tag"], list(tags)) & (tr.ops["kind"] == isa.KIND_FMAC)
                               & (tr.ops["dst"] >= acc) & (tr.ops["dst"] < acc + size))
    assert len(weighting)
    tr.ops["src1"][weighting[0]] += 2  # one lane PE weights one output by the sequence's other gate
    err = {r.name: r for r in _run(tr, cfg)[0]}
    assert err["layer0.gates"].ok and err["layer0.shared_out"].ok and not err["layer0.out"].ok


def test_check_model_full_checks_the_step():
    r = CliRunner().invoke(cli, ["check", "--model", "tiny", "--full", "--wafer", "small", "--context", "16",
                                 "--set", "wafer.mesh_width=16", "--set", "wafer.mesh_height=16",
                                 "--set", "sram.sram_bytes=1048576"])
    assert r.exit_code == 0, r.output
    assert "decode step (2 layers" in r.output and "logits" in r.output and "WRONG" not in r.output


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny", "--phase", "prefill", "--full"], "--phase prefill checks one layer's prefill kernels"),
    (["--model", "tiny", "--op", "gemv"], "give exactly one of --trace, --op and --model"),
    (["--op", "gemv", "--m", "8", "--n", "8", "--full"], "--full checks a model's decode step"),
    (["--model", "tiny-moe", "--moe-mapping", "regions"], "expert regions here; a layer is checked with them"),
])
def test_check_model_bad_input_is_one_error_line(args, message):
    r = CliRunner().invoke(cli, ["check"] + args + ["--wafer", "small", "--context", "64"])
    assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, r.output


# ---- prefill ---------------------------------------------------------------------------------------------

# dense, MoE (the experts' width), latent attention (its two latent norms; a column straddling both latents),
# gpt-oss-shaped; uneven token rows, key columns, rotary-pair cuts (a column's pairs across vectors)
# a chunk of a longer prompt (keys: its queries attend more tokens than it holds, workload/chunked.py)
@pytest.mark.parametrize("name, P, Q, S, keys", [("tiny", 4, 8, 16, None), ("tiny", 3, 5, 13, None),
                                                 ("tiny-moe", 4, 4, 9, None), ("tiny-mla", 5, 7, 20, None),
                                                 ("tiny-oss", 4, 6, 8, None), ("tiny", 3, 5, 8, 29)])
def test_the_prefill_elementwise_kernel_computes_each_part(name, P, Q, S, keys, roomy):
    from wse.workload.prefill_elementwise import elementwise
    tr, facts = elementwise(load_model(name), P, S, roomy, Q=Q, record=True, keys=keys)
    rows, res = _run(tr, roomy)
    assert {"xn1", "rope_out", "probs", "h1", "xn2", "act", "out"} <= {r.name for r in rows} and not res.raced
    assert all(r.error < 0.01 and r.copies_disagree == 0 for r in rows), rows
    assert int(res.pe("flops").sum()) == facts["executed_flops"]  # the closed form


def test_check_model_prefill_checks_every_kernel_of_a_layer():
    # (a 16x16 wafer: tiny's layers on 8x8 slots, two tokens a row, keep the functional runs short)
    r = CliRunner().invoke(cli, ["check", "--model", "tiny", "--phase", "prefill", "--prompt-len", "16",
                                 "--wafer", "small", "--set", "wafer.mesh_width=16", "--set", "wafer.mesh_height=16"])
    assert r.exit_code == 0, r.output
    assert r.output.count("prefill ") == 7 and "WRONG" not in r.output  # six GEMMs and the elementwise kernel


# ---- the kinds the layer is built from ----------------------------------------------------------------

KINDS = [isa.KIND_DOT, isa.KIND_RMAX, isa.KIND_RSUM, isa.KIND_EXP, isa.KIND_RSQRT, isa.KIND_RECIP, isa.KIND_SILU,
         isa.KIND_SUB, isa.KIND_FILL]


def _one_op_trace(kind: int, n: int, dtype: int = isa.DTYPE_FP16):
    b = TraceBuilder(1, 1, 1)
    b.assign(0, 0, 0, [compute(kind, n, dst=1024, src0=0, src1=512, dtype=dtype)])
    return b.build()


def _numpy(kind, a, b, s, acc):
    with np.errstate(all="ignore"):
        return {isa.KIND_DOT: acc + np.sum(a * b), isa.KIND_RMAX: max(acc, a.max()), isa.KIND_RSUM: acc + a.sum(),
                isa.KIND_EXP: np.exp(a - s), isa.KIND_RSQRT: 1 / np.sqrt(a + s), isa.KIND_RECIP: 1 / a,
                isa.KIND_SILU: a / (1 + np.exp(-a)), isa.KIND_SUB: a - b, isa.KIND_FILL: np.full_like(a, s)}[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_new_kinds_compute_what_numpy_computes(kind, tiny):
    n = 13
    rng = np.random.default_rng(kind)
    a = rng.standard_normal(n).astype(np.float16)
    a = np.abs(a) if kind == isa.KIND_RSQRT else a
    b = rng.standard_normal(n).astype(np.float16)
    s, acc = np.float16(0.25), np.float16(0.5)
    sram = np.zeros((1, 2048), np.uint8)
    sram[0, 0:2 * n] = a.view(np.uint8)
    sram[0, 512:512 + 2 * n] = (b if isa.KIND_SOURCES[kind] == 2 else np.array([s] * n, np.float16)).view(np.uint8)
    sram[0, 1024:1026] = np.array([acc], np.float16).view(np.uint8)
    tr = _one_op_trace(kind, n)
    got = F.evaluate(tr, sram).sram[0, 1024:1024 + 2 * n].view(np.float16).astype(np.float64)
    ref = reference.simulate(tr, tiny, sram=sram)
    assert np.array_equal(ref.sram[0, :2048], F.evaluate(tr, sram).sram[0, :2048])  # both evaluators, bit for bit
    want = np.asarray(_numpy(kind, a.astype(np.float64), b.astype(np.float64), float(s), float(acc)))
    if kind in isa.KIND_REDUCES:  # one element, rounded after every step: within fp16 steps of numpy's
        assert abs(got[0] - want) <= 4e-3 * max(1.0, abs(want)) and got[1] == 0
    else:
        assert np.allclose(got, want.astype(np.float16).astype(np.float64), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("start", [-1e6, -3.0])
def test_rfind_keeps_minus_the_first_index_equal_to_the_scalar(start, tiny):
    """RFIND (fp16 sources, an fp32 accumulator): dst[0] = max(dst[0], -e) over the elements e
    equal to the scalar, so a tie keeps the first; an accumulator already above -e stays. Both
    evaluators agree bit for bit; timing: setup plus ceil(n / width) steps, one FLOP and two
    bytes read per element."""
    n = 23
    a = np.arange(n, dtype=np.float16) % 7  # 6 at 6, 13 and 20
    sram = np.zeros((1, 2048), np.uint8)
    sram[0, 0:2 * n] = a.view(np.uint8)
    sram[0, 512:514] = np.array([6], np.float16).view(np.uint8)
    sram[0, 1024:1028] = np.array([start], np.float32).view(np.uint8)
    tr = _one_op_trace(isa.KIND_RFIND, n, isa.DTYPE_MIXED)
    got = F.evaluate(tr, sram).sram[0]
    assert float(got[1024:1028].view(np.float32)[0]) == max(start, -6.0)
    ref = reference.simulate(tr, tiny, sram=sram)
    assert np.array_equal(ref.sram[0, :2048], got[:2048])
    res = simulate(tr, tiny)
    E = min(tiny.simd_width(isa.KIND_RFIND, isa.DTYPE_MIXED), tiny.sram_port_bytes // 4)
    assert res.total_cycles == tiny.vector_setup_cycles + -(-n // E) == ref.total_cycles
    assert int(res.pe("flops").sum()) == n and int(res.pe("sram_read_bytes").sum()) == 2 * n


@pytest.mark.parametrize("kind", [isa.KIND_EXP, isa.KIND_RSQRT, isa.KIND_RECIP, isa.KIND_SILU, isa.KIND_DOT])
def test_multi_pass_kinds_take_setup_plus_passes_times_the_steps(kind, tiny):
    """Closed form: S + ceil(passes * n / E) cycles (the passes stream as one vector of passes * n
    elements), FLOPs kind_flops * n, bytes per pass."""
    n = 37
    tr = _one_op_trace(kind, n)
    res = simulate(tr, tiny)
    E = min(tiny.simd_width(kind, isa.DTYPE_FP16), tiny.sram_port_bytes // 2)
    passes = isa.KIND_PASSES[kind]
    steps = -(-passes * n // E)
    two = isa.KIND_SOURCES[kind] == 2  # src0 = 0 and src1 = 512 start in one bank group: two substeps
    assert res.total_cycles == tiny.vector_setup_cycles + steps * (2 if two else 1)
    assert int(res.pe("flops").sum()) == isa.KIND_FLOPS[kind] * n
    reads = 2 * n * 2 if isa.KIND_SOURCES[kind] == 2 else 2 * n * passes
    assert int(res.pe("sram_read_bytes").sum()) == reads
    assert res.complete and res.total_cycles == reference.simulate(tr, tiny).total_cycles


def test_reduction_and_function_kinds_are_compute_only(tmp_path, tiny):
    b = TraceBuilder(2, 1, 1)
    b.route(0, 0, 0, isa.PORT_RAMP, [isa.PORT_EAST])
    b.route(1, 0, 0, isa.PORT_WEST, [isa.PORT_RAMP])
    b.assign(0, 0, 0, [send(0, 4, 0)])
    b.assign(1, 0, 0, [recv_compute(0, isa.KIND_DOT, 4, dst=64, src0=0)])
    p = tmp_path / "t.h5"
    b.build().save(p)
    from wse.trace import load
    with pytest.raises(TraceError, match="a dot op cannot take a wavelet"):
        load(p)


def test_values_of_random_traces_with_the_new_kinds_agree(tiny):
    """The random-trace generator draws every kind (tests/randomtrace.KINDS): both evaluators agree."""
    from randomtrace import privatize, random_trace
    seen = set()
    for s in range(60):
        tr, cfg = random_trace(s)
        seen |= set(int(k) for k in np.unique(tr.ops["kind"]))
        compare_values(privatize(tr), cfg, s)
    assert set(KINDS) <= seen
