"""Prefill on separate wafers (docs/serving.md, "Prefill on separate wafers"): the scheduler with
a prefill pool (no prefill ever holds a decode stage; a request decodes once its KV has arrived),
the KV hand-off's bytes and port contention, and a lone request against the interleaved run."""
import numpy as np
import pytest
from click.testing import CliRunner

from wse.cli import cli
from wse.serving import requests as R
from wse.serving.sim import serve_pipeline
# MINI: two 16 x 16 wafers, 8 x 16 layer slots (small's are 32 x 64), the same stages and prefill
# kernels (weight-stationary GEMMs, whole SUMMA attention), so the steps simulate in seconds
from test_serving import MINI, SMALL, FakePipeline, _copy, _stream, reqs


class FakePool:
    """A prefill pipeline of `stages` stages holding `p x tokens` each; the KV arrives `gap`
    seconds after the prompt left the last stage, `bytes_per_token` per prompt token."""

    def __init__(self, stages=3, p=1e-5, delay=1e-4, gap=5e-4, bytes_per_token=100):
        self.stages, self.p, self.dl, self.gap, self.bpt = stages, p, delay, gap, bytes_per_token
        self.resets = 0

    def reset(self):
        self.resets += 1

    def prefill_chunk(self, start, end, last):
        return np.full(self.stages, self.p * (end - start)), self.dl

    def handoff(self, prompt, departures_s, first_token_s):
        assert first_token_s == pytest.approx(float(departures_s[-1]) + self.dl)
        return first_token_s + self.gap, self.bpt * prompt


def test_a_lone_request_prefills_on_the_pool_and_decodes_once_its_kv_has_arrived():
    f, pool = FakePipeline(), FakePool()
    out = serve_pipeline(reqs([1.0], [100], [5]), f, pool=pool)
    ttft = out.first_token_s[0] - 1.0
    assert ttft == pytest.approx(pool.stages * pool.p * 100 + pool.dl)
    assert out.kv_ready_s[0] == pytest.approx(out.first_token_s[0] + pool.gap)
    pass_s = f.decode(1, 1)[0].sum() + f.dl
    assert out.finish_s[0] - out.kv_ready_s[0] == pytest.approx(4 * pass_s)
    assert out.handoff_bytes == 100 * pool.bpt and out.activity[3] == 100 * pool.bpt and pool.resets == 1
    one = serve_pipeline(reqs([1.0], [100], [1]), f, pool=pool)  # a one-token answer needs no hand-off
    assert one.handoff_bytes == 0 and np.isnan(one.kv_ready_s[0]) and one.tokens[0] == 1


def test_a_long_prefill_on_the_pool_never_holds_a_decode_stage():
    """Interleaved, request 1's 0.4 s-per-stage prefill delays request 0's next token; on separate
    prefill wafers request 0 decodes every token at the single-pass time once its KV is there."""
    f = FakePipeline(groups=2, seats=1, p=1e-3)
    r = reqs([0.0, 0.0005], [1, 400], [50, 2])
    pass_s = f.decode(1, 1)[0].sum() + f.dl
    inter = serve_pipeline(r, f)
    split = serve_pipeline(r, f, pool=FakePool(stages=4, p=1e-3))
    assert inter.finish_s[0] - inter.first_token_s[0] > 0.4
    assert split.finish_s[0] - split.kv_ready_s[0] == pytest.approx(49 * pass_s)
    # behind request 0's one-token prefill (first pool stage free at 1 ms), 4 pool stages x 0.4 s
    assert split.first_token_s[1] == pytest.approx(1e-3 + 1.6 + 1e-4)
    chunked = serve_pipeline(r, f, 25, pool=FakePool(stages=4, p=1e-3))  # chunks pipeline across the pool
    assert chunked.first_token_s[1] - 0.0005 < (16 + 3) * 0.025 + 0.01
    assert chunked.finish_s[0] - chunked.kv_ready_s[0] == pytest.approx(49 * pass_s)


@pytest.mark.parametrize("chunk", [0, 32])
def test_nothing_is_lost_with_a_prefill_pool_and_the_same_seed_gives_the_same_result(chunk):
    r = _stream(3.0, 100.0)
    kv = 8_000
    r = R.Requests(r.arrival_s, r.prompt, np.where(np.arange(len(r)) % 50 == 0, 9_000, r.output))
    a, b = (serve_pipeline(q, FakePipeline(kv=kv), chunk, FakePool()) for q in (r, _copy(r)))
    assert np.array_equal(a.finish_s, b.finish_s, equal_nan=True) and np.array_equal(a.tokens, b.tokens)
    done = ~a.rejected
    assert a.rejected.sum() == (r.prompt + r.output > kv).sum() > 0
    assert np.array_equal(a.tokens[done], r.output[done])
    assert (a.finish_s[done] >= a.first_token_s[done]).all() and (a.first_token_s[done] >= a.admitted_s[done]).all()
    later = done & (r.output > 1)
    assert (a.kv_ready_s[later] >= a.first_token_s[later]).all()
    assert a.handoff_bytes == 100 * int(r.prompt[later].sum())


