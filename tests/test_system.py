"""Multi-wafer systems (docs/system.md): exact layer splits, link byte conservation, the pipeline
formulas, energy and $/Mtok from the documented inputs, and the `wse system` command."""
import dataclasses
import math

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from wse import hardware
from wse.cli import cli
from wse.engine.run import simulate
from wse.errors import WseError
from wse.system.config import load_system
from checked import run, standin_work
from wse.system.link import Link, Network
from wse.system.pool import Fanout
from wse.system.packing import filled_shares
from wse.system.progress import Progress
from wse.workload.chain import chain_of
from wse.system.wafers import (Timeline, _critical_path, balanced, fewest_wafers, pipeline_point, run_decode,
                               split_layers, wafer_plans)
from wse.workload.compose import compose
from wse.workload.stages import full_trace
from wse.workload.decode import kv_bytes, plan_model
from wse.workload.plan import usable_sram
from wse.workload.ffn import moe_experts
from wse.workload.params import DecodeParams
from wse.workload.models import load_model

PARAMS = DecodeParams(batch=2, context=12)


@pytest.fixture(scope="module")
def small_system():
    return load_system("cs3", ['system.wafer="small"', "system.wafers=2"])


def sim(small):
    return lambda t: simulate(t, small, validated=True)


def test_layer_groups_are_consecutive_and_balanced_by_bytes():
    for n, w in ((32, 1), (32, 3), (80, 6), (7, 7)):
        runs = balanced([5] * n, w)
        assert runs[0][0] == 0 and runs[-1][1] == n and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        assert max(b - a for a, b in runs) - min(b - a for a, b in runs) <= 1
    with pytest.raises(WseError):
        balanced([1, 1], 3)
    assert balanced([10, 1, 1, 1, 1, 10], 3) == [(0, 1), (1, 5), (5, 6)]
    # the embedding weighs on the first wafer: llama3.1-405b's first group is the smallest
    spec, params = load_model("llama3.1-405b"), DecodeParams(context=1024)
    groups = split_layers(spec, params, 32)
    assert groups[0].start == 0 and groups[-1].stop == spec.layers
    assert all(a.stop == b.start for a, b in zip(groups, groups[1:]))
    assert len(groups[0]) < len(groups[1]) and len(groups[-1]) < len(groups[1])


@pytest.mark.parametrize("model", ["tiny", "tiny-moe"])
def test_a_model_on_two_wafers_splits_exactly(model, small_system):
    """Each wafer's composed step equals its full trace, cycles and counters alike, and the two
    wafers together do exactly the single wafer's work."""
    small = small_system.wafer_config
    spec = load_model(model)
    one = plan_model(spec, small, PARAMS, P=16)
    whole = simulate(full_trace(one)[0], small)
    flops = 0
    for w, (first, n, embed, head) in enumerate(((0, 1, True, False), (1, 1, False, True))):
        plan = plan_model(spec, small, PARAMS, n, 16, first, embed, head)
        assert [s.kind for s in plan.slots] == (["embedding", "layer"] if w == 0 else ["layer", "lm_head"])
        assert [s.index for s in plan.slots if s.kind == "layer"] == [first]
        full = simulate(full_trace(plan)[0], small)
        d = compose(plan, sim(small))
        assert d.total_cycles == full.total_cycles
        for counter in ("flops", "sram_read_bytes", "sram_write_bytes", "ops_completed"):
            assert d.total(counter) == full.pe(counter).sum(), counter
        assert d.link_total("wavelets") == full.link("wavelets").sum()
        flops += d.total("flops")
    # the layers and the tables do the same FLOPs split or not
    assert flops == whole.pe("flops").sum()


def test_a_wafer_holding_one_layer_runs_it_alone(small_system):
    small = small_system.wafer_config
    plan = plan_model(load_model("tiny"), small, PARAMS, 1, 16, 1, False, False)
    assert [s.kind for s in plan.slots] == ["layer"]
    d = compose(plan, sim(small))
    assert d.total_cycles == simulate(full_trace(plan)[0], small).total_cycles and d.simulations == 1


