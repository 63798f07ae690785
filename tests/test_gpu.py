"""GPU baseline (wse/system/gpu.py): presets, the decode/prefill rooflines against hand-computed
closed forms, node selection, MoE expert counting, cost/energy, and monotonicity."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from wse.errors import WseError
from wse.system import gpu as g
from wse.system.gpu import curve, gpu_decode, gpu_prefill, load_gpu
from wse.workload.models import load_model

TP = 8


@pytest.fixture(scope="module")
def h100():
    return load_gpu("h100")


@pytest.fixture(scope="module")
def l8b():
    return load_model("llama3.1-8b")


def _ring(gpu, nbytes):
    """Two ring all-reduces of nbytes over 8 GPUs, written out."""
    return 2 * (2 * 7 / 8 * nbytes / gpu.nvlink_bytes_per_s + 2 * 7 * gpu.allreduce_step_latency_s)


# ---- presets ---------------------------------------------------------------------------------

def test_presets_load_with_published_anchors():
    assert g.GPU_NAMES == ("b200", "h100", "h200")
    h100, h200, b200 = load_gpu("h100"), load_gpu("h200"), load_gpu("b200")
    assert (h100.hbm_bytes, h100.hbm_bytes_per_s, h100.bf16_flops_per_s, h100.power_w) == (80e9, 3.35e12, 989e12, 700)
    assert (h200.hbm_bytes, h200.hbm_bytes_per_s, h200.fp8_flops_per_s) == (141e9, 4.8e12, 1979e12)
    assert (b200.hbm_bytes_per_s, b200.bf16_flops_per_s, b200.fp8_flops_per_s, b200.power_w) == (8e12, 2250e12, 4500e12, 1000)
    assert 2 * h100.nvlink_bytes_per_s == 900e9 and 2 * b200.nvlink_bytes_per_s == 1.8e12
    assert all(load_gpu(n).gpus_per_node == 8 for n in g.GPU_NAMES)


@pytest.mark.parametrize("name", ["h100", "h200", "b200"])
def test_every_preset_value_carries_a_source_tag(name):
    for line in (g.PRESETS_DIR / f"{name}.toml").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "name")):
            assert re.search(r"#.*\[[PSU]\]", line), line


def test_set_overrides_accept_both_spellings(h100):
    c = load_gpu("h100", ["hbm_efficiency=0.5", "gpu.power_w=650"])
    assert (c.hbm_efficiency, c.power_w, c.hbm_bytes) == (0.5, 650.0, h100.hbm_bytes)


def _preset_text(**changes) -> str:
    text = (g.PRESETS_DIR / "h100.toml").read_text()
    for old, new in changes.items():
        text = re.sub(rf"^{old} =", f"{new} =", text, flags=re.M)
    return text


def test_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "typo.toml"
    p.write_text(_preset_text(hbm_bytes_per_s="hbm_bandwidth"))
    with pytest.raises(WseError, match=r"typo\.toml.*'hbm_bandwidth'"):
        load_gpu(str(p))


@pytest.mark.parametrize("sets, pattern", [
    (["hbm_efficiency=1.5"], r"hbm_efficiency = 1.5 is out of range"),
    (["gpus_per_node=2.5"], r"gpus_per_node must be int"),
    (["power_w=true"], r"power_w must be float"),
    (["flops_eff=0.5"], r"unknown GPU key 'flops_eff' \(did you mean flops_efficiency\?\)"),
    (["power_w"], r"expected key=value"),
])
def test_bad_overrides_are_rejected(sets, pattern):
    with pytest.raises(WseError, match=pattern):
        load_gpu("h100", sets)


def test_missing_key_and_unknown_preset(tmp_path):
    p = tmp_path / "short.toml"
    p.write_text(re.sub(r"^power_w =.*$", "", _preset_text(), flags=re.M))
    with pytest.raises(WseError, match=r"short\.toml: missing GPU key 'power_w'"):
        load_gpu(str(p))
    with pytest.raises(WseError, match=r"unknown GPU preset 'a100'"):
        load_gpu("a100")


# ---- decode roofline -------------------------------------------------------------------------

def test_batch1_decode_reproduces_the_closed_form(h100, l8b):
    ctx, L, h = 1024, 32, 4096
    layer_bytes = 2 * l8b.layer_params(0) + ctx * 2 * (8 * 128) * 2       # weights + K and V
    head_bytes = 2 * 128256 * h
    mem = (L * layer_bytes + head_bytes) / (TP * h100.hbm_bytes_per_s * h100.hbm_efficiency)
    expected = mem + L * _ring(h100, h * 2)
    r = gpu_decode(l8b, h100, batch=1, context=ctx)
    assert r.nodes == 1 and r.gpus == 8 and r.micro_batches == 1
    assert r.step_latency_s == pytest.approx(expected, rel=1e-9)
    assert r.tokens_per_s_per_user == pytest.approx(1 / expected, rel=1e-9)
    assert r.aggregate_tokens_per_s == pytest.approx(1 / expected, rel=1e-9)
    assert r.compute_s == 0 and r.memory_s == pytest.approx(mem, rel=1e-9)


def test_large_batch_decode_is_compute_bound_and_matches_closed_form(h100, l8b):
    B, ctx, L, h = 4096, 16, 32, 4096
    eff = TP * h100.bf16_flops_per_s * h100.flops_efficiency
    layer = (2 * l8b.layer_params(0) * B + B * ctx * 4 * 32 * 128) / eff
    head = 2 * 128256 * h * B / eff
    expected = L * layer + head + L * _ring(h100, B * h * 2)
    r = gpu_decode(l8b, h100, batch=B, context=ctx)
    assert r.bound == "compute" and r.memory_s == 0
    assert r.step_latency_s == pytest.approx(expected, rel=1e-9)
    assert r.aggregate_tokens_per_s == pytest.approx(B / expected, rel=1e-9)


def test_llama70b_lands_near_the_hardware_md_roofline(h100):
    m = load_model("llama3.1-70b")
    ideal = load_gpu("h100", ["hbm_efficiency=1", "allreduce_step_latency_s=0", "nvlink_bytes_per_s=1e13"])
    assert gpu_decode(m, ideal, batch=1).tokens_per_s_per_user == pytest.approx(190, rel=0.03)
    assert 90 < gpu_decode(m, h100, batch=1).tokens_per_s_per_user < 150


def test_fp8_weights_use_the_fp8_peak_and_half_the_bytes(h100, l8b):
    bf16 = gpu_decode(l8b, h100, batch=4096, context=16)
    fp8 = gpu_decode(l8b, h100, batch=4096, context=16, weight_bytes=1)
    assert fp8.compute_s < 0.6 * bf16.compute_s
    assert gpu_decode(l8b, h100, weight_bytes=1).memory_s < 0.55 * gpu_decode(l8b, h100).memory_s


# ---- memory and nodes ------------------------------------------------------------------------

def test_stored_bytes_match_the_model(h100):
    for name in ("llama3.1-8b", "deepseek-v3", "gpt-oss-120b", "mixtral-8x7b"):
        m = load_model(name)
        assert sum(g.node_bytes(m, h100, 1, 0)) == pytest.approx(m.weight_bytes(), rel=1e-12)
        assert sum(g.node_bytes(m, h100, 3, 0)) >= m.weight_bytes()


def test_fewest_nodes_for_llama405b():
    m = load_model("llama3.1-405b")
    kv = 1024 * 2 * (8 * 128) * 2 * 126                                    # batch 1, context 1024
    need = m.total_params() * 2 + kv                                       # ~ 811 GB bf16
    for name, expected in (("h100", 2), ("h200", 1), ("b200", 1)):
        gpu = load_gpu(name)
        usable = 8 * gpu.hbm_bytes * (1 - gpu.memory_reserve_fraction)     # 576 / 1015 / 1296 GB
        assert math.ceil(need / usable) == expected
        assert gpu_decode(m, gpu, batch=1, context=1024).nodes == expected
    with pytest.raises(WseError, match="needs .* GB on a node"):
        gpu_decode(m, load_gpu("h100"), nodes=1)


def test_kv_cache_growth_adds_nodes(h100):
    m = load_model("llama3.1-70b")
    per_pos = 2 * 1024 * 2 * 80
    r = gpu_decode(m, h100, batch=64, context=32768)
    need = m.weight_bytes() + 64 * 32768 * per_pos
    assert r.nodes >= math.ceil(need / h100.usable_node_bytes) > 1
    assert not g.fits(m, h100, r.nodes - 1, 64 * 32768)


def test_mla_kv_size_and_replication():
    m = load_model("deepseek-v3")
    assert g.kv_bytes_per_token_layer(m) == (512 + 64) * 2
    assert g.kv_replication(m, 8) == 8
    assert g.kv_replication(load_model("llama3.1-8b"), 8) == 1


def test_curve_drops_batches_whose_kv_does_not_fit():
    m, h200 = load_model("llama3.1-405b"), load_gpu("h200")
    pts = curve(m, h200, 131072)
    kept = [b for b in g.DEFAULT_BATCHES if g.fits(m, h200, 1, b * 131072)]
    assert [p.batch for p in pts] == kept and 0 < len(kept) < len(g.DEFAULT_BATCHES)


# ---- MoE -------------------------------------------------------------------------------------

def test_distinct_experts_formula():
    assert g.distinct_experts(8, 2, 1) == pytest.approx(2)
    assert g.distinct_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75 ** 2))      # 3.5
    assert g.distinct_experts(256, 8, 10_000) == pytest.approx(256)
    rng = np.random.default_rng(0)
    E, k, T, trials = 64, 6, 20, 4000
    sims = [len({int(e) for _ in range(T) for e in rng.choice(E, k, replace=False)}) for _ in range(trials)]
    assert np.mean(sims) == pytest.approx(g.distinct_experts(E, k, T), rel=0.01)


def test_moe_layer_reads_touched_experts_and_counts_active_flops():
    m = load_model("deepseek-v3")
    e, E, layer = m.expert_params(), 256, 10
    common = m.layer_params(layer) - E * e
    nbytes, flops = g.layer_touched(m, layer, 64)
    assert nbytes == pytest.approx(common + g.distinct_experts(E, 8, 64) * e)      # fp8: 1 B/param
    assert flops == pytest.approx(2 * 64 * (common + 8 * e))
    per_token = sum(g.layer_touched(m, i, 1)[1] for i in range(m.layers)) / 2
    head = m.vocab_size * m.hidden_size
    assert per_token == m.active_params() - m.embedding_params() - head - m.hidden_size


def test_mixed_dtype_experts_read_at_their_width():
    m = load_model("gpt-oss-120b")
    nbytes, _ = g.layer_touched(m, 0, 1)
    common = m.layer_params(0) - 128 * m.expert_params()
    assert nbytes == pytest.approx(2 * common + 4 * m.expert_params() * 4.25 / 8)


# ---- pipeline --------------------------------------------------------------------------------

def test_two_node_pipeline_at_batch1_adds_one_hop(h100):
    m = load_model("llama3.1-70b")
    one = gpu_decode(m, h100, batch=1)
    two = gpu_decode(m, h100, batch=1, nodes=2)
    hop = h100.internode_latency_s + m.hidden_size * 2 / h100.internode_bytes_per_s
    assert two.step_latency_s == pytest.approx(one.step_latency_s + hop, rel=1e-9)
    assert two.gpus == 16 and two.power_w == 2 * one.power_w


def test_micro_batches_bound_the_round_by_the_busiest_stage(h100):
    m = load_model("llama3.1-70b")
    r = gpu_decode(m, h100, batch=8, nodes=2)
    assert r.micro_batches == 2
    stages = g._stage_terms(m, h100, g.split_layers(80, 2), 4, 4 * 1024, 4 * 1024, 4, None, 2.0)
    hop = h100.internode_latency_s + 4 * m.hidden_size * 2 / h100.internode_bytes_per_s
    expected = max(sum(s.total for s in stages) + hop, 2 * max(s.total for s in stages))
    assert r.step_latency_s == pytest.approx(expected, rel=1e-12)
    assert r.aggregate_tokens_per_s == pytest.approx(8 / expected, rel=1e-12)


# ---- cost and energy -------------------------------------------------------------------------

def test_cost_and_energy_follow_from_the_inputs(l8b):
    gpu = load_gpu("h100", ["power_w=500", "node_overhead_power_w=1000", "cost_per_gpu_hour_usd=2"])
    r = gpu_decode(l8b, gpu, batch=32)
    assert r.power_w == 8 * 500 + 1000
    assert r.j_per_token == pytest.approx(5000 / r.aggregate_tokens_per_s, rel=1e-12)
    assert r.usd_per_mtok == pytest.approx(16 / 3600 / r.aggregate_tokens_per_s * 1e6, rel=1e-12)
    half = gpu_decode(l8b, gpu, batch=32, utilization=0.5)
    assert half.j_per_token == pytest.approx(2 * r.j_per_token) and half.usd_per_mtok == pytest.approx(2 * r.usd_per_mtok)
    assert half.aggregate_tokens_per_s == r.aggregate_tokens_per_s
    for bad in (dict(utilization=0), dict(utilization=1.5), dict(batch=0), dict(context=0)):
        with pytest.raises(WseError):
            gpu_decode(l8b, gpu, **bad)


# ---- monotonicity ----------------------------------------------------------------------------

CASES = [("llama3.1-8b", "h100", 1), ("mixtral-8x7b", "b200", 1), ("deepseek-v3", "h200", 1),
         ("llama3.1-70b", "h100", 3), ("deepseek-v3", "h100", 2)]


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(CASES), b1=st.integers(1, 300), b2=st.integers(1, 300),
       ctx=st.sampled_from([1, 256, 2048]))
def test_more_batch_never_lowers_throughput_nor_raises_per_user_rate(case, b1, b2, ctx):
    name, gname, nodes = case
    m, gpu = load_model(name), load_gpu(gname)
    lo, hi = sorted((b1, b2))
    try:
        a = gpu_decode(m, gpu, batch=lo, context=ctx, nodes=nodes)
        b = gpu_decode(m, gpu, batch=hi, context=ctx, nodes=nodes)
    except WseError:  # the batch's KV cache does not fit on these nodes
        assume(False)
    assert b.aggregate_tokens_per_s >= a.aggregate_tokens_per_s * (1 - 1e-12)
    assert b.tokens_per_s_per_user <= a.tokens_per_s_per_user * (1 + 1e-12)


def test_curve_is_a_tradeoff(h100):
    pts = curve(load_model("mixtral-8x7b"), h100, 2048)
    assert [p.batch for p in pts] == list(g.DEFAULT_BATCHES)
    assert all(p.aggregate_tokens_per_s <= q.aggregate_tokens_per_s for p, q in zip(pts, pts[1:]))
    assert all(p.tokens_per_s_per_user >= q.tokens_per_s_per_user for p, q in zip(pts, pts[1:]))


def test_curve_prices_every_point(h100):
    """On fixed nodes power and price are fixed, so J/token and $/Mtok fall exactly as the
    aggregate rises: each point is the step model's at that batch, utilization included."""
    m = load_model("mixtral-8x7b")
    pts = curve(m, h100, 2048, utilization=0.5)
    nodes = gpu_decode(m, h100, batch=1, context=2048).nodes
    for p in pts:
        r = gpu_decode(m, h100, batch=p.batch, context=2048, nodes=nodes, utilization=0.5)
        assert (p.j_per_token, p.usd_per_mtok) == (r.j_per_token, r.usd_per_mtok)
        served = p.aggregate_tokens_per_s * 0.5
        assert p.j_per_token == pytest.approx(nodes * h100.node_power_w / served, rel=1e-12)
        assert p.usd_per_mtok == pytest.approx(
            nodes * h100.gpus_per_node * h100.cost_per_gpu_hour_usd / 3600 / served * 1e6, rel=1e-12)
    assert [p.usd_per_mtok for p in pts] == sorted((p.usd_per_mtok for p in pts), reverse=True)


