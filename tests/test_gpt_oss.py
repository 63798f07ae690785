"""gpt-oss's features (docs/workloads.md): experts with biases, attention sinks, alternating
sliding-window layers; on tiny-oss, a small model with all of them, and on gpt-oss-120b."""
import dataclasses

import pytest

from checked import composed_equals_full, run
from engine_compare import assert_same
from wse.engine import reference
from wse.system import gpu as g
from wse.workload.attention import SINK_FLOPS, SINK_FLOPS_BY_HEADS, by_heads
from wse.workload.compose import compose
from wse.workload.decode import bytes_needed, kv_bytes, plan_model
from wse.workload.layer import decode_layer, layer_flops
from wse.workload.layer_sizes import plan_layer
from wse.workload.mesh import MeshBuilder, Region
from wse.workload.models import ModelError, load_model
from wse.workload.params import DecodeParams
from wse.workload.region import Lanes


def test_sliding_layers_attend_to_their_window():
    spec = load_model("gpt-oss-120b")
    assert [spec.is_sliding(i) for i in range(4)] == [True, False, True, False]
    assert spec.attended(0, 1024) == 128 and spec.attended(1, 1024) == 1024 and spec.attended(0, 100) == 100
    assert spec.causal_pairs(1, 300) == 300 * 301 // 2
    assert spec.causal_pairs(0, 300) == sum(min(t, 128) for t in range(1, 301))
    p = DecodeParams(context=1024)
    assert kv_bytes(spec, p, 0, 36) == spec.kv_cache_width * 2 * 18 * (128 + 1024)
    per_token = 4 * spec.heads * spec.head_dim
    assert spec.attention_flops_per_token(1024) == per_token * 18 * (128 + 1024)


@pytest.mark.parametrize("kw", [dict(batch=2, context=20), dict(batch=1, context=5),
                                dict(batch=2, context=20, moe_mapping="regions", experts_per_region=2)])
def test_tiny_oss_composes_exactly(kw, small):
    spec = load_model("tiny-oss")
    plan = plan_model(spec, small, DecodeParams(**kw))
    builds = composed_equals_full(plan, small)  # cycles, FLOPs (biases, sinks) and bytes at int4 experts
    T = kw["context"]
    assert sum(b.kv_bytes for b in builds if b.kind == "layer") == \
        spec.kv_cache_width * kw["batch"] * 2 * sum(min(T, 8) if i % 2 == 0 else T for i in range(spec.layers))


@pytest.mark.parametrize("attention", ["flash", "classic"])
def test_sinks_add_their_flops_at_column_zero(small, attention):
    spec = load_model("tiny-oss")
    params = DecodeParams(batch=2, context=20, attention=attention)
    flops = {}
    for sinks in (True, False):
        s = dataclasses.replace(spec, attention_sinks=sinks)
        plan = plan_model(s, small, params)
        flops[sinks] = compose(plan, lambda t: run(t, small)).total("flops")
    # classic: each head's sink once; flash: on every row of the head's block (its softmax is replicated
    # there), one more FLOP where the row's ops run over its heads (every layer here: 4 heads, blocks of <= 3)
    Q = plan.Q
    per_layer = spec.heads if attention == "classic" else Q * spec.heads // spec.kv_heads
    per_sink = SINK_FLOPS if attention == "classic" else SINK_FLOPS_BY_HEADS
    assert all(by_heads(params, spec.heads // spec.kv_heads, -(-min(20, T) // plan.P)) for T in (8, 20))
    assert flops[True] - flops[False] == per_sink * per_layer * 2 * spec.layers


def test_a_sliding_moe_layer_with_biases_and_sinks_matches_the_reference_stepper(small):
    spec = load_model("tiny-oss")
    roomy = small.with_overrides(["sram.sram_bytes=131072"])
    plan = plan_layer(spec, 0, 4, roomy, DecodeParams(batch=2, context=12))
    assert sum(plan.T_c) == 8 and "sinks" in plan.buf and "b_gu" in plan.buf
    b = MeshBuilder(4, plan.Q, 4)
    parts = ("norm1", "qkv", "attention", "o", "norm2", "ffn")
    build = decode_layer(plan, Region(0, 0, 4, plan.Q), b, Lanes(None, {}, None, {}), parts)
    trace = b.build()
    fast = run(trace, roomy)
    assert_same(fast, reference.simulate(trace, roomy), "tiny-oss layer")
    assert int(fast.pe("flops").sum()) == sum(build.flops.values()) == sum(layer_flops(plan, parts)[0].values())


def test_gpt_oss_sizes_and_gpu_windows():
    spec = load_model("gpt-oss-120b")
    p = DecodeParams(context=8192)
    full = dataclasses.replace(spec, sliding_window=0)
    assert bytes_needed(full, p, 36) - bytes_needed(spec, p, 36) == spec.kv_cache_width * 2 * 18 * (8192 - 128)
    h100 = g.load_gpu("h100")
    windowed, everywhere = (g.gpu_decode(m, h100, batch=64, context=8192) for m in (spec, full))
    assert windowed.hbm_fraction < everywhere.hbm_fraction and windowed.step_latency_s < everywhere.step_latency_s
    assert g.gpu_prefill(spec, h100, 4096).ttft_s < g.gpu_prefill(full, h100, 4096).ttft_s


def test_bad_windows_are_refused(tmp_path):
    from wse.workload.models import load_model as load
    path = tmp_path / "m.toml"
    text = (load_model.__globals__["MODELS_DIR"] / "tiny-oss.toml").read_text()
    path.write_text(text.replace("sliding_window = 8", "sliding_window = -1"))
    with pytest.raises(ModelError, match="sliding_window must be a non-negative integer"):
        load(str(path))
