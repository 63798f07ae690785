"""`--wafers cheapest` (system/wafer_search.py): the counts planned, the estimate, where the search
stops, and that the count it picks is cheaper per token when both are simulated."""
import dataclasses
import math

import h5py
import pytest
from click.testing import CliRunner

from wse.cli import cli
from wse.errors import WseError
from wse.engine.run import simulate
from wse.system.config import load_system
from wse.system.mla_groups import layer_region_trace, representative
from wse.system import wafer_search
from wse.system.wafer_search import (PATIENCE, Candidate, WaferSearch, kv_in_flight, search, stage_seconds,
                                      usd_floor)
from wse.system.wafers import fewest_wafers, fill_depth, run_decode, wafer_plans
from wse.workload.models import load_model
from wse.workload.params import DecodeParams

# tiny at batch 8 and 4,500 tokens: one small wafer holds its weights and one micro-batch's KV
# caches, two hold four
LONG = DecodeParams(batch=8, context=4500)


@pytest.fixture(scope="module")
def small_system():
    return load_system("cs3", ['system.wafer="small"', "system.wafers=2"])


def test_the_search_plans_upward_from_the_fewest_and_picks_the_least_estimate(small_system):
    spec, cfg = load_model("tiny"), small_system.wafer_config
    sim = lambda t: simulate(t, cfg, validated=True)  # noqa: E731
    n0 = fewest_wafers(spec, small_system, LONG)
    first = run_decode(spec, small_system, LONG, n0, sim)
    s = search(spec, small_system, LONG, first, sim)
    assert s.fewest == n0 == 1
    assert [c.wafers for c in s.candidates] == list(range(n0, n0 + len(s.candidates)))
    # the fewest count's estimate is its simulated pipeline, figure for figure
    c0 = s.candidates[0]
    assert (c0.latency_s, c0.longest_s, c0.in_flight) == (first.latency_s, first.bottleneck_s, first.max_in_flight)
    assert c0.usd_per_mtok == first.curve[-1].usd_per_mtok
    assert c0.kv_in_flight == 1 < fill_depth(first.latency_s, first.bottleneck_s)
    layer, other = stage_seconds(first)
    for c in s.candidates:  # each count from its own plans and its own layer region alone
        if c.kv_in_flight == 0:  # (does not place: tiny has 2 layers)
            with pytest.raises(WseError):
                wafer_plans(spec, small_system, LONG, c.wafers)
            continue
        plans = wafer_plans(spec, small_system, LONG, c.wafers)
        trace, _ = layer_region_trace(representative(plans))
        cycles = sim(trace).total_cycles
        assert c.kv_in_flight == kv_in_flight(plans) and c.layer_cycles == cycles
        d = (cycles - c0.layer_cycles) / first.clock_hz
        assert c.latency_s == pytest.approx(first.latency_s + len(layer) * d)
        assert c.longest_s == pytest.approx(max([t + d for t in layer] + other))
        F = math.ceil(c.latency_s / c.longest_s - 1e-9)
        assert c.in_flight == min(c.kv_in_flight, F)
        rate = c.in_flight * LONG.batch / max(c.latency_s, c.in_flight * c.longest_s)
        assert c.usd_per_mtok == pytest.approx(c.wafers * small_system.usd_per_system_hour / 3600
                                               / (rate * small_system.utilization) * 1e6)
    best = min(c.usd_per_mtok for c in s.candidates)
    assert s.chosen == min(c.wafers for c in s.candidates if c.usd_per_mtok == best) == 2
    # it stops after PATIENCE counts in a row that are full (or do not place) and no cheaper
    tail = s.candidates[-PATIENCE:]
    assert len(s.candidates) > PATIENCE and "in a row" in s.stop
    assert all((c.full or c.kv_in_flight == 0) and c.usd_per_mtok >= best for c in tail)
    # simulated, the chosen count is cheaper per token at its deepest pipeline than the fewest,
    # and the estimate is close to the simulation
    chosen = run_decode(spec, small_system, LONG, s.chosen, sim)
    pick = s.candidates[s.chosen - n0]
    assert chosen.max_in_flight > first.max_in_flight
    assert chosen.curve[-1].usd_per_mtok < first.curve[-1].usd_per_mtok
    assert chosen.curve[-1].usd_per_mtok == pytest.approx(pick.usd_per_mtok, rel=0.2)
    assert "chose 2 on" in s.describe() and "the fewest, 1, hold 1" in s.describe()


