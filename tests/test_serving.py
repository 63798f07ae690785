"""`wse serve` (docs/serving.md): request generation and files, the pipeline and iteration
schedulers against closed forms and brute force, Little's law, conservation, determinism, the
step model against `wse system`'s single-request figures, and bad input."""
import math

import numpy as np
import pytest
from click.testing import CliRunner

from wse.cli import cli
from wse.errors import WseError
from wse.serving import requests as R
from wse.serving.metrics import figures, Costs
from wse.serving.sim import Tandem, serve_iterations, serve_pipeline


class FakePipeline:
    """Constant per-stage holds: decode passes `d` per stage (+ `per_seq` x n on the busiest),
    prefills `p x prompt` per stage, a fixed delay."""

    def __init__(self, stages=4, d=1e-3, p=1e-5, delay=2e-4, groups=3, seats=2, kv=10_000, per_seq=0.0):
        self.stages, self.d, self.p, self.dl, self.per_seq = stages, d, p, delay, per_seq
        self.groups, self.seats, self.kv_tokens, self.max_tokens = groups, seats, kv, kv

    def decode(self, n, context):
        h = np.full(self.stages, self.d)
        h[1] += self.per_seq * n
        return h, self.dl

    def prefill(self, prompt):
        return np.full(self.stages, self.p * prompt), self.dl

    def prefill_chunk(self, start, end, last):
        return np.full(self.stages, self.p * (end - start)), self.dl

    def activity(self, n, context):
        return np.array([n, 0.0, 0.0, 0.0])

    def prefill_activity(self, prompt):
        return np.array([prompt, 0.0, 0.0, 0.0])


class FakeIterations:
    def __init__(self, max_seqs=8, kv=10_000, d=2e-3, per_tok=1e-6):
        self.max_seqs, self.max_prefill_tokens, self.kv_tokens = max_seqs, 4096, kv
        self.d, self.per_tok = d, per_tok

    def decode(self, n, context):
        return self.d + 1e-5 * n + 1e-8 * n * context

    def prefill(self, prompts):
        return 1e-3 + self.per_tok * sum(prompts)

    def mixed(self, n, context, pieces):
        return self.decode(n, context) + self.per_tok * sum(b - a for a, b, _ in pieces)


def reqs(t, p, o):
    return R.Requests(np.array(t, float), np.array(p, dtype=np.int64), np.array(o, dtype=np.int64))


def test_tandem_matches_the_recursion_stage_by_stage():
    rng = np.random.default_rng(3)
    R_, n = 7, 60
    line = Tandem(R_)
    last = np.full(R_, -np.inf)
    t = 0.0
    for _ in range(n):
        t += rng.exponential(0.5)
        h = rng.uniform(0.01, 2.0, R_)
        got = line.enter(t, h, 0.25)
        d = np.empty(R_)
        for j in range(R_):  # leave stage j when done there and the item before has left it
            d[j] = max(d[j - 1] if j else t, last[j]) + h[j]
        last = d
        assert got == pytest.approx(d[-1] + 0.25, rel=1e-12)


def test_identical_micro_batches_follow_the_pipeline_formula():
    """m micro-batches that never finish: a sequence's token every max(L, m x b)."""
    for groups, per_seq in ((1, 0.0), (3, 0.0), (9, 0.0), (3, 4e-3)):
        f = FakePipeline(groups=groups, seats=1, per_seq=per_seq, kv=10**9)
        f.max_tokens = 10**9
        out = serve_pipeline(reqs([0.0] * groups, [1] * groups, [400] * groups), f)
        holds, delay = f.decode(1, 1)
        L, b = holds.sum() + delay, holds.max()
        tpot = (out.finish_s - out.first_token_s) / (out.tokens - 1)
        assert tpot.max() == pytest.approx(max(L, groups * b), rel=0.02)