def test_links_conserve_bytes_and_take_turns():
    link = Link(100e9, 1e-6)
    net = Network("chain", 4, link)
    sizes = [(0, 1, 4096), (1, 2, 4096), (2, 3, 4096), (0, 1, 123)]
    t = [net.transfer(a, b, n) for a, b, n in sizes]
    assert t[0] == pytest.approx(1e-6 + 4096 / 100e9)
    assert t[3] == pytest.approx(4096 / 100e9 + 1e-6 + 123 / 100e9)  # waits for the link 0 -> 1
    assert sum(net.sent) == sum(net.received) == sum(n for *_, n in sizes)
    assert net.sent == [4219, 4096, 4096, 0] and net.transfers == [2, 1, 1, 0]
    with pytest.raises(WseError, match="neighbouring"):
        net.transfer(1, 3, 8)
    sw = Network("switch", 4, link, links=2)  # two links striped: 200 GB/s per transfer
    a, b = sw.transfer(0, 2, 1000), sw.transfer(0, 3, 1000)  # both leave through 0's links
    assert a == pytest.approx(1e-6 + 1000 / 200e9) and b == pytest.approx(1e-6 + 2000 / 200e9)
    c = sw.transfer(1, 3, 1000)  # 3's links are busy with the transfer from 0
    assert c == pytest.approx(1e-6 + 3000 / 200e9)
    assert sw.busy[("up", 0)] == pytest.approx(2000 / 200e9)
    with pytest.raises(WseError, match="system.topology 'ring'"):
        Network("ring", 2, link)


def test_system_decode_puts_the_chain_together(small_system):
    spec = load_model("tiny")
    small = small_system.wafer_config
    r = run_decode(spec, small_system, PARAMS, 2, sim(small))
    act = PARAMS.batch * spec.hidden_size * 2
    assert r.link_bytes == [act] and sum(r.ledger.received) == act
    link = Link(small_system.link_bytes_per_s, small_system.link_latency_s)
    assert r.latency_s == pytest.approx(sum(s.cycles for s in r.steps) / small.clock_hz + link.seconds(act))
    # each wafer's regions add up to its step; the stages bound the pipeline
    for s in r.steps:
        assert sum(s.region_cycles) == s.cycles
    assert r.bottleneck_s == pytest.approx(max(max(s.region_cycles) for s in r.steps) / small.clock_hz)
    # the curve follows the pipeline formula
    for p in r.curve:
        period = max(r.latency_s, p.in_flight * r.bottleneck_s)
        assert p.period_s == pytest.approx(period)
        assert p.tokens_per_s == pytest.approx(p.in_flight * PARAMS.batch / period)
    assert r.curve[0].tokens_per_s_per_user >= r.curve[-1].tokens_per_s_per_user
    # counters: each wafer's FLOPs are its regions' analytic FLOPs (they depend on the slot
    # shape, which each wafer chooses), and with square slots of one size the wafers together
    # do exactly the single wafer's work
    for s, plan in zip(r.steps, wafer_plans(spec, small_system, PARAMS, 2)):
        assert s.flops == sum(sum(b.flops.values()) for b in full_trace(plan)[1])
    square = dataclasses.replace(PARAMS, slot_shape="square")
    single = run_decode(spec, small_system, square, 1, sim(small))
    two = run_decode(spec, small_system, square, 2, sim(small))
    assert {s.slot for s in two.steps} == {single.steps[0].slot}
    assert sum(s.flops for s in two.steps) == sum(s.flops for s in single.steps)
    assert single.link_bytes == [] and single.steps[0].embed and single.steps[0].head


def test_pipeline_depth_is_the_kv_room_or_the_full_pipeline(small_system):
    from wse.system.wafers import pipeline_depth
    from wse.workload.decode import layer_plan
    spec = load_model("tiny")
    small = small_system.wafer_config
    long = DecodeParams(batch=2, context=900)
    lp = layer_plan(wafer_plans(spec, small_system, long, 2)[0], 0)
    # one micro-batch's KV data per PE: its column's tokens (and one arriving) x its row's K and
    # V dimensions; the PEs' shares cover the layer's whole cache
    assert lp.kv_bytes_per_pe == (max(lp.T_c) + 1) * 2 * max(lp.k_r) * long.batch * 2
    assert lp.kv_bytes_per_pe * lp.P * lp.Q >= spec.kv_cache_width * long.context * long.batch * 2
    r = run_decode(spec, small_system, PARAMS, 2, sim(small))
    room = 1 + min(s.extra_in_flight for s in r.steps)
    full = math.ceil(r.latency_s / r.bottleneck_s - 1e-9)
    assert room > full and r.max_in_flight == full == r.curve[-1].in_flight and "pipeline is full" in r.depth_bound
    assert r.curve[-1].tokens_per_s == max(p.tokens_per_s for p in r.curve)
    stages = [(2e-6, "layer region"), (5e-6, "idle expert region"), (1e-6, "link")]
    assert pipeline_depth(stages, 21e-6, 9, 1e9) == (5, "the pipeline is full (period = latency; longest stage: "
                                                      "idle expert region, 5,000 cycles); KV caches fit 9")
    assert pipeline_depth(stages, 21e-6, 3, 1e9)[0] == 3  # fewer KV caches fit than would fill it


