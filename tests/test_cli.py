"""The `wse` command line: wafers, trace synth, run; exit codes and one-line errors."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from click.testing import CliRunner

from wse import hardware, isa
from wse import trace as T
from wse.trace_check import validate
from wse.cli import cli
from wse.results.store import read_run
from wse.trace import TraceBuilder, compute, recv, send
from wse.workload import synthetic

N, S, E, W, R = isa.PORT_NORTH, isa.PORT_SOUTH, isa.PORT_EAST, isa.PORT_WEST, isa.PORT_RAMP


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str, code: int = 2) -> str:
    """Exit `code`, nothing on stdout, exactly one 'error: ...' line on stderr, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _wse_script() -> Path:
    for d in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        p = Path(d) / "wse"
        if p.exists():
            return p
    found = shutil.which("wse")
    if found is None:
        pytest.skip("the wse console script is not installed")
    return Path(found)


@pytest.fixture(scope="module")
def stream_trace(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("traces") / "stream.h5"
    synthetic.stream(8, 8, 16, 7).save(p)
    return p


# ---- wse wafers ------------------------------------------------------------------------------

def test_wafers_lists_every_preset():
    r = invoke("wafers")
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[0] == "preset"
    rows = {ln.split()[0]: ln for ln in lines[1:]}
    assert set(rows) == set(hardware.preset_names()) == {"small", "tiny", "tiny2", "wse2", "wse3"}
    assert "762x1172" in rows["wse3"] and "893,064" in rows["wse3"]
    assert "757x996" in rows["wse2"] and "753,972" in rows["wse2"]
    assert "8x8" in rows["tiny"] and "8x8" in rows["tiny2"] and "64x64" in rows["small"]
    assert rows["wse3"].split()[6] == "2"  # hop latency column
    assert rows["wse2"].split()[6] == "1"
    assert "8/c" in rows["wse3"] and "4/c" in rows["wse2"]
    assert r.stderr == ""


# ---- wse trace synth -------------------------------------------------------------------------

SYNTH = {
    "stream": ["--wavelets", "8"],
    "neighbor": ["--wavelets", "8", "--colors", "3"],
    "contention": ["--wavelets", "8", "--hops", "3"],
    "broadcast": ["--wavelets", "8", "--hops", "5"],
    "chain-reduce": ["--elements", "16"],
    "compute": ["--elements", "16"],
}


@pytest.mark.parametrize("pattern", sorted(SYNTH))
def test_synth_writes_a_loadable_trace(tmp_path, pattern):
    out = tmp_path / f"{pattern}.h5"
    r = invoke("trace", "synth", pattern, "--mesh", "8x8", *SYNTH[pattern], "-o", out)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"wrote {out}: {pattern} on 8x8 PEs")
    t = T.load(out)
    assert (t.mesh_width, t.mesh_height) == (8, 8)
    assert t.meta["pattern"] == pattern
    opts = dict(zip(SYNTH[pattern][::2], SYNTH[pattern][1::2]))
    for opt, value in opts.items():
        assert t.meta[opt.lstrip("-")] == value
    m = re.search(r"([\d,]+) routes, ([\d,]+) distinct programs", r.stdout)
    assert int(m.group(1)) == len(t.routes["pe"])
    assert int(m.group(2)) == len(t.prog_start)
    validate(t, hardware.load_preset("tiny"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_synth_defaults(tmp_path):
    out = tmp_path / "s.h5"
    r = invoke("trace", "synth", "stream", "--mesh", "6x3", "-o", out)
    assert r.exit_code == 0, r.output
    t = T.load(out)
    assert t.meta == {"pattern": "stream", "wavelets": "64", "hops": "5"}
    assert t.program(int(t.pe_program[0, 0, 0]))[0].length == 64


@pytest.mark.parametrize("args, fragments", [
    (["stream", "--elements", "4"], ["--elements does not apply to pattern stream", "--wavelets, --hops"]),
    (["compute", "--wavelets", "4"], ["--wavelets does not apply to pattern compute"]),
    (["compute", "--hops", "2"], ["--hops does not apply to pattern compute"]),
    (["neighbor", "--hops", "2"], ["--hops does not apply to pattern neighbor"]),
    (["chain-reduce", "--colors", "2"], ["--colors does not apply to pattern chain-reduce"]),
    (["stream", "--wavelets", "0"], ["--wavelets must be in [1, 2147483647]"]),
    (["stream", "--hops", "8"], ["stream: --hops must be in [1, 7]"]),
    (["neighbor", "--colors", "1"], ["--colors 1", "[2, 127]"]),
])
def test_synth_inapplicable_or_bad_option(tmp_path, args, fragments):
    out = tmp_path / "x.h5"
    r = invoke("trace", "synth", args[0], "--mesh", "8x8", *args[1:], "-o", out)
    assert_one_line_error(r, *fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mesh, fragment", [
    ("8", "expected WxH"), ("8x", "expected WxH"), ("axb", "expected WxH"), ("8x8x8", "expected WxH"),
    ("", "expected WxH"), ("0x8", "must be in [1, 4096]"), ("8x5000", "must be in [1, 4096]"),
    ("-2x4", "must be in [1, 4096]"),
])
def test_synth_bad_mesh(tmp_path, mesh, fragment):
    out = tmp_path / "x.h5"
    r = invoke("trace", "synth", "stream", "--mesh", mesh, "-o", out)
    assert_one_line_error(r, f"--mesh {mesh!r}", fragment)
    assert list(tmp_path.iterdir()) == []


def test_synth_into_missing_directory(tmp_path):
    out = tmp_path / "missing" / "x.h5"
    r = invoke("trace", "synth", "stream", "--mesh", "8x8", "-o", out)
    assert_one_line_error(r, str(out), "does not exist")


def test_synth_too_many_wavelets_is_a_clean_error(tmp_path):
    out = tmp_path / "x.h5"
    r = invoke("trace", "synth", "stream", "--mesh", "8x8", "--wavelets", "3000000000", "-o", out)
    assert_one_line_error(r, "--wavelets")
    assert not out.exists()


def test_synth_too_many_colors_is_a_clean_error(tmp_path):
    out = tmp_path / "x.h5"
    r = invoke("trace", "synth", "neighbor", "--mesh", "130x1", "--colors", "200", "--wavelets", "1",
               "-o", out)
    assert_one_line_error(r, "color")
    assert not out.exists()


# ---- wse run: success ------------------------------------------------------------------------

def test_run_completes_and_writes_a_run_file(tmp_path, stream_trace):
    out = tmp_path / "run.h5"
    r = invoke("run", "--trace", stream_trace, "--wafer", "tiny", "-o", out)
    assert r.exit_code == 0, (r.output, r.exception)
    assert "status   complete" in r.stdout
    m = re.search(r"^cycles\s+([\d,]+)\s", r.stdout, re.M)
    assert m, r.stdout
    cycles = int(m.group(1).replace(",", ""))
    assert cycles > 0
    assert f"wrote {out}" in r.stdout
    assert "incomplete" not in r.stdout
    assert r.stderr == ""
    rf = read_run(out)
    assert rf.complete is True
    assert rf.summary["total_cycles"] == cycles
    assert rf.attrs["stop_reason"] == "complete"
    assert rf.attrs["wafer"] == "tiny"
    assert rf.attrs["trace_path"] == str(stream_trace)
    assert rf.attrs["trace_hash"] == T.load(stream_trace).content_hash()
    assert rf.summary["wavelets_sent"] == 16 and rf.summary["wavelets_received"] == 16
    assert rf.stuck == []
    assert rf.config() == hardware.load_preset("tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


def test_run_with_config_file_and_set(tmp_path, stream_trace):
    cfg = tmp_path / "w.toml"
    cfg.write_text('base = "tiny2"\n[fabric]\nqueue_depth_wavelets = 8\n')
    out = tmp_path / "run.h5"
    r = invoke("run", "--trace", stream_trace, "--config", cfg, "--set", "fabric.colors=4",
               "--quiet", "-o", out)
    assert r.exit_code == 0, (r.output, r.exception)
    assert r.stdout == "" and r.stderr == ""
    c = read_run(out).config()
    assert c.name == "tiny2" and c.colors == 4 and c.queue_depth_wavelets == 8
    assert c.hop_latency_cycles == 1


# ---- wse run: bad input ----------------------------------------------------------------------

def _write_bad_trace(path: Path, kind: str) -> Path:
    if kind == "off-mesh route":
        b = TraceBuilder(8, 8)
        b.route(6, 2, 0, R, [E])
        b.route(7, 2, 0, W, [E])
        b.assign(6, 2, 0, [send(0, 4, 0)])
    elif kind == "color out of range":
        b = TraceBuilder(8, 8)
        b.route(2, 3, 30, R, [E])
        b.route(3, 3, 30, W, [R])
        b.assign(2, 3, 0, [send(30, 4, 0)])
        b.assign(3, 3, 0, [recv(30, 4, 0)])
    elif kind == "too big":
        b = TraceBuilder(9, 8)
        b.assign(8, 0, 0, [compute(isa.KIND_ADD, 4, 0, 0, 0)])
    else:
        raise AssertionError(kind)
    b.build().save(path)
    return path


def _bad_run_case(tmp_path: Path, case: str, good: Path):
    """(arguments, fragments the error line must contain) for a bad `wse run` input."""
    t = tmp_path / f"{case.replace(' ', '_')}.h5"
    base = ["--trace", good, "--wafer", "tiny"]
    if case == "unknown preset":
        return ["--trace", good, "--wafer", "wse9"], ["unknown wafer preset 'wse9'"]
    if case == "malformed config":
        c = tmp_path / "bad.toml"
        c.write_text('base = "tiny"\n[fabric\n')
        return ["--trace", good, "--config", c], [str(c), "malformed TOML"]
    if case == "unknown set key":
        return [*base, "--set", "fabric.colour=3"], ["'fabric.colour'", "did you mean fabric.colors?"]
    if case == "bad set value":
        return [*base, "--set", "fabric.colors=0"], ["fabric.colors = 0 is out of range"]
    if case == "wafer and config":
        c = tmp_path / "ok.toml"
        c.write_text('base = "tiny"\n')
        return ["--trace", good, "--wafer", "tiny", "--config", c], ["not both"]
    if case == "missing trace":
        return ["--trace", t, "--wafer", "tiny"], [str(t), "no such trace file"]
    if case == "empty trace":
        t.write_bytes(b"")
        return ["--trace", t, "--wafer", "tiny"], [str(t), "empty"]
    if case == "corrupt trace":
        t.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 16)
        return ["--trace", t, "--wafer", "tiny"], [str(t)]
    if case == "text trace":
        t.write_text("hello\n")
        return ["--trace", t, "--wafer", "tiny"], [str(t)]
    if case == "truncated trace":
        data = good.read_bytes()
        t.write_bytes(data[: len(data) // 2])
        return ["--trace", t, "--wafer", "tiny"], [str(t), "truncated or corrupt"]
    if case == "off-mesh route":
        _write_bad_trace(t, case)
        return ["--trace", t, "--wafer", "tiny"], [str(t), "PE (7, 2)", "off the mesh"]
    if case == "color out of range":
        _write_bad_trace(t, case)
        return ["--trace", t, "--wafer", "tiny"], [str(t), "PE (2, 3)", "color 30", "out of range"]
    if case == "too big":
        _write_bad_trace(t, case)
        return ["--trace", t, "--wafer", "tiny"], [str(t), "9x8 does not fit wafer tiny"]
    if case == "bad threads":
        return [*base, "--threads", "0"], ["--threads must be at least 1"]
    raise AssertionError(case)


BAD_RUN_CASES = ["unknown preset", "malformed config", "unknown set key", "bad set value",
                 "wafer and config", "missing trace", "empty trace", "corrupt trace", "text trace",
                 "truncated trace", "off-mesh route", "color out of range", "too big", "bad threads"]


@pytest.mark.parametrize("case", BAD_RUN_CASES)
def test_run_bad_input_is_one_error_line_and_no_run_file(tmp_path, stream_trace, case):
    args, fragments = _bad_run_case(tmp_path, case, stream_trace)
    out = tmp_path / "out" / "run.h5"
    out.parent.mkdir()
    r = invoke("run", *args, "-o", out)
    assert_one_line_error(r, *fragments)
    assert list(out.parent.iterdir()) == []


def test_run_non_utf8_config_is_one_error_line(tmp_path, stream_trace):
    c = tmp_path / "bin.toml"
    c.write_bytes(b"\xff\xfe[wafer]\n")
    out = tmp_path / "run.h5"
    r = invoke("run", "--trace", stream_trace, "--config", c, "-o", out)
    assert_one_line_error(r, str(c))
    assert not out.exists()


def test_run_into_missing_directory(tmp_path, stream_trace):
    out = tmp_path / "missing" / "run.h5"
    r = invoke("run", "--trace", stream_trace, "--wafer", "tiny", "-o", out)
    assert_one_line_error(r, str(out), "does not exist")


def test_run_of_trace_with_nothing_to_do(tmp_path):
    t = tmp_path / "nothing.h5"
    TraceBuilder(4, 4).build().save(t)
    out = tmp_path / "run.h5"
    r = invoke("run", "--trace", t, "--wafer", "tiny", "-o", out)
    assert r.exit_code == 0, (r.output, r.exception)
    assert "status   complete" in r.stdout
    assert read_run(out).summary["total_cycles"] == 0


# ---- wse run: deadlock -----------------------------------------------------------------------

def test_run_deadlock_exits_3_and_marks_the_run_incomplete(tmp_path):
    t = tmp_path / "dead.h5"
    b = TraceBuilder(8, 8)
    b.route(3, 2, 5, W, [R])  # nothing upstream sends on color 5
    b.assign(3, 2, 0, [recv(5, 4, 0)])
    b.build().save(t)
    out = tmp_path / "run.h5"
    r = invoke("run", "--trace", t, "--wafer", "tiny", "--set", "engine.watchdog_cycles=50", "-o", out)
    assert r.exit_code == 3, (r.output, r.exception)
    assert "Traceback" not in r.output
    assert "status   deadlock" in r.stdout
    assert f"wrote {out} (marked incomplete)" in r.stdout
    err = r.stderr.strip().splitlines()
    assert err[0].startswith("error: run stopped (deadlock) after ")
    assert any("PE (3, 2)" in ln and "color 5" in ln for ln in err[1:]), r.stderr
    rf = read_run(out)
    assert rf.complete is False
    assert rf.attrs["stop_reason"] == "deadlock"
    assert rf.stuck and any(s.startswith("PE (3, 2) thread 0") for s in rf.stuck)
    assert all("PE (" in s for s in rf.stuck)
    # docs/model.md: the receive's setup cycles are the last progress (p = setup - 1); the run stops
    # at the end of cycle t = p + watchdog_cycles and total_cycles is t + 1.
    setup = hardware.load_preset("tiny").fabric_setup_cycles
    assert rf.summary["total_cycles"] == setup + 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dead.h5", "run.h5"]


# ---- the real console script -----------------------------------------------------------------

def _run_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(_wse_script()), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_console_script_bad_trace_prints_no_traceback(tmp_path):
    t = tmp_path / "corrupt.h5"
    t.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 4000)
    out = tmp_path / "run.h5"
    p = _run_script("run", "--trace", t, "--wafer", "tiny", "-o", out)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(t) in lines[0]
    assert not out.exists()


def test_console_script_bad_option_prints_no_traceback(tmp_path):
    out = tmp_path / "x.h5"
    p = _run_script("trace", "synth", "stream", "--mesh", "8x8", "--elements", "3", "-o", out)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert p.stderr.strip() == ("error: --elements does not apply to pattern stream "
                                "(it takes --wavelets, --hops)")
    assert not out.exists()


def test_console_script_run_succeeds(tmp_path, stream_trace):
    out = tmp_path / "run.h5"
    p = _run_script("run", "--trace", stream_trace, "--wafer", "tiny", "-o", out)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "status   complete" in p.stdout
    m = re.search(r"^cycles\s+([\d,]+)\s", p.stdout, re.M)
    assert read_run(out).summary["total_cycles"] == int(m.group(1).replace(",", ""))