def test_one_request_alone_takes_the_single_pass_times():
    f = FakePipeline()
    out = serve_pipeline(reqs([1.0], [100], [5]), f)
    ttft = out.first_token_s[0] - 1.0
    assert ttft == pytest.approx(f.prefill(100)[0].sum() + f.dl)
    tpot = (out.finish_s[0] - out.first_token_s[0]) / 4
    assert tpot == pytest.approx(f.decode(1, 1)[0].sum() + f.dl)
    g = FakeIterations()
    out = serve_iterations(reqs([1.0], [100], [5]), g)
    assert out.first_token_s[0] - 1.0 == pytest.approx(g.prefill([100]))
    assert (out.finish_s[0] - out.first_token_s[0]) == pytest.approx(sum(g.decode(1, c) for c in range(101, 105)))


def _stream(rate, n_s=400.0, seed=5):
    return R.generate(R.Arrivals(rate), R.LengthDist("uniform", 50, 150), R.LengthDist("uniform", 2, 40), n_s, seed)


@pytest.mark.parametrize("side,chunk", [("pipeline", 0), ("iterations", 0), ("pipeline", 32), ("iterations", 64)])
def test_nothing_is_lost_and_the_same_seed_gives_the_same_result(side, chunk):
    r = _stream(3.0, 100.0)
    kv = 8_000
    run = (lambda q: serve_pipeline(q, FakePipeline(kv=kv), chunk)) if side == "pipeline" else \
        (lambda q: serve_iterations(q, FakeIterations(kv=kv), chunk))
    r = R.Requests(r.arrival_s, r.prompt, np.where(np.arange(len(r)) % 50 == 0, 9_000, r.output))  # some never fit
    a, b = run(r), run(_copy(r))
    assert np.array_equal(a.finish_s, b.finish_s, equal_nan=True) and np.array_equal(a.tokens, b.tokens)
    done = ~a.rejected
    assert a.rejected.sum() == (r.prompt + r.output > kv).sum() > 0
    assert done.sum() + a.rejected.sum() == len(r)  # admitted + rejected = arrived
    assert np.array_equal(a.tokens[done], r.output[done])  # every completed request got all its tokens
    assert np.isnan(a.finish_s[a.rejected]).all() and np.isfinite(a.finish_s[done]).all()
    assert (a.first_token_s[done] >= a.admitted_s[done]).all() and (a.admitted_s[done] >= r.arrival_s[done]).all()
    assert (a.finish_s[done] >= a.first_token_s[done]).all()


def _copy(r):
    return R.Requests(r.arrival_s.copy(), r.prompt.copy(), r.output.copy())


@pytest.mark.parametrize("side,chunk", [("pipeline", 0), ("iterations", 0), ("pipeline", 40), ("iterations", 40)])
def test_littles_law_on_the_simulated_queue(side, chunk):
    """Time-averaged requests in the system over the arrival window equal the nominal arrival rate
    times the mean time in the system (within sampling error and edge effects)."""
    rate = 2.0
    r = _stream(rate, 2000.0)
    out = serve_pipeline(r, FakePipeline(groups=2, seats=2, d=6e-3), chunk) if side == "pipeline" else \
        serve_iterations(r, FakeIterations(max_seqs=4, d=2e-2), chunk)
    T = float(r.arrival_s[-1])
    grid = np.linspace(0.0, T, 200_001)
    a, f = r.arrival_s, out.finish_s
    n_in = np.searchsorted(np.sort(a), grid, side="right") - np.searchsorted(np.sort(f), grid, side="right")
    w = float((f - a).mean())
    assert w > 0.3  # a queue that matters, well loaded
    assert n_in.mean() == pytest.approx(rate * w, rel=0.06)