def test_energy_and_cost_follow_from_the_documented_inputs(small_system):
    spec = load_model("tiny")
    sysc = load_system("cs3", ['system.wafer="small"', "system.wafers=2", "cost.usd_per_system_hour=36.0",
                               "cost.utilization=0.5"])
    r = run_decode(spec, sysc, PARAMS, 2, sim(sysc.wafer_config))
    dyn = (sum(s.flops for s in r.steps) / 2 * 0.6 + sum(s.sram_bytes for s in r.steps) * 0.15
           + sum(s.wavelet_hops for s in r.steps) * 2.0 + sum(r.link_bytes) * 20.0) * 1e-12
    assert r.dynamic_j_per_step == pytest.approx(dyn)
    for m in (1, r.max_in_flight):
        p = pipeline_point(r, sysc, m)
        tokens = m * PARAMS.batch
        # the rated draw of both systems (5 kW static + 18 kW overhead), over the utilization
        # like the GPU side's
        assert p.j_per_token == pytest.approx(dyn / PARAMS.batch + 2 * (5000 + 18000) * p.period_s / tokens / 0.5)
        assert p.usd_per_mtok == pytest.approx(2 * 36.0 / 3600 / (tokens / p.period_s * 0.5) * 1e6)


def test_fewest_wafers_hold_weights_and_kv_cache(small_system):
    spec = dataclasses.replace(load_model("tiny"), layers=6)
    assert fewest_wafers(spec, small_system, PARAMS) == 1
    # a long context's KV cache no longer fits in one wafer's layer slots: the fewest that hold it
    long = DecodeParams(batch=8, context=8192)
    w = fewest_wafers(spec, small_system, long)
    assert w >= 2 and w * usable_sram(small_system.wafer_config) * 64 * 64 >= kv_bytes(spec, long, 0, spec.layers)
    plans = wafer_plans(spec, small_system, long, w)
    assert plans[0].embed and not plans[0].head and plans[-1].head
    with pytest.raises(WseError):
        wafer_plans(spec, small_system, long, w - 1)


def test_system_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "s.toml"
    bad.write_text('base = "cs3"\n[system]\nwafers = 0\n')
    with pytest.raises(WseError, match="system.wafers"):
        load_system(str(bad))
    bad.write_text('base = "cs3"\n[energy]\npj_per_flop = 1.0\n')
    with pytest.raises(WseError, match="energy.pj_per_flop"):
        load_system(str(bad))
    with pytest.raises(WseError, match="unknown system preset"):
        load_system("cs9")
    with pytest.raises(WseError, match="system.wafer"):
        load_system("cs3", ['system.wafer="wse9"'])


