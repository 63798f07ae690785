"""A table-driven corpus of bad and edge-case inputs across the subcommands: each case asserts
exit code 2, one `error:` line naming the culprit, no traceback, and every input it protects
byte-identical afterwards (files.py: outputs are checked before any work)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wse.cli import cli
from wse.workload import synthetic


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Inputs every case may name: a trace, a run file, a config, a system file, a sweep spec."""
    d = tmp_path_factory.mktemp("inputs")
    trace = d / "t.h5"
    synthetic.stream(8, 8, 16, 7).save(trace)
    partial = d / "p.h5.partial"  # a trace whose name a temporary file could have taken
    shutil.copy(trace, partial)
    run = d / "r.h5"
    r = CliRunner().invoke(cli, ["run", "--trace", str(trace), "--wafer", "tiny", "-o", str(run), "--quiet"])
    assert r.exit_code == 0, r.output
    cfg = d / "c.toml"
    cfg.write_text('base = "tiny"\n[fabric]\nhop_latency_cycles = 1\n')
    system = d / "s.toml"
    system.write_text('base = "cs3"\n[system]\nwafer = "small"\n')
    spec = d / "sweep.toml"
    spec.write_text('[base]\nmodel = "tiny"\nsystem = "cs3"\n"system.wafer" = "small"\nprompt_len = 0\n')
    folder = d / "folder"
    folder.mkdir()
    model = ('name = "m"\nhidden_size = 64\nlayers = 2\nheads = 4\nkv_heads = 4\nhead_dim = 16\n'
             'ffn_size = 128\nvocab_size = 256\n')
    moe = "[moe]\nexperts = {}\nexperts_per_token = {}\nshared_experts = 0\nexpert_ffn_size = 64\n"
    (d / "moe0.toml").write_text(model + moe.format(0, 2))
    (d / "moe_k.toml").write_text(model + moe.format(4, 8))
    (d / "model_bad.toml").write_text(model + "colour = 3\n")
    spec_model = d / "sweep_model.toml"
    spec_model.write_text(f'[base]\nmodel = "{d / "moe_k.toml"}"\nsystem = "cs3"\n')
    frac = d / "frac.h5"
    shutil.copy(trace, frac)
    import h5py
    with h5py.File(frac, "r+") as f:
        f.attrs["mesh_width"] = 8.7
    return {"trace": trace, "partial": partial, "run": run, "config": cfg, "system": system, "spec": spec,
            "folder": folder, "missing": d / "no" / "such" / "out.h5", "dir": d, "moe0": d / "moe0.toml",
            "moe_k": d / "moe_k.toml", "model_bad": d / "model_bad.toml", "frac": frac, "spec_model": spec_model}


TINY_SYSTEM = ["system", "--model", "tiny", "--system", "{system}", "--context", "16", "--prompt-len", "0"]
TINY_RUN = ["run", "--model", "tiny", "--wafer", "small", "--context", "16"]