def test_the_search_stops_where_no_count_can_be_cheaper(small_system, monkeypatch):
    """A stage the estimate keeps (here a link made 10x the latency) bounds every count's cost
    from below: once n x that stage costs more than the best, the search ends unplanned."""
    spec, cfg = load_model("tiny"), small_system.wafer_config
    sim = lambda t: simulate(t, cfg, validated=True)  # noqa: E731
    first = run_decode(spec, small_system, LONG, 1, sim)
    slow = 10 * first.latency_s
    real = wafer_search.stage_seconds
    monkeypatch.setattr(wafer_search, "stage_seconds", lambda r: (real(r)[0], real(r)[1] + [slow]))
    s = search(spec, small_system, LONG, first, sim)
    assert [c.wafers for c in s.candidates] == [1] and s.chosen == 1 and "no count from 2 on" in s.stop
    c0 = s.candidates[0]  # (simulated: its figures are the simulation's, its estimate kept the slow stage)
    assert (c0.longest_s, c0.in_flight) == (first.bottleneck_s, first.max_in_flight) and c0.usd_per_mtok > c0.cost
    assert usd_floor(first, small_system, 2, slow) >= c0.cost
    assert usd_floor(first, small_system, 2, slow) == pytest.approx(2 * small_system.usd_per_system_hour / 3600
                                                                  * slow / LONG.batch / small_system.utilization * 1e6)


def test_kv_bound_counts_never_end_the_search_and_full_ones_do(small_system, monkeypatch):
    """The stop rule on made-up counts (plans, KV room and layer cycles faked; the stages are a
    simulated fewest count's): 2 and 3 dearer but KV-bound go on, 4 and 5 dearer at a full
    pipeline end it; a count that does not place counts as one of those."""
    from types import SimpleNamespace
    spec, cfg = load_model("tiny"), small_system.wafer_config
    sim = lambda t: simulate(t, cfg, validated=True)  # noqa: E731
    first = run_decode(spec, small_system, LONG, 1, sim)
    kv = {1: 1, 2: 1, 3: 1, 4: 50, 5: 50, 6: 50}

    def plans(spec_, system_, params_, n):
        if n == 5 and not_placing:
            raise WseError("does not place")
        return [SimpleNamespace(P=8, Q=8, n=n)]
    monkeypatch.setattr(wafer_search, "wafer_plans", plans)
    monkeypatch.setattr(wafer_search, "kv_in_flight", lambda ps: kv[ps[0].n])
    monkeypatch.setattr(wafer_search, "representative", lambda ps, what: ps[0])
    monkeypatch.setattr(wafer_search, "layer_region_trace", lambda plan: (plan, 0))
    monkeypatch.setattr(wafer_search, "region_cycles", lambda plan, *a: 1000)  # every count as fast
    for not_placing in (False, True):
        s = search(spec, small_system, LONG, first, sim)
        assert [c.wafers for c in s.candidates] == [1, 2, 3, 4, 5] and s.chosen == 1, s.candidates
        assert [c.full for c in s.candidates] == [False, False, False, True, not not_placing]
        assert s.candidates[4].kv_in_flight == (0 if not_placing else 50) and "2 counts in a row" in s.stop