def test_system_command_writes_the_table_and_plots(tmp_path):
    cfg = tmp_path / "sys.toml"
    cfg.write_text('base = "cs3"\n[system]\nname = "chain"\nwafer = "small"\nwafers = 2\n')
    out = tmp_path / "sys.h5"
    runner = CliRunner()
    # 16 x 16 wafers: 8 x 16 slots (not 32 x 64), the prompt as long as their short side as 32 is on
    # small's: the same stages and prefill kernels (weight-stationary GEMMs, whole SUMMA attention)
    r = runner.invoke(cli, ["system", "--model", "tiny", "--system", str(cfg), "--batch", "2", "--context", "12",
                            "--set", "wafer.mesh_width=16", "--set", "wafer.mesh_height=16",
                            "--prompt-len", "8", "--gpu", "h200", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "tokens/s per user" in r.output and "J/token" in r.output and "$/Mtok" in r.output
    with h5py.File(out) as f:
        assert f.attrs["complete"]
        metrics = [m.decode() if isinstance(m, bytes) else m for m in f["system/metric"][()]]
        assert "TTFT" in metrics and f["wafers/cycles"].shape == (2,)
        # the cheapest GPU parallelism for a tiny model is one GPU (gpu_parallel.best_decode)
        assert f["summary/wafers"][()] == 2 and f["summary/gpus"][()] == 1
        assert math.isfinite(f["summary/ttft_s"][()]) and f["summary/energy_per_token_j"][()] > 0
        assert len(f["curve_wafer/tokens_per_s"]) >= 1 and len(f["curve_gpu/batch"]) >= 1
        # on fixed GPU nodes the most aggregate is also the least $ and J per token
        usd, j = f["curve_gpu/usd_per_mtok"][()], f["curve_gpu/j_per_token"][()]
        best = int(np.argmax(f["curve_gpu/tokens_per_s"][()]))
        assert usd[best] == usd.min() and j[best] == j.min()
        # both sides at their cheapest point: the wafers' deepest pipeline, the GPUs' cheapest
        # batch and parallelism, which no fixed-node point undercuts
        low = f["curve_gpu_cheapest/usd_per_mtok"][()]
        k = int(np.argmin(low))
        assert f["summary/gpu_cost_per_mtok_cheapest_usd"][()] == low[k] <= usd.min()
        assert f["summary/gpu_cheapest_batch"][()] == f["curve_gpu_cheapest/batch"][k]
        assert f["summary/gpu_energy_per_token_cheapest_j"][()] == f["curve_gpu_cheapest/j_per_token"][k]
        assert f["summary/cost_per_mtok_full_usd"][()] == f["curve_wafer/usd_per_mtok"][-1] \
            == f["curve_wafer/usd_per_mtok"][()].min()
        assert f["summary/energy_per_token_full_j"][()] == f["curve_wafer/j_per_token"][-1]
        # the crossover: the fastest GPU point cheaper than the wafers' cheapest (0: none is)
        rates = f["curve_gpu_cheapest/tokens_per_s_per_user"][()]
        cheaper = rates[low < f["summary/cost_per_mtok_full_usd"][()]]
        assert f["summary/crossover_tokens_per_s_per_user"][()] == (cheaper.max() if len(cheaper) else 0.0)
    assert "cost crossover: the wafers' cheapest point" in r.output
    p = runner.invoke(cli, ["plot", str(out), "-o", str(tmp_path / "plots")])
    assert p.exit_code == 0
    assert all((tmp_path / "plots" / name).exists() for name in ("throughput-latency.png", "cost-latency.png"))
    rep = runner.invoke(cli, ["report", str(out)])
    assert rep.exit_code == 0 and "energy_per_token_j" in rep.output
    for shown in ("tokens/s per user", "J/token", "$/Mtok", "wafer 1:", "pipeline depth:", "layer region: ",
                  "cost crossover:", "cheapest point"):
        assert shown in rep.output


@pytest.mark.slow  # 46 s; test_worker_processes_give_the_same_step covers the worker path, the serial prefill many tests
def test_prefill_kernels_in_worker_processes_give_the_same_ttft(small_system):
    from wse.system.ttft import prefill_seconds
    spec = load_model("tiny-moe")
    small = small_system.wafer_config
    plans = wafer_plans(spec, small_system, PARAMS, 2)
    assert prefill_seconds(spec, small_system, plans, 32, sim(small)) == \
        prefill_seconds(spec, small_system, plans, 32, sim(small), Fanout(jobs=2))


def test_system_command_with_expert_regions_over_wafers(tmp_path):
    out = tmp_path / "moe.h5"
    r = CliRunner().invoke(cli, ["system", "--model", "tiny-moe", "--system", "cs3x4", "--set", 'system.wafer="small"',
                                 "--wafers", "3", "--moe-mapping", "regions", "--experts-per-region", "2",
                                 "--slot-shape", "square", "--context", "16", "--prompt-len", "0", "--jobs", "2",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "expert region" in r.output
    assert "idle expert region" in r.output and "expert region running 1" in r.output
    with h5py.File(out) as f:
        assert f["wafers/expert_regions"][()].sum() >= 4
        assert (f["wafers/slot_columns"][()] == f["wafers/slot_rows"][()]).all()  # square slots
        reg = {k: f["regions"][k][()] for k in f["regions"]}
        kinds = [k.decode() if isinstance(k, bytes) else k for k in reg["kind"]]
        wafer_cycles = f["wafers/cycles"][()]
    # the regions table: every region of every wafer, hold times adding up to each wafer's step
    spec = load_model("tiny-moe")
    for w, cycles in enumerate(wafer_cycles):
        rows = reg["wafer"] == w
        assert list(reg["position"][rows]) == list(range(rows.sum()))
        assert reg["cycles"][rows].sum() == cycles
    experts = [i for i, k in enumerate(kinds) if k == "experts"]
    # every routed expert lives in exactly one region of at most 2 (cut where a wafer ends)
    assert sum(reg["experts"]) == spec.moe.experts * spec.layers and (reg["experts"][experts] <= 2).all()
    for i in experts:  # batch 1, uniform choice: layer L runs experts L .. L+k-1 (mod E)
        chosen = moe_experts(spec, int(reg["layer"][i]), 1)
        e0, n = int(reg["first_expert"][i]), int(reg["experts"][i])
        assert reg["experts_run"][i] == sum(e0 <= e < e0 + n for e in chosen if e < spec.moe.experts)
    assert sum(reg["experts_run"][experts]) == spec.moe.experts_per_token * spec.layers


@pytest.mark.parametrize("args, msg", [
    (["--wafers", "x"], "--wafers"), (["--wafers", "0"], "--wafers"), (["--batch", "0"], "--batch"),
    (["--system", "nope"], "unknown system preset"), (["--set", "cost.utilization=2"], "cost.utilization"),
    (["--wafers", "1", "--moe-mapping", "regions"], "has no MoE layer"),
    (["--experts-per-region", "-1"], "--experts-per-region"), (["--jobs", "-1"], "--jobs"), (["--wafers", "3"], "3 wafers for 2 layers of tiny"),
])
def test_system_command_bad_input_is_one_clear_error(args, msg, tmp_path):
    r = CliRunner().invoke(cli, ["system", "--model", "tiny", *args, "-o", str(tmp_path / "x.h5")])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.h5").exists()


def test_a_model_too_big_names_the_wafer():
    spec = load_model("llama3.1-70b")
    sysc = load_system("cs3")
    with pytest.raises(WseError, match="wafer 0 of 2"):
        wafer_plans(spec, sysc, DecodeParams(context=1024), 2)


def test_hardware_presets_list_only_wafers():
    assert "cs3" not in hardware.preset_names() and "h100" not in hardware.preset_names()


def test_expert_choice_is_uniform_by_default_and_skew_concentrates_it():
    from wse.workload.ffn import moe_experts
    spec = load_model("mixtral-8x7b")
    k = spec.moe.experts_per_token
    uniform = moe_experts(spec, 3, 4096)
    assert sum(uniform.values()) == 4096 * k and set(uniform) == set(range(spec.moe.experts))
    mean = 4096 * k / spec.moe.experts  # each expert near its share (binomial, 6 sigma)
    assert all(abs(n - mean) < 6 * (mean * (1 - 1 / spec.moe.experts)) ** 0.5 for n in uniform.values())
    assert moe_experts(spec, 3, 4096, 0.0) == uniform and moe_experts(spec, 4, 4096) != uniform
    one = moe_experts(spec, 3, 1)
    assert len(one) == k and all(n == 1 for n in one.values())  # distinct experts per sequence
    skewed = moe_experts(spec, 3, 64, 2.0)
    assert sum(skewed.values()) == 64 * k and skewed == moe_experts(spec, 3, 64, 2.0)  # reproducible
    assert max(skewed.values()) > 64 * k // spec.moe.experts  # a hot expert
    mild = moe_experts(spec, 3, 64, 0.5)
    assert max(skewed.values()) >= max(mild.values())
    with pytest.raises(WseError):
        moe_experts(spec, 3, 4, -1.0)
    import warnings
    with warnings.catch_warnings():  # a skew too large for floats: every sequence takes the k hottest
        warnings.simplefilter("error")
        extreme = moe_experts(spec, 3, 8, 1e6)
    assert len(extreme) == k and set(extreme.values()) == {8}
    assert set(extreme) == set(sorted(moe_experts(spec, 3, 4096, 50.0), key=lambda e: -moe_experts(
        spec, 3, 4096, 50.0)[e])[:k])


def test_skewed_moe_decode_composes_exactly(small_system):
    small = small_system.wafer_config
    params = DecodeParams(batch=4, context=12, expert_skew=1.5)
    plan = plan_model(load_model("tiny-moe"), small, params, P=16)
    full = simulate(full_trace(plan)[0], small)
    d = compose(plan, sim(small))
    assert d.total_cycles == full.total_cycles and d.total("flops") == full.pe("flops").sum()


def test_wafers_share_their_identical_stage_simulations(small_system):
    spec = load_model("tiny-moe")
    small = small_system.wafer_config
    params = DecodeParams(batch=2, context=16, moe_mapping="regions", experts_per_region=1)
    calls = []
    d = run_decode(spec, small_system, params, 4, lambda t: calls.append(t) or simulate(t, small, validated=True))
    plans = wafer_plans(spec, small_system, params, 4)
    net = Network(small_system.topology, 4, Link(small_system.link_bytes_per_s, small_system.link_latency_s),
                  small_system.links_per_wafer)
    line, alone, times = Timeline(spec, params, net, small.clock_hz), [], []
    for w, p in enumerate(plans):  # each wafer with its own stage simulations, on one timeline
        alone.append(compose(p, sim(small), delta=line.delta() if chain_of(p).leading else None))
        times.append(line.add(w, alone[-1]))
    assert any(chain_of(p).leading for p in plans)  # a wafer continues a layer: its delta matters
    spans, holds = _critical_path(plans, alone, times, small.clock_hz, small_system)
    assert [s.cycles for s in d.steps] == [round((t1 - t0) * small.clock_hz) for t0, t1 in spans]
    assert [s.region_cycles for s in d.steps] == holds
    assert [s.flops for s in d.steps] == [a.total("flops") for a in alone]
    assert len(calls) == d.simulations < sum(a.simulations for a in alone)


def test_worker_processes_give_the_same_step():
    # 16 x 16 wafers: the 4-wafer layout of small's (embedding + layer, four expert regions, layer +
    # experts, experts + LM head; two wafers continuing a layer) on slots a quarter the side
    system = load_system("cs3", ['system.wafer="small"', "wafer.mesh_width=16", "wafer.mesh_height=16"])
    spec = load_model("tiny-moe")
    cfg = system.wafer_config
    params = DecodeParams(batch=2, context=16, moe_mapping="regions", experts_per_region=1)
    assert sum(bool(chain_of(p).leading) for p in wafer_plans(spec, system, params, 4)) == 2
    one = run_decode(spec, system, params, 4, sim(cfg))

    def not_here(t):
        raise AssertionError("with jobs > 1 the workers simulate")

    progress = Progress(False)
    with Fanout(jobs=2, progress=progress) as fanout:
        two = run_decode(spec, system, params, 4, not_here, fanout)
    assert [dataclasses.astuple(s) for s in two.steps] == [dataclasses.astuple(s) for s in one.steps]
    assert (two.latency_s, two.dynamic_j_per_step) == (one.latency_s, one.dynamic_j_per_step)
    assert progress.simulated == progress.listed == one.simulations and progress.cached == 0


def test_uniform_slots_put_every_wafer_on_one_shape(small_system):
    from wse.system.pool import distinct_tasks
    spec = load_model("tiny-moe")
    small = small_system.wafer_config
    kw = dict(context=16, moe_mapping="regions", experts_per_region=1)
    own = wafer_plans(spec, small_system, DecodeParams(**kw), 3)
    same = wafer_plans(spec, small_system, DecodeParams(uniform_slots=True, **kw), 3)
    assert len({(p.P, p.Q) for p in own}) > 1
    (P, Q), = {(p.P, p.Q) for p in same}
    # the byte-balanced shares place on no shape larger than the smallest wafer's best (12x64);
    # filled with whole expert regions (packing.py), the shares place on 16x64
    assert (P, Q) == (16, 64) and min(p.P * p.Q for p in own) == 12 * 64
    assert [p.units for p in same] == [(a, b) for a, b in filled_shares(spec, small, same[0].params, 3, P, Q)[0]]
    assert [p.units for p in same] != [p.units for p in own]
    assert len(distinct_tasks(same)[0]) <= len(distinct_tasks(own)[0])  # one shape: stages shared
    for plan in same:  # each wafer's composed step equals its full simulation
        full = run(full_trace(plan)[0], small)
        d = compose(plan, sim(small))
        minus, b0 = standin_work(plan, small) if chain_of(plan).leading else ({}, 0)
        if "end" in d.outputs:
            assert d.total_cycles == full.total_cycles - b0
        assert d.total("flops") == full.pe("flops").sum() - minus.get("flops", 0)
