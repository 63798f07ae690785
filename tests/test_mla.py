"""Multi-head latent attention (weight-absorbed decode mapping, workload/mla.py).

The cut over the region must cover every dimension exactly once, a MLA layer must match the
reference stepper and its analytic FLOPs, the composed step must equal the full simulation,
and DeepSeek-V3's and Kimi K2's layers must size as their specs say. Prefill (the latent form
with keys and values materialized) must cover every projection.
"""
import math

import pytest
from click.testing import CliRunner

from checked import composed_equals_full, run
from engine_compare import assert_same
from wse import hardware
from wse.cli import cli
from wse.engine import reference
from wse.errors import WseError
from wse.system.config import load_system
from wse.workload.decode import plan_model
from wse.workload.layer import decode_layer, layer_flops, layer_weight_bytes
from wse.workload.layer_sizes import plan_layer
from wse.workload.params import DecodeParams
from wse.workload.region import Lanes
from wse.workload.mesh import MeshBuilder, Region
from wse.workload.mla import cache_dims, mla_split, most_mla_rows, pe_moves, q_dims
from wse.workload.models import load_model
from wse.workload.plan import FitError


@pytest.mark.parametrize("name", ["deepseek-v3", "kimi-k2", "tiny-mla"])
@pytest.mark.parametrize("P", [1, 5, 37, 200])
def test_the_cut_covers_every_dimension_once(name, P):
    spec = load_model(name)
    m = spec.mla
    width, qk = m.kv_lora_rank + m.qk_rope_head_dim, m.qk_nope_head_dim + m.qk_rope_head_dim
    P = min(P, most_mla_rows(spec))  # at most one latent dim or rotary pair per row
    s = mla_split(spec, P)
    assert sum(s.c_r) == width and sum(s.v_r) == m.kv_lora_rank and sum(s.r_r) == m.qk_rope_head_dim
    assert sum(s.qa_r) == m.q_lora_rank and sum(s.qn_r) == spec.q_size and min(s.c_r) > 0
    assert sum(s.nope_n) == spec.heads * m.qk_nope_head_dim
    assert sum(n for runs in s.oh_runs for _, _, n in runs) == sum(s.oh_r) == spec.attn_out_size
    assert sorted(d for i in range(P) for d in q_dims(spec, s, i)) == list(range(spec.q_size))
    assert sorted(d for j in range(P) for d in cache_dims(spec, s, j)) == list(range(width))
    # whole rotary pairs on a row and in a column's head piece
    assert all(r % 2 == 0 for r in s.r_r) and all(p > 0 for runs in s.pe_runs for _, a, b, _ in runs for p in [b - a])
    # every q_pe element moves into the absorbed query exactly once, to the cache dim of its own rope index
    moved = {}
    for i in range(P):
        qd = q_dims(spec, s, i)
        for j in range(P):
            cd = cache_dims(spec, s, j)
            for h, off, n, pos in pe_moves(s.pe_runs[i], s.rope_lo[j], s.r_r[j], s.v_r[j]):
                for t in range(n):
                    dim = cd[off + t] - m.kv_lora_rank  # the rope dim of the row's cache position
                    assert qd[pos + t] == h * qk + m.qk_nope_head_dim + dim
                    assert (h, dim) not in moved
                    moved[h, dim] = (i, pos + t)
    assert len(moved) == spec.heads * m.qk_rope_head_dim


@pytest.mark.parametrize("name, Q, groups", [("tiny-mla", 8, 2), ("tiny-mla", 7, 3), ("deepseek-v3", 195, 3),
                                              ("kimi-k2", 130, 2)])
