"""Scale-out: the stage cache (keys, atomic entries, damage), Dask fan-out (same results for any
worker count, a dead worker costs a retry), `wse sweep` (table, resume, plots, CSV) and
`wse cache` (docs/scale-out.md)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from wse import engine, isa
from wse.cli import cli
from wse.engine.run import simulate
from wse.errors import WseError
from wse.results.sweep import pareto, read_table
from wse.system import cache as cache_mod
from wse.system.cache import StageCache, canonical, content_key
from wse.system.config import load_system
from wse.system.pool import WORKER_MALLOC, Fanout, Work, stage_key
from wse.system.progress import Progress
from wse.system.sweep import SweepError, load_spec
from wse.system.wafers import run_decode, wafer_plans
from wse.workload.chain import chain_of
from wse.workload.compose import build_stage, stages
from wse.workload.models import load_model
from wse.workload.params import DecodeParams
from wse.workload.synthetic import neighbor

MOE = DecodeParams(batch=2, context=16, moe_mapping="regions", experts_per_region=1)


@pytest.fixture(scope="module")
def small_system():
    return load_system("cs3", ['system.wafer="small"'])


# a 16 x 16 mesh: tiny-moe's 4-wafer MOE layout keeps its slots (embedding + layer, four expert
# regions, layer + experts, experts + LM head; two wafers continuing a layer) at a quarter of the
# side, so each stage simulates in a fraction of the time
MINI = ['system.wafer="small"', "wafer.mesh_width=16", "wafer.mesh_height=16"]


def _sim(cfg):
    return lambda t: simulate(t, cfg, validated=True)


def _steps(d):
    return [dataclasses.astuple(s) for s in d.steps], d.latency_s, d.dynamic_j_per_step


# ---- keys ---------------------------------------------------------------------------------------

def test_canonical_forms_tell_values_apart_and_refuse_the_unknown():
    assert canonical({"b": 1, "a": (1, 2.0)}) == canonical({"a": [1, 2.0], "b": 1})
    assert json.dumps(canonical(1)) != json.dumps(canonical(1.0)) != json.dumps(canonical(True))
    assert canonical({1: "a", "1": "b"}) != canonical({1: "b", "1": "a"})
    assert canonical(math.nan) == canonical(float("nan")) and canonical(math.inf) != canonical(-math.inf)
    assert canonical(np.arange(3)) != canonical(np.arange(3).astype(np.int32))
    assert canonical(DecodeParams(batch=2)) != canonical(DecodeParams(batch=3))
    with pytest.raises(TypeError):
        canonical(object())


def test_equal_stage_keys_build_equal_traces(small_system):
    """The cache is sound: across models, mappings and wafer counts, two stages with one key
    build the same trace (content hash) and anchor, so a hit returns what would be simulated."""
    seen, shared = {}, 0
    cases = (("tiny-moe", MOE, (1, 2, 3, 4, 5)), ("tiny-moe", DecodeParams(batch=1, context=16), (1, 2)),
             ("tiny", DecodeParams(batch=2, context=12), (1, 2)))
    for model, params, counts in cases:
        spec = load_model(model)
        for w in counts:
            for plan in wafer_plans(spec, small_system, params, w):
                for key, kind, ref in stages(plan, 7 if chain_of(plan).leading else None):
                    st = build_stage(plan, kind, ref, 7)
                    got = (st.trace.content_hash(), st.anchor)
                    k = stage_key(plan, key)
                    shared += k in seen
                    assert seen.setdefault(k, got) == got, key
    assert shared > 10  # the check compared something


def test_every_engine_input_is_in_the_key_and_output_options_are_not(small_system, tmp_path, monkeypatch):
    spec = load_model("tiny-moe")

    def run(system, params=MOE, **kw):
        c = StageCache(tmp_path / "c")
        with Fanout(cache=c, **kw) as f:
            d = run_decode(spec, system, params, 3, _sim(system.wafer_config), f)
        return c.stats, d

    cold, d0 = run(small_system)
    assert cold.hits == 0 and cold.misses == cold.stored > 0
    warm, d1 = run(small_system, threads=1)  # threads: an output option
    assert (warm.hits, warm.misses) == (cold.misses, 0) and _steps(d1) == _steps(d0)
    # system values that never reach a wafer's engine (links, cost) hit; the step reflects them
    far = load_system("cs3", ['system.wafer="small"', "system.link_latency_s=1e-3", "cost.utilization=0.5"])
    hit, d2 = run(far)
    assert hit.misses == 0 and d2.latency_s > d0.latency_s + 1e-3
    # any wafer value, decode parameter or the engine's version misses every stage
    slow = load_system("cs3", ['system.wafer="small"', "fabric.hop_latency_cycles=3"])
    for stats, _ in (run(slow), run(small_system, dataclasses.replace(MOE, batch=1))):
        assert stats.hits == 0
    monkeypatch.setattr(engine, "SEMANTIC_VERSION", engine.SEMANTIC_VERSION + 1)
    assert run(small_system)[0].hits == 0
    before = content_key("stage")
    monkeypatch.setattr(cache_mod, "_digest", "edited source")  # an edit to the builders or the engine
    assert content_key("stage") != before


# ---- entries ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def result(tiny):
    return simulate(neighbor(8, 8, 8), tiny)


def test_entries_round_trip_every_counter_and_table(tmp_path, result):
    c = StageCache(tmp_path)
    c.put("k" * 64, result, {"anchor": [3, 4]})
    got, extra = c.get("k" * 64)
    assert extra == {"anchor": [3, 4]}
    for f in dataclasses.fields(result):
        a, b = getattr(result, f.name), getattr(got, f.name)
        if isinstance(a, dict):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype
                                                for k in a), f.name
        elif f.name in ("pe_counters", "link_counters"):  # (read back narrow: EngineResult.narrowed)
            assert np.array_equal(a, b) and b.dtype.itemsize <= a.dtype.itemsize, f.name
        else:
            assert np.array_equal(a, b) and a.dtype == b.dtype if isinstance(a, np.ndarray) else a == b, f.name
    for name in isa.PE_COUNTER_NAMES:
        assert got.pe(name).dtype == np.int64 and np.array_equal(got.pe(name), result.pe(name))
    for name in isa.LINK_COUNTER_NAMES:
        assert got.link(name).dtype == np.int64 and np.array_equal(got.link(name), result.link(name))
    assert np.array_equal(got.idle_cycles(), result.idle_cycles())
    assert c.get("0" * 64) is None and (c.stats.hits, c.stats.misses) == (1, 1)


@pytest.mark.parametrize("lo, hi, stored", [(0, 0, "i1"), (-128, 127, "i1"), (-129, 0, "i2"), (0, 32767, "i2"),
                                            (0, 32768, "i4"), (-2**31, 2**31 - 1, "i4"), (0, 2**31, "i8"),
                                            (-2**62, 5, "i8")])
def test_counters_are_stored_narrow_and_read_back_exactly(tmp_path, result, lo, hi, stored):
    r = dataclasses.replace(result, pe_counters=result.pe_counters.copy(), ops=dict(result.ops))
    r.pe_counters.flat[[0, -1]] = lo, hi
    r.ops["start_cycle"] = np.full(len(next(iter(r.ops.values()))), hi, dtype=np.int64)
    c = StageCache(tmp_path)
    c.put("k" * 64, r)
    with np.load(next(tmp_path.rglob("*.npz"))) as z:
        assert z["pe_counters"].dtype.str[1:] == stored and z["link_counters"].dtype.itemsize <= 8
    got, _ = c.get("k" * 64)
    assert got.pe_counters.dtype.str[1:] == stored and np.array_equal(got.pe_counters, r.pe_counters)
    assert r.narrowed().pe_counters.dtype == got.pe_counters.dtype  # what a pool worker sends back
    assert got.pe(isa.PE_COUNTER_NAMES[0]).dtype == np.int64
    assert got.pe(isa.PE_COUNTER_NAMES[0])[0, 0] == lo and got.pe(isa.PE_COUNTER_NAMES[-1])[-1, -1] == hi
    assert got.ops["start_cycle"].dtype == np.int64 and np.array_equal(got.ops["start_cycle"], r.ops["start_cycle"])


def test_a_damaged_entry_is_reported_once_and_recomputed(tmp_path, result):
    warned = []
    c = StageCache(tmp_path, warn=warned.append)
    for k, damage in (("a" * 64, "flip"), ("b" * 64, "truncate"), ("c" * 64, "other key")):
        c.put(k, result)
        p = c._path(k)
        data = bytearray(p.read_bytes())
        if damage == "flip":  # a byte of the counters' compressed data (zip headers hold only names and sizes)
            with zipfile.ZipFile(p) as z:
                m = z.getinfo("pe_counters.npy")
            start = m.header_offset + 30 + int.from_bytes(data[m.header_offset + 26:m.header_offset + 28], "little") \
                + int.from_bytes(data[m.header_offset + 28:m.header_offset + 30], "little")
            data[start + m.compress_size // 2] ^= 0xFF
        elif damage == "truncate":
            data = data[: len(data) // 2]
        else:
            c.put("d" * 64, result)
            data = bytearray(c._path("d" * 64).read_bytes())
        p.write_bytes(bytes(data))
        assert c.get(k) is None and not p.exists()  # removed: the next run stores a good one
        assert c.get(k) is None
    assert len(warned) == 3 and all("damaged" in w for w in warned) and c.stats.corrupt == 3


def test_a_killed_writer_leaves_nothing_that_reads_as_valid(tmp_path, result, monkeypatch):
    c = StageCache(tmp_path)

    def killed(f, *a, **kw):
        f.write(b"PK\x03\x04 half an entry")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "_write", killed)
    with pytest.raises(KeyboardInterrupt):
        c.put("e" * 64, result)
    assert c.get("e" * 64) is None and cache_mod.info(tmp_path)["entries"] == 0
    assert not list(tmp_path.rglob(".wse-*"))  # and no temporary left behind


def test_a_cache_that_cannot_be_written_is_reported_once_and_the_run_goes_on(tmp_path, result):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    warned = []
    c = StageCache(tmp_path / "file" / "cache", warn=warned.append)  # its parent is a file
    for k in ("1" * 64, "2" * 64):
        c.put(k, result)
    assert len(warned) == 1 and "cannot store entries" in warned[0] and c.stats.stored == 0
    with pytest.raises(WseError, match="not a directory"):
        StageCache(blocker)


def test_incomplete_results_are_never_stored(tmp_path, result):
    c = StageCache(tmp_path)
    assert result.complete
    for stop in (isa.STOP_DEADLOCK, isa.STOP_MAX_CYCLES, isa.STOP_INTERRUPTED):
        c.put("f" * 64, dataclasses.replace(result, stop=stop))
    assert c.stats.stored == 0 and c.get("f" * 64) is None


# ---- Dask ---------------------------------------------------------------------------------------

def _flaky(marker: str, value: int):
    """Kills its worker process the first time it runs."""
    if not os.path.exists(marker):
        Path(marker).write_text("died once")
        os._exit(1)
    return value, {"pid": os.getpid()}


def _malloc_env() -> dict[str, str]:
    return {k: os.environ[k] for k in WORKER_MALLOC if k in os.environ}


def _square(value: int):
    return value * value, {}


def test_a_cluster_started_while_planning_serves_the_run_and_closes(monkeypatch):
    """Fanout.start brings the workers up in the background; the run then uses them, and a
    fanout closed before anything ran closes them too."""
    for k in WORKER_MALLOC:  # (a variable set here would win, as Dask gives the environment precedence)
        monkeypatch.delenv(k, raising=False)
    works = [Work(f"{i:064x}", lambda: (None, {}), _square, (i,)) for i in range(3)]
    with Fanout(jobs=2) as f:
        f.start()
        f.start()  # (once)
        got = sorted((i, r) for i, r, _ in f.run(works))
        cluster = f._cluster
        env = f._client.run(_malloc_env)
    assert got == [(0, 0), (1, 1), (2, 4)] and cluster is not None and f._cluster is None
    # the workers' allocator keeps arrays up to 32 MiB on the heap (pool.WORKER_MALLOC)
    assert len(env) == 2 and all(e == {k: str(v) for k, v in WORKER_MALLOC.items()} for e in env.values())
    with Fanout(jobs=2) as f:
        f.start()
    assert f._cluster is None and f._client is None
    one = Fanout(jobs=1)
    one.start()  # (no cluster for one job)
    assert one._starting is None


def test_a_worker_that_dies_mid_task_costs_a_retry(tmp_path):
    marker = str(tmp_path / "died")
    works = [Work(f"{i:064x}", lambda: (None, {}), _flaky, (marker, i)) for i in range(3)]
    with Fanout(jobs=2) as f:
        got = sorted((i, r) for i, r, _ in f.run(works))
    assert got == [(0, 0), (1, 1), (2, 2)] and Path(marker).exists()


def _after(marker: str, value: int):
    """Waits (up to a minute) for the marker a follow-up work writes."""
    import time
    for _ in range(600):
        if os.path.exists(marker):
            return value, {}
        time.sleep(0.1)
    raise TimeoutError("the follow-up never ran")


def _mark(marker: str, value: int):
    Path(marker).write_text("follow-up ran")
    return value, {}


@pytest.mark.parametrize("jobs", [1, 2])
def test_follow_up_works_start_once_their_parent_is_in(tmp_path, jobs):
    """Fanout.run's `more`: works added as a result comes in run and come back like the rest; on
    a cluster they start while other works still run (work 0 waits for the follow-up of work 1,
    which would never run if follow-ups waited for every first work)."""
    marker = str(tmp_path / "marker")
    if jobs == 1:
        Path(marker).write_text("")  # (one after another here: work 0 must not wait)
    works = [Work(f"{0:064x}", lambda: _after(marker, 0), _after, (marker, 0)),
             Work(f"{1:064x}", lambda: _square(1), _square, (1,))]
    parents = []

    def more(i, r, extra):
        parents.append((i, r))
        if i == 1:
            return [Work(f"{2:064x}", lambda: _mark(marker, 2), _mark, (marker, 2)),
                    Work(f"{3:064x}", lambda: _square(3), _square, (3,))]
        return []

    with Fanout(jobs=jobs) as f:
        got = list(f.run(works, more))
    assert sorted((i, r) for i, r, _ in got) == [(0, 0), (1, 1), (2, 2), (3, 9)]
    assert sorted(parents) == sorted((i, r) for i, r, _ in got)  # more: called once for each
    order = [i for i, _, _ in got]
    assert order.index(1) < order.index(2) and order.index(1) < order.index(3)
    if jobs == 2:
        assert order.index(2) < order.index(0)


def test_a_cluster_and_this_process_give_the_same_step_and_share_the_cache(tmp_path):
    system = load_system("cs3", MINI)
    spec = load_model("tiny-moe")
    cfg = system.wafer_config
    plans = wafer_plans(spec, system, MOE, 4)
    assert sum(bool(chain_of(p).leading) for p in plans) == 2  # the delta stages run on the cluster too
    here = run_decode(spec, system, MOE, 4, _sim(cfg))
    c = StageCache(tmp_path)
    with Fanout(jobs=2, cache=c) as f:
        remote = run_decode(spec, system, MOE, 4, _sim(cfg), f)
    assert _steps(remote) == _steps(here) and c.stats.stored == c.stats.misses > 0
    with Fanout(jobs=0, cache=StageCache(tmp_path)) as f:  # auto: all hits, no cluster started
        again = run_decode(spec, system, MOE, 4, _sim(cfg), f)
        assert f._cluster is None
    assert _steps(again) == _steps(here)


def test_fanout_sizes_itself_to_the_machine():
    assert not Fanout(jobs=1).remote(100)
    assert Fanout(jobs=2).remote(1)
    auto = Fanout(jobs=0)
    assert not auto.remote(1) and auto.remote(2) == ((os.cpu_count() or 1) > 1)
    assert auto.worker_threads() == max(1, (os.cpu_count() or 1) // auto.workers)
    assert Fanout(jobs=2, threads=3).worker_threads() == 3
    with pytest.raises(WseError, match="--jobs"):
        Fanout(jobs=-1)


def test_progress_line_counts_cache_hits_and_points():
    p = Progress(False)
    p.add(4, cached=1)
    p.add(2)
    p.done()
    p.point(total=3, done=1)
    line = p.line()
    assert line == "simulations 1/5 · 1 from cache · points 1/3"
    import io
    stream = io.StringIO()
    piped = Progress(True, stream)  # not a terminal: nothing at all
    piped.add(3)
    piped.done()
    piped.clear()
    assert piped._bar is None and stream.getvalue() == ""


def test_progress_lines_where_stderr_is_a_log_at_most_one_per_interval():
    now = [100.0]
    stream = __import__("io").StringIO()
    p = Progress(True, stream, log_every_s=60, clock=lambda: now[0])
    p.add(5, cached=1)  # the first change: a line
    now[0] = 130
    p.done()  # within the interval: none
    now[0] = 161
    p.done()
    p.point(total=2)  # (one line per interval, however many changes)
    now[0] = 162
    p.done()
    p.done()  # every simulation listed is done: a line whatever the interval
    p.done(0)  # nothing changed: no repeat
    assert stream.getvalue().splitlines() == ["[0:00:00] simulations 0/4 · 1 from cache",
                                              "[0:01:01] simulations 2/4 · 1 from cache",
                                              "[0:01:02] simulations 4/4 · 1 from cache · points 0/2"]
    assert Progress(False, __import__("io").StringIO(), log_every_s=1)._log_every is None  # --quiet wins


# ---- the commands -------------------------------------------------------------------------------

def _invoke(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r


SYSTEM = ["system", "--model", "tiny", "--system", "cs3", "--set", 'system.wafer="small"', "--context", "16",
          "--prompt-len", "32"]


# SYSTEM on a 16 x 16 mesh: the same four 8 x 8 slots, and a prompt as long as a slot's side (as 32
# on small's 32 x 32 slots), so TTFT's prefill kernels are simulated whole and cached as there
SYSTEM_MINI = [*SYSTEM[:-2], "--set", "wafer.mesh_width=16", "--set", "wafer.mesh_height=16", "--prompt-len", "8"]


def test_a_repeated_system_run_comes_from_the_cache_with_the_same_figures(tmp_path):
    cache = tmp_path / "cache"
    a = _invoke(*SYSTEM_MINI, "--cache", cache, "-o", tmp_path / "a.h5")
    assert a.exit_code == 0, a.output
    b = _invoke(*SYSTEM_MINI, "--cache", cache, "-o", tmp_path / "b.h5")
    assert b.exit_code == 0, b.output
    assert "0 misses" in b.output and " 0 hits" not in b.output
    table = lambda out: out.split("stage cache:")[0]  # noqa: E731
    assert table(a.output) == table(b.output)
    with h5py.File(tmp_path / "a.h5") as fa, h5py.File(tmp_path / "b.h5") as fb:
        assert {k: fa["summary"][k][()] for k in fa["summary"]} == {k: fb["summary"][k][()] for k in fb["summary"]}
        assert math.isfinite(fa["summary"]["ttft_s"][()])  # the prefill's kernels are among the cached stages
    info = _invoke("cache", "info", "--cache", cache, "--json")
    d = json.loads(info.output)
    assert d["entries"] > 0 and d["last_run"]["misses"] == 0 and d["last_run"]["hits"] == d["entries"]
    assert _invoke("cache", "clear", "--cache", cache).exit_code == 0
    assert json.loads(_invoke("cache", "info", "--cache", cache, "--json").output)["entries"] == 0
    c = _invoke(*SYSTEM_MINI, "--no-cache", "--log-progress", "0.001", "-o", tmp_path / "c.h5")
    assert c.exit_code == 0 and "stage cache" not in c.output
    # stderr is not a terminal here: --log-progress gives plain lines, the last with every simulation done
    lines = [ln for ln in c.stderr.splitlines() if "simulations" in ln]
    n = d["entries"]
    assert lines and lines[-1].startswith("[0:") and lines[-1].endswith(f"simulations {n}/{n}"), c.stderr
    assert _invoke(*SYSTEM_MINI, "--log-progress", "0", "-o", tmp_path / "d.h5").exit_code == 2


def test_wafer_values_can_be_set_on_a_system(tmp_path):
    r = _invoke(*SYSTEM, "--set", "fabric.hop_latency_cycles=31", "-o", tmp_path / "x.h5")
    assert r.exit_code == 2 and "fabric.hop_latency_cycles" in r.output
    r = _invoke(*SYSTEM, "--set", "fabric.nope=1", "-o", tmp_path / "x.h5")
    assert r.exit_code == 2 and "neither a system nor a wafer key" in r.output


SPEC = """
[base]
model = "tiny"
system = "cs3"
"system.wafer" = "small"
prompt_len = 0
[grid]
batch = [1, 2]
"fabric.hop_latency_cycles" = [1, 2]
[[points]]
batch = 3
context = 24
"""


# SPEC on a 16 x 16 mesh (8 x 8 slots rather than 32 x 32): the same points, axes and stages, each
# simulated in a fraction of the time
SPEC_MINI = SPEC.replace('"system.wafer" = "small"\n',
                         '"system.wafer" = "small"\n"wafer.mesh_width" = 16\n"wafer.mesh_height" = 16\n')
assert SPEC_MINI != SPEC


def test_a_sweep_on_a_two_worker_cluster_writes_the_table_plots_and_csv(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC_MINI)
    out = tmp_path / "s.h5"
    r = _invoke("sweep", spec, "-o", out, "--jobs", "2", "--cache", tmp_path / "c")
    assert r.exit_code == 0, r.output
    cols, units, _, attrs = read_table(out)
    assert bool(attrs["complete"]) and json.loads(attrs["axes"]) == ["batch", "fabric.hop_latency_cycles", "context"]
    assert list(cols["batch"]) == [1, 1, 2, 2, 3]
    assert list(cols["fabric.hop_latency_cycles"]) == [1, 2, 1, 2, 2]  # the last: the preset's
    assert units["tokens_per_s_per_user"] == "tokens/s" and units["cost_per_mtok_usd"] == "USD"
    assert (cols["tokens_per_s_per_user"] > 0).all() and all(e == "" for e in cols["error"])
    # a longer hop is slower, point for point
    assert cols["token_latency_cycles"][1] > cols["token_latency_cycles"][0]
    # in this process, from nothing: the same table
    again = tmp_path / "again.h5"
    assert _invoke("sweep", spec, "-o", again, "--jobs", "1", "--no-cache").exit_code == 0
    cols2 = read_table(again)[0]
    for k in cols:
        same = [a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)) for a, b in zip(cols[k], cols2[k])]
        assert all(same), k
    # each point priced at both sides' cheapest points too (pareto.png draws them)
    assert {"tokens_per_s_per_user_full", "cost_per_mtok_full_usd", "gpu_tokens_per_s_per_user_cheapest",
            "gpu_cost_per_mtok_cheapest_usd", "crossover_tokens_per_s_per_user"} <= set(cols)
    import xarray as xr  # the table opens as a labelled Dataset along `point`
    with xr.open_dataset(out, group="points", engine="h5netcdf") as ds:
        assert ds.sizes == {"point": 5} and ds["cost_per_mtok_usd"].attrs["units"] == "USD"
        assert list(ds["batch"].values) == [1, 1, 2, 2, 3]
    p = _invoke("plot", out, "-o", tmp_path / "plots")
    assert p.exit_code == 0, p.output
    names = {f.name for f in (tmp_path / "plots").iterdir()}
    assert {"pareto.png", "axis_batch.png", "axis_fabric_hop_latency_cycles.png", "axis_context.png"} <= names
    e = _invoke("export", out, "--format", "csv", "-o", tmp_path / "s.csv")
    assert e.exit_code == 0, e.output
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0].startswith("point,") and len(lines) == 2 + 5


def test_a_sweep_resumes_where_it_stopped(tmp_path, monkeypatch):
    from wse.system import sweep
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC)
    out = tmp_path / "s.h5"
    real, calls, crash = sweep.point_figures, [], [True]

    def crashing(point, *a):
        calls.append(point.key)
        if len(calls) == 3 and crash[0]:
            raise RuntimeError("the machine went away")
        return real(point, *a)

    monkeypatch.setattr(sweep, "point_figures", crashing)
    r = _invoke("sweep", spec, "-o", out, "--no-cache")
    assert r.exit_code != 0
    cols, _, _, attrs = read_table(out)
    assert not attrs["complete"] and len(cols["point"]) == 2
    calls.clear()
    crash[0] = False
    r = _invoke("sweep", spec, "-o", out, "--no-cache")
    assert r.exit_code == 0, r.output
    cols, _, _, attrs = read_table(out)
    assert attrs["complete"] and len(cols["point"]) == 5 and len(calls) == 3


def test_a_point_that_fails_is_recorded_and_the_rest_run(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[base]\nmodel = "tiny"\nsystem = "cs3"\n"system.wafer" = "small"\nprompt_len = 0\n'
                    '[grid]\nwafers = [1, 3]\n')
    r = _invoke("sweep", spec, "-o", tmp_path / "s.h5", "--no-cache")
    assert r.exit_code == 0 and "1 failed" in r.output
    cols = read_table(tmp_path / "s.h5")[0]
    assert cols["error"][0] == "" and "3 wafers for 2 layers" in cols["error"][1]
    assert math.isnan(cols["tokens_per_s_per_user"][1])
    assert list(cols["wafers"]) == [1, 3] and cols["system_wafers"][0] == 1  # the option, and what ran


@pytest.mark.parametrize("text, message", [
    ("[base]\nbatch = 1\n", "no model"),
    ('[base]\nmodel = "tiny"\nbatchez = 1\n', "unknown key 'batchez'"),
    ('[base]\nmodel = "tiny"\n[grid]\nbatch = "1"\n', "grid.batch must be a non-empty array"),
    ('[base]\nmodel = "tiny"\n[grid]\nbatch = ["1"]\n', "batch = '1' has the wrong type"),
    ('[base]\nmodel = "tiny"\n"fabric.nope" = 1\n', "unknown configuration key 'fabric.nope'"),
    ('[base]\nmodel = "tiny"\n[extra]\n', "unknown top-level key 'extra'"),
    ('[base\n', "malformed TOML"),
    ('[base]\nmodel = "tiny"\n[grid]\n"fabric.hop_latency_cycles" = [1979-05-27, 2]\n', "not a number"),
])
def test_bad_sweep_specs_are_one_clear_error(tmp_path, text, message):
    spec = tmp_path / "s.toml"
    spec.write_text(text)
    with pytest.raises(SweepError, match=message):
        load_spec(spec)
    r = _invoke("sweep", spec, "-o", tmp_path / "s.h5")
    assert r.exit_code == 2 and r.output.startswith("error: ") and "Traceback" not in r.output


def test_a_sweep_never_overwrites_its_spec_or_another_file(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC)
    other = tmp_path / "run.h5"
    other.write_bytes(b"not a sweep")
    for out, message in ((spec, "is an input"), (other, "is not a sweep file"),
                         (tmp_path / "no" / "s.h5", "does not exist")):
        r = _invoke("sweep", spec, "-o", out, "--no-cache")
        assert r.exit_code == 2 and message in r.output, r.output
    assert other.read_bytes() == b"not a sweep" and spec.read_text() == SPEC


def test_pareto_front_keeps_the_points_nothing_beats():
    cost = np.array([1.0, 2.0, 0.5, 3.0, math.nan])
    rate = np.array([10.0, 20.0, 5.0, 15.0, 30.0])
    assert list(pareto(cost, rate)) == [2, 0, 1]


def test_a_worker_with_other_code_refuses_to_simulate():
    from wse.system.pool import _on_worker, code_identity
    assert _on_worker(code_identity(), lambda x: x + 1, 1) == 2
    with pytest.raises(WseError, match="runs another wse-sim"):
        _on_worker((engine.SEMANTIC_VERSION, "another digest"), lambda x: x, 1)


def test_an_existing_cluster_takes_the_stages_by_its_address(tmp_path, monkeypatch):
    from distributed import LocalCluster
    here = _invoke(*SYSTEM[:-2], "--prompt-len", "0", "--no-cache", "-o", tmp_path / "here.h5")
    assert here.exit_code == 0, here.output
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        monkeypatch.setenv("WSE_SCHEDULER", cluster.scheduler_address)
        there = _invoke(*SYSTEM[:-2], "--prompt-len", "0", "--no-cache", "-o", tmp_path / "there.h5")
        assert there.exit_code == 0, there.output
        assert any(cluster.scheduler.task_prefixes)  # the stages ran on the cluster
    assert here.output.replace("here.h5", "") == there.output.replace("there.h5", "")
    r = _invoke(*SYSTEM, "--scheduler", "nonsense", "--no-cache", "-o", tmp_path / "x.h5")
    assert r.exit_code == 2 and "--scheduler nonsense: cannot connect" in r.output


def test_an_unreadable_entry_is_a_miss_left_in_place(tmp_path, result, monkeypatch):
    warned = []
    c = StageCache(tmp_path, warn=warned.append)
    c.put("9" * 64, result)

    def denied(path, key):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache_mod, "_read", denied)
    assert c.get("9" * 64) is None and c.get("9" * 64) is None
    assert c._path("9" * 64).exists() and c.stats.corrupt == 0 and len(warned) == 1


def test_cluster_failures_and_an_aborted_fanout_are_one_error():
    from distributed.scheduler import KilledWorker

    from wse.system.pool import _result

    class Lost:
        def result(self):
            raise KilledWorker.__new__(KilledWorker)  # however distributed words it

    with pytest.raises(WseError, match="local Dask cluster failed a stage simulation"):
        _result(Lost(), None)
    f = Fanout(jobs=2)
    f.abort()
    with pytest.raises(WseError, match="stopped"):
        list(f.run([]))
    with pytest.raises(WseError, match="stopped"):
        f.client()


def test_prefill_kernels_other_than_the_head_do_not_depend_on_its_width(tmp_path, small_system):
    from wse.system.pool import prefill_kernels
    cfg = small_system.wafer_config
    spec = load_model("tiny")
    c = StageCache(tmp_path)
    with Fanout(cache=c) as f:
        for width in (32, 64):  # a wafer's LM-head region, then the last wafer's wider one
            got = list(prefill_kernels(spec, cfg, 32, 32, width, _sim(cfg), "t", f)(["qkv", "lm_head"]))
            assert [g[0] for g in got] == ["qkv", "lm_head"]
    assert (c.stats.hits, c.stats.misses) == (1, 3)  # the second qkv came from the cache