def _tiny_pool(prefill_plans_wafers=1):
    from wse.serving.handoff import Pool
    from wse.serving.steps import PrefillModel
    from wse.system.config import load_system
    from wse.system.link import Link
    from wse.system.wafers import wafer_plans
    from wse.workload.models import load_model
    from wse.workload.params import DecodeParams
    system = load_system("cs3", SMALL)
    spec = load_model("tiny")
    params = DecodeParams(batch=1, context=256)
    pre, dec = wafer_plans(spec, system, params, prefill_plans_wafers), wafer_plans(spec, system, params, 2)
    stages = sum(len(p.slots) for p in pre) + len(pre) - 1
    model = PrefillModel([-2] * stages, {}, 0, 1e9, Link(1e9, 0.0), spec.hidden_size, [])
    return Pool.build(spec, pre, dec, model, Link(1e9, 1e-6), 1), spec


def test_the_kv_hand_off_sends_each_layers_cache_when_the_prompt_leaves_its_region():
    from wse.serving.handoff import TOKEN_BYTES
    from wse.workload.decode import kv_bytes
    from wse.workload.params import DecodeParams
    pool, spec = _tiny_pool()
    S = 100
    want = kv_bytes(spec, DecodeParams(batch=1, context=S), 0, spec.layers)
    assert pool.layer_bytes(S).sum() == want and len(set(pool.dst.tolist())) == 2  # both decode wafers receive
    dep = np.arange(pool.stages, dtype=float) * 1e-3
    exit_s = dep[-1] + 1e-6
    done, nbytes = pool.handoff(S, dep, exit_s)
    per_layer = pool.layer_bytes(S)[0] / 1e9  # one layer's transfer over a 1 GB/s port
    assert nbytes == want + TOKEN_BYTES
    assert done == pytest.approx(max(dep[pool.stage[-1]] + 1e-6 + per_layer,  # the last layer, when it left
                                     exit_s + 1e-6 + TOKEN_BYTES / 1e9))  # and the first token
    # a second prompt leaving at the same moments waits for the ports the first one uses
    again, _ = pool.handoff(S, dep, exit_s)
    assert again > done
    assert pool.net.sent[pool.decode_wafers] == 2 * (want + TOKEN_BYTES)
    assert sum(pool.net.received[:2]) == 2 * (want + TOKEN_BYTES)
    pool.reset()
    assert pool.handoff(S, dep, exit_s)[0] == pytest.approx(done)


def test_prefill_wafers_against_the_interleaved_run(tmp_path):
    """A lone request with prefill wafers laid out as the decode wafers: the same first token,
    and the rest later by exactly the hand-off (first token to KV on the decode wafers; links
    slow enough that the hand-off outlasts the LM head). The two runs share a stage cache (the
    second simulates no stage the first did)."""
    from wse.engine.run import simulate
    from wse.serving.serve import run_serve
    from wse.system.cache import StageCache
    from wse.system.config import load_system
    from wse.system.pool import Fanout
    system = load_system("cs3", MINI + ["system.link_bytes_per_s=1e8"])
    cfg = system.wafer_config
    sim = lambda t: simulate(t, cfg, validated=True)  # noqa: E731
    # a prompt between the slots' sides, as 60 is on small's 32 x 64 slots: prefilled as one of 16
    r = reqs([0.0], [12], [4])
    kw = dict(fanout=Fanout(1, cache=StageCache(tmp_path)), wafers=2, context=24, prefill_steps=16, curve=[])
    inter = run_serve("tiny", system, sim, r, **kw)
    split = run_serve("tiny", system, sim, r, prefill_wafers=2, **kw)
    a, b = inter.wafer.outcome, split.wafer.outcome
    assert split.wafers == 4 and split.pool.wafers == 2 and b.handoff_bytes > 0
    assert b.first_token_s[0] == pytest.approx(a.first_token_s[0], rel=1e-12)
    gap = b.kv_ready_s[0] - b.first_token_s[0]
    assert gap > 0 and b.finish_s[0] - a.finish_s[0] == pytest.approx(gap, rel=1e-9)
    assert split.wafer.costs.power_w == pytest.approx(2 * inter.wafer.costs.power_w)


@pytest.mark.parametrize("option,value,err", [("--prefill-wafers", "-1", "at least 0"),
                                              ("--prefill-wafers", "two", "a number or 'auto'"),
                                              ("--sharing-check", "1", "at least 2")])