# ---- prefill ---------------------------------------------------------------------------------

def test_prefill_reproduces_the_compute_bound_closed_form(h100, l8b):
    P, L, h = 2048, 32, 4096
    eff = TP * h100.bf16_flops_per_s * h100.flops_efficiency
    layer = (2 * l8b.layer_params(0) * P + P * (P + 1) / 2 * 4 * 32 * 128) / eff
    head = 2 * 128256 * h / (TP * h100.hbm_bytes_per_s * h100.hbm_efficiency)  # last token only: a GEMV
    expected = L * layer + head + L * _ring(h100, P * h * 2)
    r = gpu_prefill(l8b, h100, P)
    assert r.bound == "compute" and r.nodes == 1
    assert r.ttft_s == pytest.approx(expected, rel=1e-9)
    assert gpu_prefill(l8b, h100, P, batch=4).ttft_s > 3.5 * r.ttft_s


def test_best_parallelism_is_the_cheapest_feasible_one():
    from wse.system.gpu_parallel import TP_CHOICES, best_decode, with_tp
    h100 = load_gpu("h100")
    for model, batch in (("llama3.1-8b", 1), ("llama3.1-8b", 64), ("llama3.1-70b", 1), ("llama3.1-405b", 8)):
        spec = load_model(model)
        r, g = best_decode(spec, h100, batch=batch, context=2048)
        every = []
        for tp in TP_CHOICES:
            try:
                every.append(gpu_decode(spec, with_tp(h100, tp), batch=batch, context=2048))
            except WseError:
                continue
        assert r.usd_per_mtok == pytest.approx(min(x.usd_per_mtok for x in every))
        assert r.gpus == r.nodes * g.gpus_per_node
    r, g = best_decode(load_model("llama3.1-8b"), h100, batch=1, context=1024)
    assert g.gpus_per_node == 1 and r.gpus == 1  # 16 GB of weights: one GPU is the cheapest
    assert g.node_overhead_power_w == pytest.approx(h100.node_overhead_power_w / 8)  # its share of the node
    r, g = best_decode(load_model("llama3.1-8b"), h100, batch=1, context=1024, tp=8)
    assert g is h100 and r.gpus == 8
    with pytest.raises(WseError, match="tensor parallelism"):
        with_tp(h100, 16)