# (case id, argv with {name} placeholders, fragments the error line must hold)
CASES = [
    # class 1: an output that is an input is refused, whatever the command
    ("run -o the trace", ["run", "--trace", "{trace}", "--wafer", "tiny", "-o", "{trace}"], ["is an input"]),
    ("run -o the config", ["run", "--trace", "{trace}", "--config", "{config}", "-o", "{config}"], ["is an input"]),
    ("replay -o the trace", ["replay", "{trace}", "--wafer", "tiny", "-o", "{trace}"], ["is an input"]),
    ("export csv -o the run file", ["export", "{run}", "--format", "csv", "-o", "{run}"], ["is an input"]),
    ("export perfetto -o the run file", ["export", "{run}", "--format", "perfetto", "-o", "{run}"], ["is an input"]),
    ("plot -o the run file", ["plot", "{run}", "-o", "{run}"], ["{run}"]),
    ("trace gen -o the config", ["trace", "gen", "--op", "gemv", "--m", "64", "--n", "64", "--region", "8x8",
                                 "--config", "{config}", "-o", "{config}"], ["is an input"]),
    ("system -o its system file", TINY_SYSTEM + ["-o", "{system}"], ["is an input"]),
    ("system -o its model file", ["system", "--model", "{moe0}", "--system", "cs3", "-o", "{moe0}"], ["is an input"]),
    ("sweep -o a model file it names", ["sweep", "{spec_model}", "-o", "{moe_k}"], ["is an input"]),
    # an output that exists stays as it was when an option is bad (checked before it is replaced)
    ("system bad --jobs keeps -o", TINY_SYSTEM + ["--jobs", "-1", "-o", "{run}"], ["--jobs"]),
    ("system unknown model keeps -o", ["system", "--model", "nope", "--system", "cs3", "-o", "{run}"], ["nope"]),
    ("system bad --wafers keeps -o", TINY_SYSTEM + ["--wafers", "x", "-o", "{run}"], ["--wafers"]),
    ("system bad --context keeps -o", TINY_SYSTEM + ["--context", "0", "-o", "{run}"], ["--context"]),
    ("system --cache a file keeps -o", TINY_SYSTEM + ["--cache", "{trace}", "-o", "{run}"], ["not a directory"]),
    ("system --generate beyond 128k keeps -o", TINY_SYSTEM[:-4] + ["--context", "131072", "--generate", "8",
                                                                 "--prompt-len", "0", "-o", "{run}"],
     ["--generate"]),
    ("run bad --snapshot-seconds keeps -o", ["run", "--trace", "{trace}", "--wafer", "tiny", "--snapshot-seconds",
                                              "0", "-o", "{run}"], ["--snapshot-seconds"]),
    ("sweep -o its spec", ["sweep", "{spec}", "-o", "{spec}"], ["is an input"]),
    ("sweep -o a run file", ["sweep", "{spec}", "-o", "{run}"], ["not a sweep file"]),
    # class 5: an output that cannot be written is refused before any work
    ("run into a missing folder", ["run", "--trace", "{trace}", "--wafer", "tiny", "-o", "{missing}"],
     ["does not exist"]),
    ("run --model into a missing folder", TINY_RUN + ["-o", "{missing}"], ["does not exist"]),
    ("replay into a missing folder", ["replay", "{trace}", "--wafer", "tiny", "-o", "{missing}"], ["does not exist"]),
    ("synth into a missing folder", ["trace", "synth", "stream", "--mesh", "8x8", "-o", "{missing}"],
     ["does not exist"]),
    ("system into a missing folder", TINY_SYSTEM + ["-o", "{missing}"], ["does not exist"]),
    ("sweep into a missing folder", ["sweep", "{spec}", "-o", "{missing}"], ["does not exist"]),
    ("export into a missing folder", ["export", "{run}", "--format", "csv", "-o", "{missing}"], ["does not exist"]),
    ("run -o a folder", ["run", "--trace", "{trace}", "--wafer", "tiny", "-o", "{folder}"],
     ["--output", "is a directory"]),
    ("system -o a folder", TINY_SYSTEM + ["-o", "{folder}"], ["--output", "is a directory"]),
    ("export -o a folder", ["export", "{run}", "--format", "csv", "-o", "{folder}"], ["--output", "is a directory"]),
    ("plot -o a file", ["plot", "{run}", "-o", "{trace}"], ["--output", "is a file"]),
    ("run -o ''", ["run", "--trace", "{trace}", "--wafer", "tiny", "-o", ""], ["-o", "empty"]),
    ("synth -o ''", ["trace", "synth", "stream", "--mesh", "8x8", "-o", ""], ["-o", "empty"]),
    ("system -o ''", TINY_SYSTEM + ["-o", ""], ["-o", "empty"]),
    ("sweep -o ''", ["sweep", "{spec}", "-o", ""], ["-o", "empty"]),
    ("export -o ''", ["export", "{run}", "--format", "csv", "-o", ""], ["-o", "empty"]),
    ("plot -o ''", ["plot", "{run}", "-o", ""], ["-o", "empty"]),
    # class 4: numbers that are not numbers, at the boundary, with the allowed range
    ("run --snapshot-seconds 0", ["run", "--trace", "{trace}", "--wafer", "tiny", "--snapshot-seconds", "0",
                                  "-o", "{dir}/o.h5"], ["--snapshot-seconds"]),
    ("run --snapshot-seconds -5", ["run", "--trace", "{trace}", "--wafer", "tiny", "--snapshot-seconds", "-5",
                                   "-o", "{dir}/o.h5"], ["--snapshot-seconds"]),
    ("run --snapshot-seconds nan", ["run", "--trace", "{trace}", "--wafer", "tiny", "--snapshot-seconds", "nan",
                                    "-o", "{dir}/o.h5"], ["--snapshot-seconds"]),
    ("run --snapshot-seconds inf", ["run", "--trace", "{trace}", "--wafer", "tiny", "--snapshot-seconds", "inf",
                                    "-o", "{dir}/o.h5"], ["--snapshot-seconds"]),
    ("check --wafers without --full", ["check", "--model", "tiny", "--wafers", "2"], ["--wafers", "--full"]),
    ("run --token past the vocabulary", ["run", "--model", "tiny", "--wafer", "small", "--token", "1024",
                                         "-o", "{dir}/o.h5"], ["--token 1024", "vocabulary"]),
    ("run --token + batch past the vocabulary", ["run", "--model", "tiny", "--wafer", "small", "--token", "1022",
                                                 "--batch", "3", "-o", "{dir}/o.h5"], ["--token 1022 with --batch 3"]),
    ("run --expert-skew nan", ["run", "--model", "tiny-moe", "--wafer", "small", "--expert-skew", "nan",
                               "-o", "{dir}/o.h5"], ["--expert-skew"]),
    ("run --expert-skew inf", ["run", "--model", "tiny-moe", "--wafer", "small", "--expert-skew", "inf",
                               "-o", "{dir}/o.h5"], ["--expert-skew"]),
    ("run --expert-skew -1", ["run", "--model", "tiny-moe", "--wafer", "small", "--expert-skew", "-1",
                              "-o", "{dir}/o.h5"], ["--expert-skew"]),
    ("system --expert-skew nan", TINY_SYSTEM + ["--expert-skew", "nan", "-o", "{dir}/o.h5"], ["--expert-skew"]),
    ("system --expert-skew inf", TINY_SYSTEM + ["--expert-skew", "inf", "-o", "{dir}/o.h5"], ["--expert-skew"]),
    ("run --groups 0", TINY_RUN + ["--groups", "0", "-o", "{dir}/o.h5"], ["--groups"]),
    ("run --batch 0", TINY_RUN + ["--batch", "0", "-o", "{dir}/o.h5"], ["--batch"]),
    ("system --batch 0", TINY_SYSTEM + ["--batch", "0", "-o", "{dir}/o.h5"], ["--batch"]),
    ("system --context 0", TINY_SYSTEM + ["--context", "0", "-o", "{dir}/o.h5"], ["--context"]),
    ("system --context beyond 128k", TINY_SYSTEM + ["--context", "200000", "-o", "{dir}/o.h5"], ["--context"]),
    ("system --prompt-len -1", TINY_SYSTEM + ["--prompt-len", "-1", "-o", "{dir}/o.h5"], ["--prompt-len"]),
    ("system --wafers 0", TINY_SYSTEM + ["--wafers", "0", "-o", "{dir}/o.h5"], ["--wafers"]),
    ("system --wafers x", TINY_SYSTEM + ["--wafers", "x", "-o", "{dir}/o.h5"], ["--wafers"]),
    ("system --jobs -1", TINY_SYSTEM + ["--jobs", "-1", "-o", "{dir}/o.h5"], ["--jobs"]),
    ("system --threads 0", TINY_SYSTEM + ["--threads", "0", "-o", "{dir}/o.h5"], ["--threads"]),
    ("system --generate 0", TINY_SYSTEM + ["--generate", "0", "-o", "{dir}/o.h5"], ["--generate"]),
    ("system --attention-block -1", TINY_SYSTEM + ["--attention-block", "-1", "-o", "{dir}/o.h5"],
     ["--attention-block"]),
    ("system --experts-per-region -1", TINY_SYSTEM + ["--experts-per-region", "-1", "-o", "{dir}/o.h5"],
     ["--experts-per-region"]),
    ("system --set unknown key", TINY_SYSTEM + ["--set", "fabric.nope=1", "-o", "{dir}/o.h5"], ["fabric.nope"]),
    ("system --set out of range", TINY_SYSTEM + ["--set", "fabric.hop_latency_cycles=0", "-o", "{dir}/o.h5"],
     ["fabric.hop_latency_cycles"]),
    ("system --set no value", TINY_SYSTEM + ["--set", "fabric.hop_latency_cycles", "-o", "{dir}/o.h5"], ["--set"]),
    ("system --set cost out of range", TINY_SYSTEM + ["--set", "cost.utilization=2", "-o", "{dir}/o.h5"],
     ["cost.utilization"]),
    ("system --cache and --no-cache", TINY_SYSTEM + ["--cache", "{dir}/c", "--no-cache", "-o", "{dir}/o.h5"],
     ["--cache", "--no-cache"]),
    ("system --cache a file", TINY_SYSTEM + ["--cache", "{trace}", "-o", "{dir}/o.h5"], ["not a directory"]),
    ("system --scheduler ''", TINY_SYSTEM + ["--scheduler", " ", "-o", "{dir}/o.h5"], ["--scheduler"]),
    ("system unknown model", ["system", "--model", "nope", "--system", "cs3", "-o", "{dir}/o.h5"], ["nope"]),
    ("system unknown preset", ["system", "--model", "tiny", "--system", "nope", "-o", "{dir}/o.h5"], ["nope"]),
    ("system a trace as system file", ["system", "--model", "tiny", "--system", "{trace}", "-o", "{dir}/o.h5"],
     ["{trace}"]),
    ("sweep a missing spec", ["sweep", "{dir}/none.toml", "-o", "{dir}/o.h5"], ["none.toml"]),
    ("sweep a trace as spec", ["sweep", "{trace}", "-o", "{dir}/o.h5"], ["{trace}"]),
    ("cache info on a file", ["cache", "info", "--cache", "{trace}"], ["--cache"]),
    # class 4 and 6: spec fields and names checked at the boundary, messages naming what to change
    ("model TOML with 0 experts", ["run", "--model", "{moe0}", "--wafer", "small", "-o", "{dir}/o.h5"],
     ["moe.experts"]),
    ("model TOML top-k beyond experts", ["run", "--model", "{moe_k}", "--wafer", "small", "-o", "{dir}/o.h5"],
     ["experts_per_token"]),
    ("model TOML unknown field", ["run", "--model", "{model_bad}", "--wafer", "small", "-o", "{dir}/o.h5"],
     ["{model_bad}"]),
    ("trace mesh_width 8.7", ["run", "--trace", "{frac}", "--wafer", "tiny", "-o", "{dir}/o.h5"],
     ["mesh_width", "8.7"]),
    ("run --groups beyond the region", TINY_RUN + ["--groups", "1000", "-o", "{dir}/o.h5"], ["--groups 1000"]),
    ("run --groups with --algo chain", TINY_RUN + ["--groups", "2", "--algo", "chain", "-o", "{dir}/o.h5"],
     ["--groups", "two-level"]),
    ("run --algo flat", TINY_RUN + ["--algo", "flat", "-o", "{dir}/o.h5"], ["--algo 'flat'", "auto, two-level, chain"]),
    ("kernel gemv --algo auto", ["run", "--op", "gemv", "--m", "64", "--n", "64", "--region", "8x8", "--wafer", "small",
                                 "--algo", "auto", "-o", "{dir}/o.h5"], ["auto"]),
    ("system --allreduce flat", TINY_SYSTEM + ["--allreduce", "flat", "-o", "{dir}/o.h5"], ["--allreduce"]),
    ("kernel --groups beyond the region", ["run", "--op", "gemv", "--m", "256", "--n", "256", "--region", "16x16",
                                           "--wafer", "small", "--groups", "17", "-o", "{dir}/o.h5"], ["--groups 17"]),
    ("run --wafer ''", TINY_RUN[:3] + ["--wafer", "", "-o", "{dir}/o.h5"], ["--wafer", "empty"]),
    ("run --config ''", ["run", "--trace", "{trace}", "--config", "", "-o", "{dir}/o.h5"], ["--config"]),
    ("system --system a wafer preset", ["system", "--model", "tiny", "--system", "small", "-o", "{dir}/o.h5"],
     ["--system", "wafer preset", "system.wafer"]),
    ("synth --colors 200", ["trace", "synth", "neighbor", "--mesh", "256x4", "--colors", "200", "-o", "{dir}/n.h5"],
     ["--colors 200"]),
    ("synth --colors 1", ["trace", "synth", "neighbor", "--mesh", "8x8", "--colors", "1", "-o", "{dir}/n.h5"],
     ["--colors 1"]),
    ("prefill --prompt-len too long", ["run", "--model", "tiny", "--wafer", "small", "--phase", "prefill",
                                       "--prompt-len", "100000", "-o", "{dir}/o.h5"], ["--prompt-len 100000"]),
]


