"""CLI for kernels and models: `wse models`, `wse trace gen`, `wse run --op / --model`."""
from click.testing import CliRunner

from wse.cli import cli
from wse.results.store import read_run
from wse.trace import load


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_models_lists_the_zoo():
    r = invoke("models")
    assert r.exit_code == 0
    assert "llama3.1-8b" in r.output and "8.03B" in r.output and "kimi-k2" in r.output


def test_trace_gen_and_run_a_gemv(tmp_path):
    t = tmp_path / "g.h5"
    r = invoke("trace", "gen", "--op", "gemv", "--m", 512, "--n", 256, "--region", "16x8", "--wafer", "small", "-o", t)
    assert r.exit_code == 0, r.output
    assert load(t).mesh_width == 16
    out = tmp_path / "run.h5"
    r = invoke("run", "--op", "gemv", "--m", 512, "--n", 256, "--region", "16x8", "--wafer", "small", "-o", out)
    assert r.exit_code == 0, r.output
    rf = read_run(out)
    assert rf.complete and rf.summary["analytic_model_flops"] == 2 * 512 * 256
    assert rf.summary["flops"] == rf.summary["analytic_model_flops"] + rf.summary["analytic_reduce_flops"]


def test_run_gemm_and_attention(tmp_path):
    for args in (["--op", "gemm", "--m", 32, "--k", 32, "--n", 32, "--region", "4x4", "--algo", "summa"],
                 ["--op", "attention", "--heads", 4, "--kv-heads", 2, "--head-dim", 8, "--context", 16,
                  "--region", "4x4"],
                 ["--op", "allreduce", "--elements", 10, "--region", "6x3", "--axis", "x"]):
        r = invoke("run", *args, "--wafer", "small", "-o", tmp_path / "k.h5")
        assert r.exit_code == 0, r.output
        assert "status   complete" in r.output


def test_run_a_model_decode_step(tmp_path):
    out = tmp_path / "m.h5"
    r = invoke("run", "--model", "tiny", "--wafer", "small", "--region", "16x16", "--context", "8", "-o", out)
    assert r.exit_code == 0, r.output
    assert "tokens/s per sequence" in r.output and "cycles per layer" in r.output
    rf = read_run(out)
    assert rf.summary["token_cycles"] > rf.summary["layer_cycles"] > 0
    from wse.workload.models import load_model
    assert rf.summary["resident_weight_bytes"] == 2 * load_model("tiny").total_params()
    assert "stages" in rf.tables and len(rf.tables["stages"]["cycles"]) >= 3


def test_run_a_model_prefill(tmp_path):
    r = invoke("run", "--model", "tiny", "--wafer", "small", "--region", "8x8", "--phase", "prefill",
               "--prompt-len", 16, "-o", tmp_path / "p.h5")
    assert r.exit_code == 0, r.output
    assert "TTFT" in r.output


def test_workload_input_errors(tmp_path):
    out = tmp_path / "x.h5"
    cases = [
        (["run", "--model", "nosuch", "--wafer", "small"], "unknown model 'nosuch'"),
        (["run", "--op", "gemv", "--m", 64, "--wafer", "small"], "--op gemv needs --region"),
        (["run", "--op", "gemv", "--region", "4x4", "--m", 64, "--wafer", "small"], "needs --n"),
        (["run", "--op", "gemm", "--m", 8, "--k", 8, "--n", 8, "--region", "4x2", "--wafer", "small"],
         "needs a square region"),
        (["run", "--model", "llama3.1-70b", "--wafer", "wse3"], "B missing"),
        (["run", "--model", "tiny", "--op", "gemv", "--wafer", "small"], "exactly one of"),
        (["run", "--model", "tiny", "--wafer", "small", "--region", "9x9x"], "--region"),
        (["run", "--model", "tiny", "--wafer", "small", "--batch", "0"], "--batch must be positive"),
        (["trace", "gen", "--wafer", "small"], "exactly one of --op and --model"),
    ]
    for args, fragment in cases:
        r = invoke(*args, "-o", out)
        assert r.exit_code == 2, (args, r.output)
        assert fragment in r.output, (args, r.output)
        assert "Traceback" not in r.output
    assert not out.exists()