def test_row_groups_each_hold_every_latent_dim(name, Q, groups):
    """--mla-groups: every group's rows cover the cache's dims once (its own tokens' whole
    latent), q_a is cut over all rows once, and each row's latent dims start where its group's
    rows before it end."""
    spec = load_model(name)
    width = spec.kv_cache_width
    s = mla_split(spec, Q // 2, Q, groups)
    assert s.groups == groups and sum(s.qa_r) == spec.mla.q_lora_rank
    assert sum(s.c_r) == groups * width and sum(s.v_r) == groups * spec.mla.kv_lora_rank
    for g in range(groups):
        rows = [j for j in range(Q) if s.group_r[j] == g]
        assert rows == list(range(rows[0], rows[-1] + 1)) and all(s.lead_r[j] == rows[0] for j in rows)
        assert sorted(d for j in rows for d in cache_dims(spec, s, j)) == list(range(width))
    with pytest.raises(WseError, match="--mla-groups 9"):
        mla_split(spec, 4, 8, 9)


def test_row_groups_are_validated(small):
    spec = load_model("tiny-mla")
    with pytest.raises(WseError, match="--mla-groups 0"):
        DecodeParams(mla_groups=0)
    with pytest.raises(WseError, match="needs --attention flash"):
        plan_layer(spec, 1, 4, small, DecodeParams(mla_groups=2, attention="classic"))
    r = CliRunner().invoke(cli, ["run", "--model", "tiny-mla", "--wafer", "small", "--layers", "1", "--region", "4x8",
                                 "--mla-groups", "9", "-o", "x.h5"])
    assert r.exit_code == 2 and r.output.startswith("error:") and "--mla-groups 9" in r.output, r.output


def test_kv_cache_width_is_the_latent_plus_the_rope_key():
    assert load_model("deepseek-v3").kv_cache_width == 576
    assert load_model("llama3.1-8b").kv_cache_width == 2 * 8 * 128


@pytest.mark.parametrize("groups, context", [(1, 6), (2, 9), (4, 17)])
def test_a_latent_attention_layer_matches_the_reference_stepper(small, groups, context):
    """(--mla-groups: groups of two and of one row, a later group with fewer tokens than the first;
    the closed-form FLOPs count the groups' repeated latent, absorbed query and output and their merge.)"""
    spec = load_model("tiny-mla")
    roomy = small.with_overrides(["sram.sram_bytes=131072"])  # a whole layer on 4 x 4 PEs
    parts = ("norm1", "qkv", "attention", "o", "handoff")
    plan = plan_layer(spec, 1, 4, roomy, DecodeParams(batch=2, context=context, mla_groups=groups))
    b = MeshBuilder(4, 4, 4)
    build = decode_layer(plan, Region(0, 0, 4, 4), b, Lanes(None, {}, None, {}), parts)
    trace = b.build()
    fast = run(trace, roomy)
    assert_same(fast, reference.simulate(trace, roomy), "mla layer")
    assert int(fast.pe("flops").sum()) == sum(build.flops.values()) == sum(layer_flops(plan, parts)[0].values())


@pytest.mark.parametrize("kw", [dict(batch=1, context=16), dict(batch=2, context=30),
                                dict(batch=2, context=16, moe_mapping="regions", experts_per_region=2),
                                dict(batch=2, context=40, moe_mapping="regions", experts_per_region=2, mla_groups=2)])
def test_composed_step_equals_the_full_simulation(kw, small):
    spec = load_model("tiny-mla")
    plan = plan_model(spec, small, DecodeParams(**kw))
    builds = composed_equals_full(plan, small)
    assert sum(b.kv_bytes for b in builds if b.kind == "layer") == \
        spec.layers * spec.kv_cache_width * plan.params.context * plan.params.batch * 2


def test_row_groups_compose_counter_for_counter_on_a_128_mesh():
    """Latent attention in three row groups on 32 x 32 slots of a 128 x 128 mesh, with expert
    regions over several bands: each group's columns hold 4-5 tokens in blocks of 2 (several
    blocks, a short last one, a later group with fewer tokens), composed exactly."""
    cfg = hardware.resolve("small", None, ["wafer.mesh_width=128", "wafer.mesh_height=128"])
    params = DecodeParams(batch=2, context=400, moe_mapping="regions", experts_per_region=1, mla_groups=3,
                          attention_block=2)
    plan = plan_model(load_model("tiny-mla"), cfg, params)
    lp = plan_layer(plan.spec, 1, plan.P, cfg, params, Q=plan.Q, routed=False)
    assert (plan.P, plan.Q) == (32, 32) and lp.mla.groups == 3 and max(map(max, lp.T_g)) > min(map(min, lp.T_g)) > 2
    assert [s.kind for s in plan.slots].count("experts") == 8
    composed_equals_full(plan, cfg)


def test_deepseek_layers_size_as_the_spec_says():
    spec, cfg = load_model("deepseek-v3"), hardware.load_preset("wse3")
    params = DecodeParams(context=1024, weights="bf16")
    dense = plan_layer(spec, 0, 300, cfg, params)
    assert layer_weight_bytes(dense) == 2 * spec.layer_params(0)
    moe = plan_layer(spec, 3, 300, cfg, params, routed=False)  # routed experts in expert regions
    assert layer_weight_bytes(moe) == 2 * (spec.layer_params(3) - spec.moe.experts * spec.expert_params())
    fp8 = DecodeParams(context=1024)  # the published checkpoint: linear weights in 8 bits, the rest 16
    assert layer_weight_bytes(plan_layer(spec, 0, 300, cfg, fp8)) == spec.layer_bytes(0, 1.0, 1.0)
    assert layer_weight_bytes(plan_layer(spec, 3, 300, cfg, fp8, routed=False)) == spec.layer_bytes(3, 1.0, 1.0,
                                                                                                     routed=False)
    with pytest.raises(FitError, match="at most 544 rows"):  # 512 latent dims and 32 rotary pairs
        plan_layer(spec, 0, 545, cfg, params)


def test_prefill_gemms_cover_every_latent_projection(small):
    """Prefill materializes keys and values from the latent: its GEMMs' FLOPs are 2 per weight
    of every attention projection (norm vectors aside) and of the k routed plus shared
    experts, per token, plus the S^2 attention terms."""
    from wse.workload.prefill import ffn_width, kernel_traces
    spec = load_model("tiny-mla")
    m, H, S = spec.mla, spec.hidden_size, 16
    kernels = kernel_traces(spec, small, 8, S)
    assert {"q_kv_a", "q_b", "kv_b", "scores", "values", "o", "gate_up", "down", "elementwise"} == set(kernels)
    attention = spec.attention_params() - m.q_lora_rank - m.kv_lora_rank
    ffn = (spec.moe.experts_per_token + spec.moe.shared_experts) * spec.expert_params()
    assert 3 * H * ffn_width(spec) == ffn
    expect = 2 * S * (attention + ffn) + 2 * S * S * (spec.q_size + spec.attn_out_size)
    assert sum(f["model_flops"] for name, (_, f) in kernels.items() if name != "elementwise") == expect


def test_a_latent_attention_model_has_a_time_to_first_token(small):
    from wse.system.compare import run_system
    system = load_system("cs3", ['system.wafer="small"', "system.wafers=1"])
    job = run_system("tiny-mla", system, lambda t: run(t, small), wafers=1, context=16, prompt=32,
                     moe_mapping="local", slot_shape="square")
    assert math.isfinite(job.ttft_s) and job.ttft_s > 0


def _small_system():
    return load_system("cs3", ['system.wafer="small"', "system.wafers=1"])


def test_auto_row_groups_take_the_fewest_simulated_cycles(small):
    """--mla-groups auto: every G tried is the representative layer region alone on the plan
    that G gets, simulated exactly (a fresh build and run give the same cycles); the choice is
    the fewest, and the search stopped where it says (slower than the G before, or the next G
    does not place)."""
    from wse.system.mla_groups import choose_groups, layer_region_trace
    from wse.system.wafers import wafer_plans
    spec, system = load_model("tiny-mla"), _small_system()
    params = DecodeParams(context=4096, moe_mapping="local", slot_shape="square")
    choice = choose_groups(spec, system, params, 1, lambda t: run(t, small))
    assert choice.groups == min(choice.cycles, key=lambda g: (choice.cycles[g], g))
    assert len(choice.cycles) > 2 and choice.groups > 1  # (at 4k tokens more groups gain here)
    assert list(choice.cycles) == list(range(1, len(choice.cycles) + 1)) and choice.layer == 1
    for G, cycles in choice.cycles.items():
        plans = wafer_plans(spec, system, DecodeParams(context=4096, moe_mapping="local", slot_shape="square",
                                                       mla_groups=G), 1)
        trace, layer = layer_region_trace(plans[0])
        assert layer == 1 and run(trace, small).total_cycles == cycles
    last = max(choice.cycles)
    if last == 1 or choice.cycles[last] < choice.cycles[last - 1]:
        with pytest.raises(WseError):
            layer_region_trace(wafer_plans(spec, system, DecodeParams(
                context=4096, moe_mapping="local", slot_shape="square", mla_groups=last + 1), 1)[0])


@pytest.mark.parametrize("cycles, fits, chosen, tried", [
    ([100, 90, 95, 80], 9, 2, 3),   # stops at the first G slower than the one before
    ([100, 100, 90], 9, 1, 2),      # a tie is no gain: the fewer groups
    ([100, 90, 80], 2, 2, 2),       # G = 3 does not place
    ([100], 1, 1, 0),               # G = 2 does not place: nothing to simulate
])
def test_auto_row_groups_search(monkeypatch, cycles, fits, chosen, tried):
    import types
    from wse.system import mla_groups as M
    real = M.wafer_plans

    def plans(spec, system, params, n):
        if params.mla_groups > fits:
            raise WseError("does not fit")
        return real(spec, system, params, n)
    monkeypatch.setattr(M, "wafer_plans", plans)
    calls = []

    def simulate(trace):
        calls.append(trace)
        return types.SimpleNamespace(complete=True, total_cycles=cycles[len(calls) - 1])
    choice = M.choose_groups(load_model("tiny-mla"), _small_system(),
                             DecodeParams(context=64, moe_mapping="local", slot_shape="square"), 1, simulate)
    assert (choice.groups, len(calls), list(choice.cycles.values())) == (chosen, tried, cycles[:tried])
    said = choice.describe()
    assert f"in {chosen} row group" in said and ("do not place" in said if not tried else "at G = 1 /" in said)
    assert M.choose_groups(load_model("tiny"), _small_system(), DecodeParams(context=64), 1, simulate).groups == 1
    assert len(calls) == tried  # a model without latent attention simulates nothing


def test_system_reports_the_auto_choice(tmp_path):
    import h5py
    out = tmp_path / "auto.h5"
    r = CliRunner().invoke(cli, ["system", "--model", "tiny-mla", "--system", "cs3", "--set", 'system.wafer="small"',
                                 "--wafers", "1", "--prompt-len", "0", "--context", "512", "--moe-mapping", "local",
                                 "--slot-shape", "square", "--mla-groups", "auto", "--jobs", "1", "--no-cache",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    line = next(s for s in r.output.splitlines() if "--mla-groups auto" in s)
    with h5py.File(out) as f:
        assert f"latent attention in {int(f['summary/mla_groups'][()])} row group" in line
    for bad, said in (("x", "expected a number or 'auto'"), ("0", "must be at least 1")):
        r = CliRunner().invoke(cli, ["system", "--model", "tiny-mla", "--system", "cs3", "--mla-groups", bad,
                                     "-o", str(tmp_path / "bad.h5")])
        assert r.exit_code == 2 and r.output.startswith("error:") and said in r.output, r.output
        assert not (tmp_path / "bad.h5").exists()
