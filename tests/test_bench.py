"""`wse bench`: figures, the history file and regression flags (smoke-test sizes)."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from wse import bench
from wse.cli import cli


def test_bench_appends_history_and_compares(tmp_path):
    hist = tmp_path / "h.jsonl"
    runner = CliRunner()
    r1 = runner.invoke(cli, ["bench", "--quick", "--only", "layer", "--history", str(hist), "--json"])
    assert r1.exit_code == 0, r1.output
    entry = json.loads(r1.output.strip().splitlines()[-1])
    layer = entry["results"]["layer"]
    assert layer["cycles"] > 0 and layer["pe_cycles_per_s"] > 0 and 0 < layer["stepped_fraction"] <= 1
    assert layer["peak_rss_mb"] > 0 and entry["machine"]["cpus"] >= 1
    r2 = runner.invoke(cli, ["bench", "--quick", "--only", "layer", "--history", str(hist)])
    assert r2.exit_code == 0, r2.output
    assert "layer.pe_cycles_per_s" in r2.output  # compared with the first run
    lines = hist.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["quick"] for x in lines)
    # the same trace simulates to the same cycles every time
    assert json.loads(lines[1])["results"]["layer"]["cycles"] == layer["cycles"]


def test_unknown_benchmark_is_one_clear_error(tmp_path):
    r = CliRunner().invoke(cli, ["bench", "--only", "nope", "--history", str(tmp_path / "h")])
    assert r.exit_code == 2 and "choose from" in r.output
    assert not (tmp_path / "h").exists()


def test_regressions_are_flagged_beyond_the_threshold():
    before = {"results": {"dense": {"pe_cycles_per_s": 100.0}, "token8b": {"wall_s": 10.0}}}
    after = {"results": {"dense": {"pe_cycles_per_s": 80.0}, "token8b": {"wall_s": 10.5}}}
    got = {name: worse for name, _, _, worse in bench.changes(after, before)}
    assert got == {"dense.pe_cycles_per_s": True, "token8b.wall_s": False}
    assert bench.changes(after, None) == []


def test_system_benchmark_runs_cold(monkeypatch):
    """The `system` benchmark: a cold `wse system` in a fresh process, its wall time and figures.
    Its command as the benchmark gives it, on a 16 x 16 wafer: the fresh process, its two-worker
    cluster and the figures read back are the same, each stage a fraction of one on a wse3's 128 x
    128 slots (test_system_benchmark_runs_cold_at_its_size runs them there)."""
    real, commands = subprocess.run, []

    def on_a_small_wafer(cmd, *a, **kw):
        if cmd[1:4] == ["-c", "from wse.cli import cli; cli()", "system"]:
            commands.append(cmd)
            cmd = [*cmd, "--set", 'system.wafer="small"', "--set", "wafer.mesh_width=16", "--set",
                   "wafer.mesh_height=16"]
        return real(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "run", on_a_small_wafer)
    r = bench.run_one("system", quick=True)
    assert len(commands) == 1 and commands[0][0] == sys.executable
    args = commands[0][4:]
    assert args[:args.index("-o")] == ["--model", "tiny-moe", "--wafers", "auto", "--uniform-slots", "--jobs", "2",
                                       "--prompt-len", "0", "--quiet"]
    assert r["wall_s"] > 0 and r["wafers"] >= 1 and r["tokens_per_s_per_user"] > 0
    assert "system" in bench.format_results({"system": r})[0]


@pytest.mark.slow  # ~15 s; test_system_benchmark_runs_cold covers this path (the same command, on a 16 x 16 wafer)
def test_system_benchmark_runs_cold_at_its_size():
    """The `system` benchmark as `wse bench` runs it: a cold `wse system` in a fresh process, its
    wall time and figures."""
    r = bench.run_one("system", quick=True)
    assert r["wall_s"] > 0 and r["wafers"] >= 1 and r["tokens_per_s_per_user"] > 0
    assert "system" in bench.format_results({"system": r})[0]


def test_functional_benchmark_checks_its_values():
    """The `functional` benchmark: a gemv's values by both schedules, checked against numpy."""
    r = bench.run_one("functional", quick=True)
    assert r["wall_s"] > 0 and r["element_ops_per_s"] > 0 and r["max_error"] < 0.05
    assert "functional" in bench.format_results({"functional": r})[0]


def test_stage_benchmark_simulates_a_wafers_largest_stage_on_one_thread():
    """The `stage` benchmark: the wafer's stage of most PEs, simulated as a pool worker does."""
    from wse.system.config import load_system
    from wse.system.wafers import wafer_plans
    from wse.workload.compose import build_stage, stages
    from wse.workload.models import load_model
    from wse.workload.params import DecodeParams
    r = bench.run_one("stage", quick=True)
    plan = wafer_plans(load_model("tiny-moe"), load_system("cs3", []), DecodeParams(uniform_slots=True), 1)[0]
    most = max(build_stage(plan, kind, ref).trace.n_pes for _, kind, ref in stages(plan))
    assert r["pes"] == most and r["wafers"] == 1 and r["cycles"] > 0
    assert r["pe_cycles_per_s"] == pytest.approx(r["pes"] * r["cycles"] / r["wall_s"])
    assert "its largest stage" in bench.format_results({"stage": r})[0]