@pytest.mark.parametrize("case, argv, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_touches_no_input(files, case, argv, fragments):
    sub = {k: str(v) for k, v in files.items()}
    args = [a.format(**sub) for a in argv]
    protected = {p: p.read_bytes() for p in files.values() if p.is_file()}
    before = {p.name for p in files["dir"].iterdir()}
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f.format(**sub) in lines[0], (f, lines[0])
    for p, data in protected.items():
        assert p.read_bytes() == data, f"{p} changed"
    assert {p.name for p in files["dir"].iterdir()} <= before | {"c"}, "a file was left behind"


@pytest.mark.parametrize("argv, target", [
    (TINY_SYSTEM, "wse.system.compare.run_system"),
    (TINY_RUN, "wse.workload.jobs.run_model"),
    (["run", "--trace", "{trace}", "--wafer", "tiny"], "wse.engine.run.simulate"),
], ids=["system", "run --model", "run --trace"])
def test_an_interrupted_run_never_leaves_a_previous_complete_file(files, tmp_path, monkeypatch, argv, target):
    """Class 2: once a command starts writing OUT, OUT never claims to be its complete result
    until it is — an earlier complete file at that name is gone, not left standing."""
    out = tmp_path / "out.h5"
    shutil.copy(files["run"], out)  # a complete run file from an earlier run
    module, name = target.rsplit(".", 1)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    import importlib
    monkeypatch.setattr(importlib.import_module(module), name, interrupted)
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv] + ["-o", str(out)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 130, r.output
    if out.exists():
        import h5py
        with h5py.File(out) as f:
            assert not f.attrs["complete"]
    assert not list(tmp_path.glob(".wse-*"))  # no temporary left behind


def test_a_trace_named_like_a_temporary_file_survives_a_run(files, tmp_path):
    before = files["partial"].read_bytes()
    out = files["partial"].with_name("p.h5")
    r = CliRunner().invoke(cli, ["run", "--trace", str(files["partial"]), "--wafer", "tiny", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert files["partial"].read_bytes() == before and out.exists()
    out.unlink()


# ---- class 3: damaged run files ------------------------------------------------------------------

def _replace(group: str, name: str, data):
    def damage(f):
        del f[group][name]
        f[group].create_dataset(name, data=data)
    return damage


def _overwrite(path: Path) -> None:
    b = bytearray(path.read_bytes())
    n = len(b)
    b[n // 3: n // 3 + 4096] = bytes((i * 151 + 7) % 256 for i in range(4096))  # fixed garbage mid-file
    path.write_bytes(bytes(b))


DAMAGES = {  # name -> (h5py damage or a whole-file damage, what the error names)
    "no config attribute": (lambda f: f.attrs.__delitem__("config"), "config"),
    "config not TOML": (lambda f: f.attrs.__setitem__("config", "[[[ not toml"), "config"),
    "no schema_version": (lambda f: f.attrs.__delitem__("schema_version"), "schema_version"),
    "schema_version 9": (lambda f: f.attrs.__setitem__("schema_version", 9), "schema_version"),
    "summary a dataset": (lambda f: (f.__delitem__("summary"), f.create_dataset("summary", data=1)), "/summary"),
    "no /pe": (lambda f: f.__delitem__("pe"), "/pe"),
    "no /link": (lambda f: f.__delitem__("link"), "/link"),
    "pe counter missing": (lambda f: f["pe"].__delitem__("busy_cycles"), "/pe/busy_cycles"),
    "pe counter misshapen": (_replace("pe", "busy_cycles", np.zeros(3)), "/pe/busy_cycles"),
    "link counter misshapen": (_replace("link", "wavelets", np.zeros((2, 2))), "/link/wavelets"),
    "pe counter text": (_replace("pe", "flops", np.array(["x"] * 4, dtype=object).astype("S")), "/pe/flops"),
    "total_cycles NaN": (_replace("summary", "total_cycles", np.nan), "total_cycles"),
    "total_cycles text": (_replace("summary", "total_cycles", "lots"), "total_cycles"),
    "total_cycles missing": (lambda f: f["summary"].__delitem__("total_cycles"), "total_cycles"),
    "no trace_path": (lambda f: f.attrs.__delitem__("trace_path"), "trace_path"),
    "complete as text": (lambda f: f.attrs.__setitem__("complete", "yes"), "complete"),
    "stop_reason unknown": (lambda f: f.attrs.__setitem__("stop_reason", "tired"), "stop_reason"),
    "mesh width text": (lambda f: f.attrs.__setitem__("trace_mesh_width", "8"), "trace_mesh_width"),
    "wall_seconds NaN": (lambda f: f.attrs.__setitem__("wall_seconds", np.nan), "wall_seconds"),
    "ops columns ragged": (_replace("ops", "name", np.array(["a"] * 99, dtype=object).astype("S")), "/ops"),
    "bytes overwritten": (_overwrite, "r.h5"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "r.h5"),
    "empty": (lambda p: p.write_bytes(b""), "r.h5"),
    "not HDF5": (lambda p: p.write_text("hello"), "r.h5"),
}
READERS = {
    "report": lambda p, d: ["report", p],
    "report --json": lambda p, d: ["report", p, "--json"],
    "plot": lambda p, d: ["plot", p, "-o", d / "plots"],
    "export csv": lambda p, d: ["export", p, "--format", "csv", "-o", d / "x.csv"],
    "export perfetto": lambda p, d: ["export", p, "--format", "perfetto", "-o", d / "x.json"],
    "compare": lambda p, d: ["compare", p, p],
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_run_file_is_one_clear_error_for_every_reader(files, tmp_path, damage, reader):
    import h5py
    p = tmp_path / "r.h5"
    shutil.copy(files["run"], p)
    fn, names = DAMAGES[damage]
    if damage in ("bytes overwritten", "truncated", "empty", "not HDF5"):
        fn(p)
    else:
        with h5py.File(p, "r+") as f:
            fn(f)
    before = p.read_bytes()
    r = CliRunner().invoke(cli, [str(a) for a in READERS[reader](p, tmp_path)])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    assert str(p) in lines[0] and names in lines[0], lines[0]
    assert p.read_bytes() == before and not (tmp_path / "x.csv").exists() and not (tmp_path / "plots").exists()


def test_names_that_are_not_utf8_work_and_leave_nothing_behind(tmp_path):
    """Class 7: a file name that is not valid UTF-8 (surrogate-escaped by Python) is written,
    read and reported, its text stored escaped; outputs get the usual file mode."""
    import os
    import stat
    trace = Path(os.fsdecode(bytes(tmp_path) + b"/bad\xff.h5"))
    run = Path(os.fsdecode(bytes(tmp_path) + b"/run\xfe.h5"))
    import subprocess
    import sys
    for argv in (["trace", "synth", "stream", "--mesh", "8x8", "-o", trace],
                 ["run", "--trace", trace, "--wafer", "tiny", "-o", run, "--quiet"],
                 ["report", run]):  # a real process: its streams carry such names as a terminal does
        r = subprocess.run([sys.executable, "-m", "wse.cli", *map(os.fsencode, argv)], capture_output=True)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert b"bad\\xff.h5" in r.stdout
    assert not list(tmp_path.glob(".wse-*"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(run.stat().st_mode) == 0o666 & ~umask


# ---- damaged traces ------------------------------------------------------------------------------

def _replace_root(name: str, data):
    def damage(f):
        del f[name]
        f.create_dataset(name, data=data)
    return damage


TRACE_DAMAGES = {
    "no format attribute": (lambda f: f.attrs.__delitem__("format"), "format"),
    "format_version 99": (lambda f: f.attrs.__setitem__("format_version", 99), "format_version"),
    "mesh_height missing": (lambda f: f.attrs.__delitem__("mesh_height"), "mesh_height"),
    "mesh_width text": (lambda f: f.attrs.__setitem__("mesh_width", "eight"), "mesh_width"),
    "mesh_width NaN": (lambda f: f.attrs.__setitem__("mesh_width", np.nan), "mesh_width"),
    "no /routes": (lambda f: f.__delitem__("routes"), "routes"),
    "no /pe_program": (lambda f: f.__delitem__("pe_program"), "pe_program"),
    "pe_program floats": (_replace_root("pe_program", np.zeros((8, 8, 2))), "pe_program"),
    "bytes overwritten": (_overwrite, "t.h5"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "t.h5"),
    "empty": (lambda p: p.write_bytes(b""), "t.h5"),
}


@pytest.mark.parametrize("command", ["run", "replay"])
@pytest.mark.parametrize("damage", list(TRACE_DAMAGES))
def test_a_damaged_trace_is_one_clear_error(files, tmp_path, damage, command):
    import h5py
    p = tmp_path / "t.h5"
    shutil.copy(files["trace"], p)
    fn, names = TRACE_DAMAGES[damage]
    if damage in ("bytes overwritten", "truncated", "empty"):
        fn(p)
    else:
        with h5py.File(p, "r+") as f:
            fn(f)
    before = p.read_bytes()
    out = tmp_path / "o.h5"
    argv = (["run", "--trace", p] if command == "run" else ["replay", p]) + ["--wafer", "tiny", "-o", out]
    r = CliRunner().invoke(cli, [str(a) for a in argv])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    assert str(p) in lines[0] and names in lines[0], lines[0]
    assert p.read_bytes() == before and not out.exists()


@pytest.mark.parametrize("damage", ["no points group", "ragged columns", "2-D column", "axes not JSON",
                                    "axes not a list", "bytes overwritten", "truncated"])
@pytest.mark.parametrize("reader", ["plot", "export", "resume"])
def test_a_damaged_sweep_file_is_one_clear_error(tmp_path, damage, reader):
    import h5py
    spec = tmp_path / "s.toml"
    spec.write_text('[base]\nmodel = "tiny"\nsystem = "cs3"\n"system.wafer" = "small"\nprompt_len = 0\n'
                    'context = 16\n')
    p = tmp_path / "s.h5"
    assert CliRunner().invoke(cli, ["sweep", str(spec), "-o", str(p), "--no-cache"]).exit_code == 0
    if damage in ("bytes overwritten", "truncated"):
        _overwrite(p) if damage == "bytes overwritten" else p.write_bytes(p.read_bytes()[:2048])
    else:
        with h5py.File(p, "r+") as f:
            if damage == "no points group":
                del f["points"]
            elif damage == "axes not JSON":
                f.attrs["axes"] = "oops"
            elif damage == "axes not a list":
                f.attrs["axes"] = "5"
            elif damage == "ragged columns":
                del f["points/batch"]
                f["points"].create_dataset("batch", data=np.arange(5))
            else:
                del f["points/batch"]
                f["points"].create_dataset("batch", data=np.zeros((1, 2)))
    before = p.read_bytes()
    argv = {"plot": ["plot", p, "-o", tmp_path / "plots"], "export": ["export", p, "--format", "csv", "-o",
                                                                       tmp_path / "x.csv"],
            "resume": ["sweep", spec, "-o", p, "--no-cache"]}[reader]
    r = CliRunner().invoke(cli, [str(a) for a in argv])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(p) in lines[0], r.output
    assert p.read_bytes() == before


@pytest.mark.parametrize("argv", [
    TINY_RUN + ["--groups", "1000"],
    ["run", "--trace", "{partial}", "--wafer", "tiny", "--set", "fabric.queue_depth_wavelets=0"],
    ["run", "--trace", "{frac}", "--wafer", "tiny"],
    ["system", "--model", "tiny", "--system", "cs3", "--set", 'system.wafer="small"', "--wafers", "3",
     "--context", "16", "--prompt-len", "0"],
], ids=["run --model, bad --groups", "run --trace, bad --set", "run, damaged trace", "system, too many wafers"])
def test_bad_input_found_while_planning_keeps_the_old_output(files, tmp_path, argv):
    out = tmp_path / "out.h5"
    shutil.copy(files["run"], out)
    before = out.read_bytes()
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv] + ["-o", str(out)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and r.stderr.startswith("error: "), r.output
    assert out.read_bytes() == before