def test_cheapest_point_sizes_the_nodes_for_each_batch():
    """The cost frontier takes each batch's cheapest parallelism; its cheapest point undercuts
    every point of the fixed-node curve sized for batch 1 (llama3.1-70b: TP2 holds a batch of 8
    at most, TP4 serves 256 for far less per token)."""
    from wse.system.gpu_parallel import best_decode, cheapest, cost_frontier
    h100, spec = load_gpu("h100"), load_model("llama3.1-70b")
    frontier = cost_frontier(spec, h100, context=1024)
    assert [r.batch for r, _ in frontier] == list(g.DEFAULT_BATCHES)
    for r, c in frontier:
        assert r.usd_per_mtok == best_decode(spec, h100, batch=r.batch, context=1024)[0].usd_per_mtok
    low, cfg = cheapest(frontier)
    assert low.usd_per_mtok == min(r.usd_per_mtok for r, _ in frontier)
    one, one_cfg = best_decode(spec, h100, batch=1, context=1024)
    fixed = curve(spec, one_cfg, 1024, nodes=one.nodes)
    assert max(p.batch for p in fixed) < 256 and low.batch == 256 and cfg.gpus_per_node > one_cfg.gpus_per_node
    assert low.usd_per_mtok < min(p.usd_per_mtok for p in fixed)
    with pytest.raises(WseError, match="no batch fits"):
        cheapest([])