def test_bad_prefill_wafers_or_sharing_check_is_one_error_line(tmp_path, option, value, err):
    args = ["serve", "--model", "tiny", "--system", "cs3", *sum((["--set", s] for s in SMALL), []), "--wafers", "2",
            "--rate", "4", "--duration", "1", option, value, "--jobs", "1", "-o", str(tmp_path / "s.h5")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and res.output.count("error:") == 1 and err in res.output, res.output
    assert not (tmp_path / "s.h5").exists()


def test_serve_command_with_prefill_wafers_and_a_sharing_check(tmp_path):
    import h5py
    out = tmp_path / "s.h5"
    # prompts longer than the 8 x 8 prefill slots' side, as 40-70 are than small's 32 x 32
    args = ["serve", "--model", "tiny", "--system", "cs3", *sum((["--set", s] for s in MINI), []), "--wafers", "2",
            "--rate", "40", "--duration", "0.5", "--prompt-len", "uniform:10:20", "--output-len", "uniform:1:6",
            "--prefill-wafers", "auto", "--sharing-check", "2", "--curve", "", "--jobs", "1", "--cache", str(tmp_path / "c"), "-o", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "prefill on 1 separate wafer(s)" in res.output, res.output
    assert "micro-batches sharing the regions: 2 through wafer" in res.output
    with h5py.File(out, "r") as f:
        req = {k: f["requests"][k][()] for k in f["requests"]}
        assert f["summary"]["prefill_wafers"][()] == 1 and f["summary"]["wafers"][()] == 3
        later = (req["wafer_rejected"] == 0) & (req["output_tokens"] > 1)
        assert later.any() and (req["wafer_kv_ready_s"][later] >= req["wafer_first_token_s"][later]).all()
        assert np.isnan(req["wafer_kv_ready_s"][~later]).all()
        assert f["summary"]["kv_handoff_bytes"][()] > 0
        assert f["summary"]["sharing_micro_batches"][()] == 2
        assert f["summary"]["sharing_simulated_cycles"][()] > f["summary"]["sharing_single_cycles"][()]
    assert CliRunner().invoke(cli, ["report", str(out)]).exit_code == 0


def test_micro_batches_back_to_back_on_the_fabric_against_the_tandem():
    """A wafer's decode step repeated m times is m micro-batches passing its regions back to back:
    every work counter m times one step's; the cycles at least one step plus m - 1 times the busiest
    PE's work, at most m whole steps; the tandem over the composed hold times within 5% (measured
    +2.5% at m = 5: a region's PEs start the next micro-batch while others still drain the last,
    which the region-granularity tandem does not credit, docs/serving.md)."""
    from wse.engine.run import simulate
    from wse.hardware import load_preset
    from wse.serving.sharing import check_sharing, repeated, tandem_cycles
    from wse.workload.compose import compose
    from wse.workload.decode import plan_model
    from wse.workload.models import load_model
    from wse.workload.params import DecodeParams
    from wse.workload.stages import full_trace
    cfg = load_preset("small")
    sim = lambda t: simulate(t, cfg, validated=True)  # noqa: E731
    plan = plan_model(load_model("tiny"), cfg, DecodeParams(batch=1, context=64))
    d = compose(plan, sim)
    holds = [d.holds.get(s, 0) for s in range(len(plan.slots))]
    assert sum(holds) == d.total_cycles
    tr, _ = full_trace(plan)
    one = sim(tr)
    assert one.total_cycles == d.total_cycles and sim(repeated(tr, 1)).total_cycles == one.total_cycles
    m = 4
    many = sim(repeated(tr, m))
    for counter in ("flops", "sram_read_bytes", "sram_write_bytes", "wavelets_sent", "ops_completed"):
        assert many.pe(counter).sum() == m * one.pe(counter).sum(), counter
    assert many.link("wavelets").sum() == m * one.link("wavelets").sum()
    busiest_pe = int(one.pe("busy_cycles").max())
    assert one.total_cycles + (m - 1) * busiest_pe <= many.total_cycles <= m * one.total_cycles
    assert tandem_cycles(holds, m) == sum(holds) + (m - 1) * max(holds)
    c = check_sharing([plan], [holds], sim, m)
    assert (c.wafer, c.single_cycles, c.simulated_cycles) == (0, one.total_cycles, many.total_cycles)
    assert 0 <= c.error < 0.05 and c.period_cycles <= c.busiest_hold_cycles


def test_littles_law_with_a_prefill_pool():
    rate = 2.0
    r = _stream(rate, 2000.0)
    out = serve_pipeline(r, FakePipeline(groups=2, seats=2, d=6e-3), 0, FakePool(p=1e-4, gap=2e-3))
    T = float(r.arrival_s[-1])
    grid = np.linspace(0.0, T, 200_001)
    n_in = np.searchsorted(np.sort(r.arrival_s), grid, side="right") - \
        np.searchsorted(np.sort(out.finish_s), grid, side="right")
    w = float((out.finish_s - r.arrival_s).mean())
    assert w > 0.3 and n_in.mean() == pytest.approx(rate * w, rel=0.06)