def test_the_cheapest_estimate_is_simulated_and_rebases_the_counts_above_it(small_system):
    """With `run`, the search ends on a count simulated whole: every count not simulated is
    estimated from the largest simulated count below it, by the formula, and the chosen is the
    least of the simulated figures and the estimates."""
    spec, cfg = load_model("tiny"), small_system.wafer_config
    sim = lambda t: simulate(t, cfg, validated=True)  # noqa: E731
    first = run_decode(spec, small_system, LONG, 1, sim)
    runs = []

    def run(n):
        runs.append(n)
        return run_decode(spec, small_system, LONG, n, sim)
    s = search(spec, small_system, LONG, first, sim, run=run)
    found = {c.wafers: c for c in s.candidates}
    assert runs == [2] and sorted(s.decodes) == [1, 2] and s.decodes[1] is first
    pick = found[s.chosen]
    assert s.chosen == 2 and pick.simulated and pick.base == 1
    assert pick.simulated_usd_per_mtok == s.decodes[2].curve[-1].usd_per_mtok
    assert all(pick.cost <= c.cost for c in s.candidates)
    for c in s.candidates:
        if c.simulated:  # its simulation's latency, longest stage and depth
            d = s.decodes[c.wafers]
            assert (c.latency_s, c.longest_s, c.in_flight) == (d.latency_s, d.bottleneck_s, d.max_in_flight)
        if c.kv_in_flight == 0 or c.wafers == 1:
            continue
        assert c.base == max(n for n in s.decodes if n < c.wafers)
        again = wafer_search.estimate(s.decodes[c.base], small_system, c.wafers, c.slot, c.kv_in_flight,
                                      c.layer_cycles, found[c.base].layer_cycles)
        assert again.usd_per_mtok == c.usd_per_mtok
        if not c.simulated:
            assert (again.latency_s, again.longest_s, again.in_flight) == (c.latency_s, c.longest_s, c.in_flight)
    t = s.table()
    assert t["estimated_from"].tolist() == [1, 1, 0, 0]  # (3 and 4 do not place: tiny has 2 layers)
    assert t["simulated_usd_per_mtok"][1] == pick.simulated_usd_per_mtok and math.isnan(t["simulated_usd_per_mtok"][2])
    assert "simulated 1, 2 whole and chose 2" in s.describe() and "simulated (estimated $" in s.describe()


def _faked_search(small_system, monkeypatch, est, sims, with_run=True):
    """search() on made-up counts: every count places with KV room 50 and the same layer cycles;
    est[base][n] is count n's estimated $/Mtok from base (a tuple ("kv", usd): KV-bound, else at a
    full pipeline), sims[n] = (usd,) or (usd, full) its whole simulation's. Returns (search, counts run)."""
    from types import SimpleNamespace
    spec, cfg = load_model("tiny"), small_system.wafer_config
    sim = lambda t: simulate(t, cfg, validated=True)  # noqa: E731
    real = run_decode(spec, small_system, LONG, 1, sim)

    def decode(n, usd, full=True):
        depth = fill_depth(real.latency_s, real.bottleneck_s) if full else 1
        return dataclasses.replace(real, wafers=n, max_in_flight=depth, curve=real.curve[:-1] + [
            dataclasses.replace(real.curve[-1], usd_per_mtok=usd)])

    def estimate(dec, system, n, slot, kv, cycles, cycles0):
        e = est[dec.wafers][n]
        kv_bound = isinstance(e, tuple)
        return Candidate(n, slot, kv, cycles, 2e-3 if kv_bound else 1e-3, 1e-3, 1, e[1] if kv_bound else e, dec.wafers)
    monkeypatch.setattr(wafer_search, "wafer_plans", lambda *a: [SimpleNamespace(P=8, Q=8, n=a[-1])])
    monkeypatch.setattr(wafer_search, "kv_in_flight", lambda ps: 50)
    monkeypatch.setattr(wafer_search, "representative", lambda ps, what: ps[0])
    monkeypatch.setattr(wafer_search, "layer_region_trace", lambda plan: (plan, 0))
    monkeypatch.setattr(wafer_search, "region_cycles", lambda plan, *a: 1000)
    monkeypatch.setattr(wafer_search, "usd_floor", lambda *a: 0.0)  # (only the patience rule stops)
    monkeypatch.setattr(wafer_search, "estimate", estimate)
    runs = []

    def run(n):
        runs.append(n)
        return decode(n, *sims[n])
    return search(spec, small_system, LONG, decode(1, est[1][1]), sim, run=run if with_run else None), runs


