"""Run files: every schema field round-trips; kills leave readable incomplete files; report,
plot, export, compare and replay work on a small run."""
import json
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from wse import hardware, isa
from wse.cli import cli
from wse.engine.run import simulate
from wse.results.store import SCHEMA_VERSION, RunInfo, read_run, write_run
from wse.workload import synthetic as syn

ROOT_ATTRS = ("schema_version", "wse_version", "created", "complete", "config", "wafer", "trace_path",
              "trace_hash", "trace_mesh_width", "trace_mesh_height", "seed", "threads", "wall_seconds",
              "stop_reason")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A small complete run file of a tagged synthetic trace and its result."""
    d = tmp_path_factory.mktemp("run")
    cfg = hardware.load_preset("tiny")
    tr = syn.chain_reduce(8, 8, 300)
    res = simulate(tr, cfg)
    path = d / "run.h5"
    write_run(path, res, cfg, RunInfo("chain.h5", tr.content_hash(), (8, 8), res.threads, res.wall_seconds))
    trace_path = d / "chain.h5"
    tr.save(trace_path)
    return path, res, cfg, trace_path


def test_every_schema_field_round_trips(small_run):
    path, res, cfg, _ = small_run
    rf = read_run(path)
    assert set(ROOT_ATTRS) <= set(rf.attrs)
    assert rf.attrs["schema_version"] == SCHEMA_VERSION and rf.complete and rf.attrs["stop_reason"] == "complete"
    assert rf.config() == cfg
    assert rf.summary["total_cycles"] == res.total_cycles
    for i, name in enumerate(isa.PE_COUNTER_NAMES):
        assert np.array_equal(rf.pe[name], res.pe_counters[:, :, i]), name
    for i, name in enumerate(isa.LINK_COUNTER_NAMES):
        assert np.array_equal(rf.link[name], res.link_counters[:, :, :, i]), name
    for group, data in (("timeline", res.timeline), ("ops", res.ops), ("events", res.events)):
        table = rf.tables[group]
        for k, v in data.items():
            key = "regions" if k == "region_names" else k
            assert np.array_equal(np.asarray(table[key]).astype(np.asarray(v).dtype), np.asarray(v)), (group, k)


def test_a_narrowed_result_writes_the_same_file(small_run, tmp_path):
    """A result whose counters came back narrow (a pool worker's, the stage cache's) writes the
    same int64 datasets and summary as the result it was narrowed from."""
    path, res, cfg, _ = small_run
    narrow = res.narrowed()
    assert narrow.pe_counters.dtype.itemsize < 8 and narrow.link_counters.dtype.itemsize < 8
    other = tmp_path / "narrow.h5"
    write_run(other, narrow, cfg, RunInfo("chain.h5", "", (8, 8), res.threads, res.wall_seconds))
    a, b = read_run(path), read_run(other)
    assert a.summary == b.summary
    for name in isa.PE_COUNTER_NAMES:
        assert b.pe[name].dtype == np.int64 and np.array_equal(a.pe[name], b.pe[name]), name
    for name in isa.LINK_COUNTER_NAMES:
        assert b.link[name].dtype == np.int64 and np.array_equal(a.link[name], b.link[name]), name


def test_every_dataset_has_units_description_and_dims(small_run):
    path = small_run[0]
    missing = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and not {"units", "description", "dims"} <= set(obj.attrs):
            missing.append(name)
    with h5py.File(path, "r") as f:
        f.visititems(visit)
        assert f["pe/busy_cycles"].compression == "gzip" and f["pe/busy_cycles"].shuffle
    assert missing == []


def test_timeline_and_ops_account_for_every_cycle_and_flop(small_run):
    _, res, _, _ = small_run
    tl, ops = res.timeline, res.ops
    assert tl["busy_pe_cycles"].sum() == res.pe("busy_cycles").sum()
    assert tl["flops"].sum() == res.pe("flops").sum()
    assert tl["region_busy_pe_cycles"].sum() == res.pe("busy_cycles").sum()
    assert tl["cycle"][-1] == res.total_cycles
    # one tag (the pattern) covers every op
    assert ops["flops"].sum() == res.pe("flops").sum() and ops["ops"].sum() == res.pe("ops_completed").sum()
    assert ops["end_cycle"].max() == res.total_cycles
    ev = res.events
    assert len(ev["x"]) > 0 and (ev["end_cycle"] > ev["start_cycle"]).all()


def test_long_runs_keep_an_exact_timeline_by_merging_intervals():
    cfg = hardware.load_preset("tiny")
    res = simulate(syn.stream(8, 1, 20000, 7), cfg)
    tl = res.timeline
    assert len(tl["cycle"]) <= 1025
    assert np.all(np.diff(tl["cycle"]) > 0) and tl["cycle"][-1] == res.total_cycles
    assert tl["busy_pe_cycles"].sum() == res.pe("busy_cycles").sum()


def _long_run(tmp_path, side=256, snapshot_s=0.5, poll_s=0.5):
    trace = tmp_path / "long.h5"
    syn.neighbor(side, side, 12000, 4).save(trace)  # side 256: ~25 s, long enough to interrupt
    out = tmp_path / "long-run.h5"
    proc = subprocess.Popen([sys.executable, "-m", "wse.cli", "run", "--trace", str(trace), "--wafer", "wse3",
                             "--snapshot-seconds", str(snapshot_s), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for a snapshot with measurements in it
        time.sleep(poll_s)
        assert proc.poll() is None, proc.communicate()
        if out.exists():
            try:
                if read_run(out).summary.get("total_cycles", 0) > 0:
                    break
            except Exception:
                pass
    return proc, out


def test_a_killed_run_leaves_a_readable_incomplete_file(tmp_path):
    proc, out = _long_run(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rf = read_run(out)
    assert not rf.complete and rf.attrs["stop_reason"] == "running"
    assert 0 < rf.summary["total_cycles"] < 12000
    assert rf.pe["busy_cycles"].sum() > 0


def test_ctrl_c_flushes_what_was_measured(tmp_path):
    # 60 x 60 PEs: ~3-6 s of 12,000 cycles on the serial kernel (below PARALLEL_MIN_PES), in chunks of
    # at most a quarter second; interrupted a few tenths of a second in, at its first snapshot
    proc, out = _long_run(tmp_path, side=60, snapshot_s=0.2, poll_s=0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    rf = read_run(out)
    assert not rf.complete and rf.attrs["stop_reason"] == "interrupted"
    assert rf.summary["total_cycles"] > 0


def test_report_plot_export_compare_replay(small_run, tmp_path):
    path, res, cfg, trace_path = small_run
    r = invoke("report", path)
    assert r.exit_code == 0 and "longest ops" in r.output and "chain-reduce" in r.output
    r = invoke("report", path, "--json")
    rep = json.loads(r.output)
    assert rep["metrics"]["total_cycles"]["value"] == res.total_cycles and rep["bottlenecks"]["ops"]
    r = invoke("plot", path, "-o", tmp_path / "plots")
    assert r.exit_code == 0, r.output
    from matplotlib.image import imread
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {"pe_utilization.png", "link_traffic.png", "timeline.png", "ops.png"}
    for p in pngs:
        img = imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img[..., :3].std() > 0.01, p.name
    r = invoke("export", path, "--format", "perfetto", "-o", tmp_path / "t.json")
    assert r.exit_code == 0
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert slices and all(e["dur"] > 0 for e in slices)
    r = invoke("export", path, "--format", "csv", "-o", tmp_path / "s.csv")
    assert r.exit_code == 0 and (tmp_path / "s-ops.csv").read_text().startswith("tag,name,layer,kind")
    # replay on another configuration, then compare the two
    r = invoke("replay", trace_path, "--wafer", "tiny2", "--set", "fabric.hop_latency_cycles=3", "-o", tmp_path / "r.h5")
    assert r.exit_code == 0, r.output
    r = invoke("compare", path, tmp_path / "r.h5", "--json")
    cmp = json.loads(r.output)
    row = next(x for x in cmp["rows"] if x["metric"] == "total_cycles")
    assert row["values"][0] == res.total_cycles and row["ratios"][1] > 1
    r = invoke("compare", path, tmp_path / "r.h5")
    assert "[1]/[0]" in r.output


def test_shipped_examples_replay(tmp_path):
    from pathlib import Path
    examples = sorted((Path(__file__).parent.parent / "traces" / "examples").glob("*.h5"))
    assert examples
    r = invoke("replay", examples[0], "--wafer", "wse2", "-o", tmp_path / "x.h5", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["complete"]


def test_bad_run_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("nope")
    for args in (["report", bad], ["plot", bad, "-o", tmp_path / "p"], ["compare", bad],
                 ["export", bad, "--format", "csv", "-o", tmp_path / "c.csv"]):
        r = invoke(*args)
        assert r.exit_code == 2 and "not a readable HDF5 run file" in r.output and "Traceback" not in r.output


def test_run_files_open_in_xarray_with_named_dimensions(tmp_path, tiny, monkeypatch):
    """Dimension scales: xarray (h5netcdf) shows (y, x) and (y, x, port), not phony dimensions;
    open_run gives one labelled Dataset, for files with or without scales."""
    import xarray as xr

    from wse.cli import cli
    from wse.results import open_run
    from wse.results import store
    from wse.workload import synthetic
    t = tmp_path / "t.h5"
    synthetic.neighbor(8, 8, 8).save(t)
    out = tmp_path / "r.h5"
    r = CliRunner().invoke(cli, ["run", "--trace", str(t), "--wafer", "tiny", "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    with xr.open_dataset(out, group="pe", engine="h5netcdf") as pe:
        assert pe["busy_cycles"].dims == ("y", "x") and pe.sizes == {"y": 8, "x": 8}
    with xr.open_dataset(out, group="link", engine="h5netcdf") as link:
        assert link["wavelets"].dims == ("y", "x", "port")
        assert [str(p) for p in link["port"].values] == ["north", "south", "east", "west"]
    rf = store.read_run(out)  # the scales are not counters
    assert set(rf.pe) == {n for n, *_ in isa.PE_COUNTERS} | {"idle_cycles"}
    ds = open_run(out)
    assert ds["busy_cycles"].dims == ("y", "x") and ds["link_wavelets"].dims == ("y", "x", "port")
    assert int(ds["total_cycles"]) == rf.summary["total_cycles"] and ds["flops"].attrs["units"]
    assert int(ds["link_wavelets"].sel(port="east").sum()) == int(rf.link["wavelets"][:, :, 2].sum())
    old = tmp_path / "old.h5"  # a file written before dimension scales existed
    monkeypatch.setattr(store, "attach_scales", lambda g: None)
    store.write_run(old, simulate(synthetic.neighbor(8, 8, 8), tiny), tiny, store.RunInfo(str(t), "", (8, 8), 1, 0.0))
    with h5py.File(old) as f:
        assert "x" not in f["pe"]
    assert open_run(old)["busy_cycles"].dims == ("y", "x")