def test_prefills_delay_decode_passes_behind_them_and_chunks_let_them_through():
    """A decode pass entering behind a long prefill cannot overtake it (stage by stage); with
    chunked prefill the passes go between the chunks, and the chunks pipeline across the stages
    (a prompt of 16 chunks takes 16 + 3 chunk times through 4 stages, not 4 whole prompts)."""
    f = FakePipeline(groups=2, seats=1, p=1e-3)
    r = reqs([0.0, 0.0005], [1, 400], [50, 2])
    whole, chunked = serve_pipeline(r, f), serve_pipeline(r, f, 25)
    # request 0 decodes alone until request 1's 0.4 s-per-stage prefill enters; its next token waits
    assert whole.finish_s[0] - whole.first_token_s[0] > 0.4
    assert chunked.finish_s[0] - chunked.first_token_s[0] < 0.7 < 1.7 < whole.finish_s[0] - whole.first_token_s[0]
    assert whole.first_token_s[1] - 0.0005 == pytest.approx(1.6 + 2e-4, abs=0.005)  # 4 stages x 0.4 s
    assert chunked.first_token_s[1] - 0.0005 < (16 + 3) * 0.025 + 0.01
    g = FakeIterations(max_seqs=4)
    r = reqs([0.0, 0.0], [10, 1000], [3, 2])
    out = serve_iterations(r, g, 100)  # the long prompt in 100-token pieces beside request 0's decode
    assert np.array_equal(out.tokens, r.output) and out.steps >= 10


def test_figures_goodput_and_attainment():
    r = reqs([0.0, 0.0, 1.0], [10, 10, 10], [3, 3, 1])
    f = FakeIterations(max_seqs=1)
    out = serve_iterations(r, f)
    fig = figures(r, out, Costs(1000.0, 3600.0), slo_ttft_s=0.002, slo_tpot_s=1.0)
    assert fig["completed"] == 3 and fig["output_tokens"] == 7
    assert fig["slo_attainment"] == pytest.approx(2 / 3)  # the second request waits for the first
    assert fig["j_per_token"] == pytest.approx(1000.0 * out.end_s / 7)
    assert fig["usd_per_mtok"] == pytest.approx(out.end_s / 7 * 1e6)


@pytest.mark.parametrize("text,err", [
    ("uniform:5", "expected one of"), ("gauss:3:4", "expected one of"), ("normal:-3:1", "mean must be"),
    ("uniform:9:3", "LO <= HI"), ("normal:10:-1", "standard deviation"), ("12.5", "whole number"),
    ("exp:nan", "finite"), ("0", "mean must be"),
])
def test_bad_length_distributions(text, err):
    with pytest.raises(WseError, match=err):
        R.parse_length(text, "--prompt-len")


def test_length_distributions_draw_their_means():
    rng = np.random.default_rng(0)
    for text, mean in (("300", 300), ("uniform:100:300", 200), ("normal:500:50", 500), ("lognormal:400:200", 400),
                       ("exp:250", 250)):
        assert R.parse_length(text, "x").draw(rng, 40_000).mean() == pytest.approx(mean, rel=0.03)


def test_arrivals_rate_and_burstiness():
    for cv in (1.0, 3.0):
        t = R.Arrivals(50.0, cv).draw(np.random.default_rng(1), 400.0)
        gaps = np.diff(t)
        assert len(t) / 400.0 == pytest.approx(50.0, rel=0.05 * cv)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(WseError, match="--rate"):
            R.parse_arrivals("poisson", bad)
    with pytest.raises(WseError, match="--arrivals"):
        R.parse_arrivals("gamma:0", 1.0)


@pytest.mark.parametrize("body,err", [
    ("", "empty request file"),
    ("arrival_s,prompt_tokens\n0,5\n", "lacks output_tokens"),
    ("arrival_s,prompt_tokens,output_tokens\n0,5,x\n", "row 2: not a number"),
    ("arrival_s,prompt_tokens,output_tokens\n0,5,3\n-1,5,3\n", "row 3: arrival_s"),
    ("arrival_s,prompt_tokens,output_tokens\n2,5,3\n1,5,3\n", "arrival order"),
    ("arrival_s,prompt_tokens,output_tokens\n0,5.5,3\n", "whole number"),
    ("arrival_s,prompt_tokens,output_tokens\n0,0,3\n", "prompt_tokens"),
    ("arrival_s,prompt_tokens,output_tokens\n0,5\n", "row 2 has 2 fields"),
    ("arrival_s,prompt_tokens,output_tokens\n", "no request rows"),
])
def test_bad_request_files(tmp_path, body, err):
    p = tmp_path / "r.csv"
    p.write_text(body)
    with pytest.raises(WseError, match=err):
        R.read_requests(p)