def test_a_simulated_count_dearer_than_its_estimate_sends_the_search_back(small_system, monkeypatch):
    """4, estimated cheapest from 1, simulates dearer; 5, estimated from 4, is then the least and
    simulates dearer too (and KV-bound); 3, estimated from 1, simulates the cheapest. The last
    scan, from 3, passes 4 and 5 (simulated: each the base of the counts above it), so 6 and 7
    are estimated from 5, and ends after two full dearer counts; 3 is chosen."""
    est = {1: {1: 10, 2: 9, 3: 7, 4: 5, 5: 8, 6: 8}, 4: {5: 6.8, 6: 7.0, 7: 7.1}, 5: {6: 7.3, 7: 7.4}, 3: {}}
    sims = {4: (7.5,), 5: (7.2, False), 3: (6.9,)}
    s, runs = _faked_search(small_system, monkeypatch, est, sims)
    assert runs == [4, 5, 3] and s.chosen == 3 and sorted(s.decodes) == [1, 3, 4, 5]
    assert [(c.wafers, c.base, c.cost) for c in s.candidates] == [
        (1, 1, 10), (2, 1, 9), (3, 1, 6.9), (4, 1, 7.5), (5, 4, 7.2), (6, 5, 7.3), (7, 5, 7.4)]
    assert not s.candidates[4].full and s.candidates[3].full  # (a simulated count: its simulation's depth)
    assert s.candidates[4].in_flight == s.decodes[5].max_in_flight == 1
    assert "2 counts in a row" in s.stop
    # without `run` the first scan's least estimate is chosen
    assert _faked_search(small_system, monkeypatch, est, sims, with_run=False)[0].chosen == 4


def test_estimates_beyond_the_last_scan_from_an_older_base_are_dropped(small_system, monkeypatch):
    """The first scan goes on past 4 (KV-bound) to 6; 3, the cheapest, simulated, is the base of
    the second scan, which stops at 5: 6's estimate, from 1, is dropped."""
    est = {1: {1: 10, 2: 9, 3: 5, 4: ("kv", 8), 5: 8, 6: 8}, 3: {4: 6, 5: 6.5}}
    s, runs = _faked_search(small_system, monkeypatch, est, {3: (5.5,)})
    assert runs == [3] and s.chosen == 3
    assert [(c.wafers, c.base, c.cost) for c in s.candidates] == [
        (1, 1, 10), (2, 1, 9), (3, 1, 5.5), (4, 3, 6), (5, 3, 6.5)]


def test_a_count_that_does_not_place_is_kept_and_never_chosen():
    s = WaferSearch(1, [Candidate(1, (32, 32), 1, 100, 1e-3, 1e-3, 1, 5.0), Candidate(2, (0, 0), 0)], 1, "x")
    assert s.table()["kv_in_flight"].tolist() == [1, 0] and s.table()["chosen"].tolist() == [True, False]
    assert not s.candidates[1].full and s.candidates[0].full
    assert s.describe().startswith("wafers: --wafers cheapest planned 1..2 and chose 1 on 32x32")


def test_wafers_cheapest_on_the_command_line(tmp_path):
    out = tmp_path / "c.h5"
    r = CliRunner().invoke(cli, ["system", "--model", "tiny", "--system", "cs3", "--set", 'system.wafer="small"',
                                 "--wafers", "cheapest", "--batch", "8", "--context", "4500", "--prompt-len", "0",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "wafers: --wafers cheapest planned 1..4, simulated 1, 2 whole and chose 2" in r.output
    with h5py.File(out) as f:
        assert f["summary/wafers"][()] == 2 and f["summary/fewest_wafers"][()] == 1
        assert f["wafer_search/wafers"][()].tolist() == [1, 2, 3, 4]
        assert f["wafer_search/chosen"][()].tolist() == [0, 1, 0, 0]
    rep = CliRunner().invoke(cli, ["report", str(out)])
    assert rep.exit_code == 0 and "--wafers cheapest planned 1..4" in rep.output


@pytest.mark.parametrize("extra", [["--generate", "3"], ["--mla-groups", "auto"]])
def test_wafers_cheapest_with_options_that_choose_wafers_otherwise_is_one_error(extra, tmp_path):
    r = CliRunner().invoke(cli, ["system", "--model", "tiny", "--wafers", "cheapest", *extra,
                                 "-o", str(tmp_path / "x.h5")])
    assert r.exit_code == 2 and "--wafers cheapest" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.h5").exists()