def test_undercut_is_the_fastest_cheaper_point():
    """Below the undercutting point's rate per user some GPU point is cheaper than a given cost;
    every frontier point faster than it costs at least that much."""
    from wse.system.gpu_parallel import cost_frontier, undercut
    frontier = cost_frontier(load_model("llama3.1-70b"), load_gpu("h100"), context=1024)
    for usd in (0.6, 6.39, 20.0, 1e9):
        r, _ = undercut(frontier, usd)
        assert r.usd_per_mtok < usd
        assert all(q.usd_per_mtok >= usd for q, _ in frontier if q.tokens_per_s_per_user > r.tokens_per_s_per_user)
    assert undercut(frontier, 1e9)[0].tokens_per_s_per_user == max(q.tokens_per_s_per_user for q, _ in frontier)
    assert undercut(frontier, min(q.usd_per_mtok for q, _ in frontier)) is None


def test_the_crossover_line_names_each_case():
    """`wse system`'s cost crossover: no GPU point cheaper; GPU points cheaper up to a rate the
    wafers exceed; cheaper at every rate the wafers serve."""
    from types import SimpleNamespace
    from wse.system.compare import crossover_line
    from wse.system.gpu_parallel import cost_frontier
    frontier = cost_frontier(load_model("llama3.1-70b"), load_gpu("h100"), context=1024)

    def line(usd, rate):
        point = SimpleNamespace(usd_per_mtok=usd, tokens_per_s_per_user=rate)
        return crossover_line(SimpleNamespace(decode=SimpleNamespace(curve=[point]), gpu_frontier=frontier))
    assert line(0.1, 1000.0).endswith("no GPU point is cheaper per token")
    assert "cheaper up to 69 tokens/s per user (batch 16 on 1 x TP4 h100" in line(6.39, 1144.0)
    assert line(6.39, 1144.0).endswith("above it the wafers are cheaper")
    assert line(6.39, 50.0).endswith("so at every rate the wafers serve")