def test_request_file_round_trip(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("prompt_tokens,arrival_s,output_tokens,note\n100,0.5,20,a\n\n200,0.75,1,b\n")
    r = R.read_requests(p)
    assert list(r.arrival_s) == [0.5, 0.75] and list(r.prompt) == [100, 200] and list(r.output) == [20, 1]


@pytest.mark.parametrize("args,err", [
    (["--rate", "-2"], "--rate"), (["--rate", "1", "--slo-ttft", "0"], "--slo-ttft"),
    (["--rate", "1", "--slo-tpot", "-1"], "--slo-tpot"), (["--rate", "1", "--prompt-len", "zipf:3"], "--prompt-len"),
    ([], "give --rate"), (["--rate", "1", "--duration", "0"], "--duration"),
    (["--rate", "1", "--curve", "1,-2"], "--curve"), (["--rate", "1", "--batch", "0"], "--batch"),
    (["--rate", "1", "--wafers", "cheapest"], "--wafers cheapest"),
])
def test_serve_bad_input_is_one_error_line(tmp_path, args, err):
    res = CliRunner().invoke(cli, ["serve", "--model", "tiny", "--system", "cs3", "-o", str(tmp_path / "s.h5"),
                                   "--no-cache", "--jobs", "1", *args])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and err in lines[0], res.output
    assert not (tmp_path / "s.h5").exists()


def test_serve_bad_request_file_names_the_row(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("arrival_s,prompt_tokens,output_tokens\n0,5,3\n0.1,5,-3\n")
    res = CliRunner().invoke(cli, ["serve", "--model", "tiny", "--system", "cs3", "--requests", str(p), "-o",
                                   str(tmp_path / "s.h5"), "--no-cache"])
    assert res.exit_code == 2 and "row 3" in res.output and res.output.startswith("error:"), res.output
    res = CliRunner().invoke(cli, ["serve", "--model", "tiny", "--system", "cs3", "--requests", str(p), "--rate",
                                   "3", "-o", str(tmp_path / "s.h5"), "--no-cache"])
    assert res.exit_code == 2 and "either --rate or --requests" in res.output


def test_percentiles_are_nan_free_when_everything_is_rejected():
    r = reqs([0.0], [10], [10])
    out = serve_iterations(r, FakeIterations(kv=5))
    fig = figures(r, out, Costs(1.0, 1.0), 1.0, 1.0)
    assert fig["rejected"] == 1 and fig["completed"] == 0 and math.isnan(fig["ttft_p50_s"])


SMALL = ['system.wafer="small"', "system.wafers=2"]
# two 16 x 16 wafers: 8 x 16 layer slots, so the steps simulate in seconds
MINI = SMALL + ["wafer.mesh_width=16", "wafer.mesh_height=16"]


def test_a_lone_request_takes_wse_systems_single_request_times(tmp_path):
    """rate -> 0: one request's TTFT is `wse system`'s TTFT at its prompt, and its TPOT the
    simulated decode pass at its context (a fitted point: exact). (The two runs share a stage
    cache, exact by its key, so each kernel and stage is simulated once.)"""
    from wse.engine.run import simulate
    from wse.serving.serve import run_serve
    from wse.system.compare import run_system
    from wse.system.config import load_system
    from wse.system.pool import Fanout
    system = load_system("cs3", MINI)
    cfg = system.wafer_config
    sim = lambda t: simulate(t, cfg, validated=True)  # noqa: E731
    C = 80  # the request's second token is decoded at context C - 1, a fitted point
    from wse.system.cache import StageCache
    fanout = Fanout(1, cache=StageCache(tmp_path))
    job = run_serve("tiny", system, sim, reqs([0.0], [C - 2], [2]), fanout=fanout, wafers=2, context=C,
                    prefill_steps=16)
    ref = run_system("tiny", system, sim, wafers=2, context=C - 1, prompt=C - 2, prefill_steps=16, fanout=fanout)
    assert fanout.cache.stats.hits > 0
    w = job.wafer.figures
    assert w["ttft_p50_s"] == pytest.approx(ref.ttft_s, rel=1e-9)
    assert w["tpot_p50_s"] == pytest.approx(ref.decode.latency_s, rel=1e-9)
    assert job.decode.wafers == 2 and job.steps.groups == ref.decode.max_in_flight
    g = job.gpu.figures  # the GPU side: its prefill and one decode step on the same nodes
    assert g["ttft_p50_s"] == pytest.approx(job.gpu_steps.prefill([C - 2]))
    assert g["tpot_p50_s"] == pytest.approx(job.gpu_steps.decode(1, C - 1))


def test_serve_command_writes_every_request_and_reports_and_plots(tmp_path):
    import h5py
    out = tmp_path / "s.h5"
    args = ["serve", "--model", "tiny", "--system", "cs3", *sum((["--set", s] for s in MINI), []), "--wafers", "2",
            "--rate", "40", "--duration", "1", "--prompt-len", "uniform:40:70", "--output-len", "uniform:2:8",
            "--slo-ttft", "0.001", "--slo-tpot", "0.0001", "--curve", "0.5,1", "--sensitivity", "--jobs", "1",
            "--cache", str(tmp_path / "cache"), "-o", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "TTFT p99" in res.output and "goodput" in res.output and "$ per M output tokens" in res.output
    with h5py.File(out, "r") as f:
        req = {k: f["requests"][k][()] for k in f["requests"]}
        assert f.attrs["complete"]
        n = len(req["arrival_s"])
        assert n > 10 and all(len(v) == n for v in req.values())
        for side in ("wafer", "gpu"):
            ok = req[f"{side}_rejected"] == 0
            assert np.array_equal(req[f"{side}_tokens"][ok], req["output_tokens"][ok])
        assert set(f["serve_curve"]["side"].asstr()[()]) == {"wafer", "gpu"}
        assert len(f["sensitivity"]["input"]) == 10
        assert f["summary"]["wafer_ttft_p99_s"].attrs["units"] == "s"
    rep = CliRunner().invoke(cli, ["report", str(out)])
    assert rep.exit_code == 0 and "recomputed from /requests" in rep.output, rep.output
    plots = CliRunner().invoke(cli, ["plot", str(out), "-o", str(tmp_path / "p")])
    assert plots.exit_code == 0, plots.output
    for name in ("serve-latency-throughput.png", "serve-cdf.png", "serve-sensitivity.png"):
        assert (tmp_path / "p" / name).exists()
    again = tmp_path / "t.h5"  # the same seed and a warm cache: the same requests and times
    res = CliRunner().invoke(cli, args[:-1] + [str(again)])
    assert res.exit_code == 0 and "0 misses" in res.output, res.output
    with h5py.File(out, "r") as a, h5py.File(again, "r") as b:
        for k in a["requests"]:
            assert np.array_equal(a["requests"][k][()], b["requests"][k][()], equal_nan=True), k


def test_step_interpolation_is_exact_on_bilinear_data_and_reports_its_checks():
    from wse.serving.steps import DecodePoint, WaferSteps, fit_kernels

    def holds(b, c):  # bilinear in (batch, context) per stage
        return np.array([1e-6 + 2e-9 * c, 3e-6 + 1e-7 * b + 1e-10 * b * c, 5e-7])

    pts = [DecodePoint(b, c, holds(b, c), float(holds(b, c).sum()) + 2e-6, np.array([b * c, 0, 0, 0.0]), True)
           for b in (1, 8) for c in (100, 1000)]
    pts.append(DecodePoint(1, 550, holds(1, 550) * 1.1, float(holds(1, 550).sum() * 1.1) + 2e-6,
                           np.zeros(4), False))  # a "simulated" check 10% off the plane
    st = WaferSteps(pts, ["a", "b", "c"], 4, 8, 10_000, 1000, None)
    for b, c in ((3, 400), (8, 1000), (1, 100), (5, 2000)):  # inside, at a corner, extrapolated
        h, d = st.decode(b, c)
        assert np.allclose(h, holds(b, c), rtol=1e-9) and d == pytest.approx(2e-6)
    (b, c, sim_s, got_s), = st.errors()
    assert (b, c) == (1, 550) and got_s == pytest.approx(holds(1, 550).sum() + 2e-6)
    assert abs(got_s / sim_s - 1) == pytest.approx(1 - (holds(1, 550).sum() + 2e-6)
                                                   / (holds(1, 550).sum() * 1.1 + 2e-6), rel=1e-9)
    with pytest.raises(WseError, match="grid"):
        WaferSteps(pts[:3], ["a", "b", "c"], 4, 8, 10_000, 1000, None)
    fit = fit_kernels({100: {"qkv": 1000 + 5 * 100, "scores": 300 + 2 * 100 ** 2},
                       300: {"qkv": 1000 + 5 * 300, "scores": 300 + 2 * 300 ** 2}})
    assert fit["qkv"] == pytest.approx((1000, 5)) and fit["scores"] == pytest.approx((300, 2))
    assert fit_kernels({100: {"o": 700}})["o"] == pytest.approx((0.0, 7.0))  # one length: a pure scaling


GEMM_SHAPES = ((48, 200, 64, 16, 16, "meshgemm", True, False, 4), (40, 96, 40, 20, 20, "meshgemm", True, True, 4),
               (64, 64, 64, 16, 16, "cannon", False, False, 4), (33, 70, 45, 12, 12, "summa", False, False, 4))


def _extrapolates(cfg, sim, m, k, n, P, Q, algo, aa, ab, k1) -> None:
    """A GEMM's first k1 and 2 k1 steps extrapolate its whole cycles to within 1%. SUMMA's steps
    differ by their roots' distances to the line ends and its relays run up to `summa_depth`
    steps ahead: its prefixes need more steps (docs/serving.md)."""
    from wse.workload.gemm import standalone
    from wse.workload.prefill import Combined
    full = sim(standalone(m, k, n, P, cfg, algo, aa, ab, Q=Q)[0])
    a, b = (sim(standalone(m, k, n, P, cfg, algo, aa, ab, steps=s, Q=Q)[0]) for s in (k1, 2 * k1))
    slope = (max(P, Q) - k1) / k1  # the whole kernel's steps extrapolated (prefill.pieces)
    assert Combined.of([a, b], [1 - slope, slope]).total_cycles == \
        pytest.approx(full.total_cycles, rel=0.01), (m, k, n, P, Q, algo)


@pytest.mark.slow  # 14 s; test_prefill_gemms_extrapolated_from_their_first_steps runs a small SUMMA
@pytest.mark.parametrize("Q", [24, 40])
def test_large_summa_gemms_extrapolate_from_their_first_steps(Q):
    from wse.engine.run import simulate
    from wse.hardware import load_preset
    cfg = load_preset("small")
    _extrapolates(cfg, lambda t: simulate(t, cfg, validated=True), 200, 400, 200, 24, Q, "summa", True, False, 8)


def test_prefill_gemms_extrapolated_from_their_first_steps():
    """A MeshGEMM repeats one step P times: its first k1 and k2 steps extrapolate the whole
    kernel's cycles to within 1% (each GEMM of a tiny-model prefill layer, and other shapes)."""
    from wse.engine.run import simulate
    from wse.hardware import load_preset
    from wse.system.pool import prefill_kernels
    from wse.workload.gemm import standalone
    from wse.workload.models import load_model
    from wse.workload.prefill import Combined, gemm_steps, prefill
    cfg = load_preset("small")
    memo = {}

    def sim(t):  # each distinct trace once (the engine is deterministic): the kernels a prefix leaves whole
        key = t.content_hash()
        if key not in memo:
            memo[key] = simulate(t, cfg, validated=True)
        return memo[key]
    for shape in GEMM_SHAPES:
        _extrapolates(cfg, sim, *shape)
    spec = load_model("tiny")
    # a square slot (MeshGEMM: 24 steps, from the first 4 and 8), and a tall one (its attention GEMMs
    # SUMMA: 20 steps, more than twice the prefix but fewer than four settling depths' worth, so
    # simulated whole; the weight GEMMs are weight-stationary blocks, not prefixes)
    for P, Q, S, prefix, tol in ((24, 24, 24, 8, 0.01), (8, 20, 20, 8, 0.0)):
        assert gemm_steps(spec, cfg, P, S, "scores", Q=Q) > 2 * prefix
        runs = {}
        for pre in (0, prefix):
            kernels = prefill_kernels(spec, cfg, P, S, 32, sim, "test", prefix=pre, Q=Q)
            runs[pre] = prefill(spec, cfg, P, S, 32, 1, sim, kernels=kernels, Q=Q)
        for name, cycles in runs[0].kernels.items():
            assert runs[prefix].kernels[name] == pytest.approx(cycles, rel=tol), (P, Q, name)
        assert isinstance(runs[prefix].results["scores"], Combined) == (Q == P)
        assert runs[prefix].kernels["elementwise"] == runs[0].kernels["elementwise"]
    with pytest.raises(WseError, match="steps"):
        standalone(48, 200, 64, 16, cfg, steps=1)


def test_weight_stationary_prefill_runs_every_token_once_in_the_largest_blocks():
    """On a tall slot (or with algo stationary) the weight GEMMs stream the prompt in token
    blocks through the decode GEMV layout: blocks cover every token once, each is as large as
    SRAM allows, the FLOPs add up, and the kernel's cycles are its blocks' one after another."""
    from wse.engine.run import simulate
    from wse.hardware import load_preset
    from wse.workload.gemv import largest_batch
    from wse.workload.models import load_model
    from wse.workload.prefill import Combined, _gemm_shape, kernel_trace, mapping, pieces, prefill
    cfg, spec = load_preset("small"), load_model("tiny")
    assert [mapping("meshgemm", 16, 16, n) for n in ("qkv", "scores")] == ["meshgemm", "meshgemm"]
    assert [mapping("meshgemm", 16, 40, n) for n in ("qkv", "scores")] == ["stationary", "summa"]
    assert [mapping("stationary", 16, 16, n) for n in ("qkv", "scores")] == ["stationary", "meshgemm"]
    S, P, Q = 128, 4, 8  # every kernel in several blocks, qkv's and gate_up's of two sizes
    memo = {}

    def sim(t):  # each distinct trace once (the engine is deterministic)
        key = t.content_hash()
        if key not in memo:
            memo[key] = simulate(t, cfg, validated=True)
        return memo[key]
    for name in ("qkv", "o", "gate_up", "down"):
        parts = pieces(spec, cfg, P, S, name, "meshgemm", Q)
        sizes = [kw["batch"] for _, kw in parts]
        assert sum(w for w, _ in parts) > 1
        assert sum(w * b for (w, _), b in zip(parts, sizes)) == S and max(sizes) - min(sizes) <= 1
        _, k, n, _, _ = _gemm_shape(spec, S, name)
        most, blocks = largest_batch(k, n, P, Q, cfg, S), sum(w for w, _ in parts)
        assert (blocks - 1) * most < S <= blocks * most  # the fewest blocks that fit
        tr, f = kernel_trace(spec, cfg, P, S, name, Q=Q, batch=sizes[0])
        r = sim(tr)
        assert r.pe("flops").sum() == f["block_executed_flops"]
        assert f["executed_flops"] == f["model_flops"] + (Q - 1) * n * S == 2 * S * k * n + (Q - 1) * n * S
    pr = prefill(spec, cfg, P, 52, 32, 1, sim, Q=Q)  # (gate_up in two blocks of 26)
    assert isinstance(pr.results["gate_up"], Combined) and pr.kernels["gate_up"] == pr.results["gate_up"].total_cycles
    parts = pieces(spec, cfg, P, 52, "gate_up", "meshgemm", Q)
    assert pr.kernels["gate_up"] == round(sum(w * sim(kernel_trace(spec, cfg, P, 52, "gate_up", Q=Q, **kw)[0])
                                              .total_cycles for w, kw in parts))


def test_replicas_share_the_requests_round_robin():
    from wse.serving.sim import serve_replicas
    r = _stream(4.0, 50.0)
    g = FakeIterations(max_seqs=2)
    one = serve_replicas(r, g)
    g.replicas = 3
    three = serve_replicas(r, g)
    assert np.array_equal(three.tokens, r.output) and not three.rejected.any()
    assert np.nanmean(three.finish_s - r.arrival_s) < np.nanmean(one.finish_s - r.arrival_s)
    sub = serve_iterations(R.Requests(r.arrival_s[1::3], r.prompt[1::3], r.output[1::3]), FakeIterations(max_seqs=2))
    assert np.array_equal(three.finish_s[1::3], sub.finish_s)


def test_a_prefill_that_cannot_fit_is_refused_before_simulating():
    from types import SimpleNamespace
    from wse.hardware import load_preset
    from wse.serving.steps import check_prefill
    from wse.workload.models import load_model
    check_prefill(load_model("tiny"), load_preset("small"), [SimpleNamespace(P=16, Q=16)], [64])
    check_prefill(load_model("tiny"), load_preset("small"), [SimpleNamespace(P=12, Q=20)], [64])  # tall: SUMMA
    with pytest.raises(WseError, match="does not fit a 16x16 region"):
        check_prefill(load_model("tiny"), load_preset("small"), [SimpleNamespace(P=16, Q=16)], [64, 30_000])


def test_summa_prefixes_start_after_the_relays_have_filled_their_buffers():
    """A SUMMA kernel's relays run up to its buffer depth ahead: a prefix extrapolates from at
    least SUMMA_SETTLE_DEPTHS depths of steps (MeshGEMM from the prefix as given)."""
    from wse.hardware import load_preset
    from wse.workload.gemm import summa_depth
    from wse.workload.models import load_model
    from wse.workload.prefill import SUMMA_SETTLE_DEPTHS, _gemm_shape, gemm_steps, pieces
    cfg, spec = load_preset("wse3"), load_model("llama3.1-70b")
    m, k, n, _, _ = _gemm_shape(spec, 512, "scores")
    T = gemm_steps(spec, cfg, 152, 512, "scores", "meshgemm", 293)
    k1 = SUMMA_SETTLE_DEPTHS * summa_depth(m, k, n, 152, 293, T, cfg)
    assert [kw for _, kw in pieces(spec, cfg, 152, 512, "scores", "meshgemm", 293, 16)] == \
        [{"steps": k1}, {"steps": 2 * k1}] and k1 > 8
    assert [kw for _, kw in pieces(spec, cfg, 127, 512, "scores", "meshgemm", 127, 16)] == [{"steps": 8}, {"steps": 16}]


def test_serve_passes_the_placement_options_to_the_decode_plan(tmp_path, monkeypatch):
    """`wse serve --moe-mapping/--dense-ffn/--tables` reach the decode parameters as in `wse system`
    (the plan is made, then the run stopped before simulating)."""
    from wse.serving import serve as S
    seen = {}

    def stop(spec, system, params, *a, **k):
        seen.update(moe_mapping=params.moe_mapping, dense_ffn=params.dense_ffn, tables=params.tables)
        raise WseError("planned")
    monkeypatch.setattr(S, "wafer_plans", stop)
    res = CliRunner().invoke(cli, ["serve", "--model", "tiny-moe", "--system", "cs3", "--rate", "1", "--wafers", "1",
                                   "--moe-mapping", "regions", "--dense-ffn", "layer", "--tables", "strips",
                                   "-o", str(tmp_path / "s.h5"), "--no-cache", "--jobs", "1"])
    assert "planned" in res.output and seen == dict(moe_mapping="regions", dense_ffn="layer", tables="strips")
