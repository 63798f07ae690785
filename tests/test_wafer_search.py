"""`--wafers cheapest` (system/wafer_search.py): the counts planned, the estimate, where the search
stops, and that the count it picks is cheaper per token when both are simulated."""
import math

import h5py
import pytest
from click.testing import CliRunner

from wse.cli import cli
from wse.engine.run import simulate
from wse.system.config import load_system
from wse.system.wafer_search import Candidate, WaferSearch, full_depth, kv_in_flight, search
from wse.system.wafers import fewest_wafers, run_decode, wafer_plans
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
    s = search(spec, small_system, LONG, first)
    F = full_depth(first)
    assert s.fewest == n0 == 1 and s.full_depth == F == math.ceil(first.latency_s / first.bottleneck_s - 1e-9)
    assert [c.wafers for c in s.candidates] == list(range(n0, n0 + len(s.candidates)))
    for c in s.candidates:  # each count's KV depth from its own plans; the estimate n / min(kv, F)
        kv = kv_in_flight(wafer_plans(spec, small_system, LONG, c.wafers))
        assert c.kv_in_flight == kv and c.estimate == c.wafers / min(kv, F)
    assert s.candidates[0].kv_in_flight == first.max_in_flight == 1 < F
    best = min(c.estimate for c in s.candidates)
    assert s.chosen == min(c.wafers for c in s.candidates if c.estimate == best) == 2
    # it stops at the first count that could not beat the best even with a full pipeline
    last = s.candidates[-1].wafers
    assert (last + 1) / F >= best and all(c.wafers / F < min(x.estimate for x in s.candidates if x.wafers < c.wafers)
                                          for c in s.candidates[1:])
    # simulated, the chosen count is cheaper per token at its deepest pipeline than the fewest
    chosen = run_decode(spec, small_system, LONG, s.chosen, sim)
    assert chosen.max_in_flight > first.max_in_flight
    assert chosen.curve[-1].usd_per_mtok < first.curve[-1].usd_per_mtok
    assert "chose 2 on" in s.describe() and "the fewest, 1, hold 1" in s.describe()


def test_a_count_that_does_not_place_is_kept_and_never_chosen():
    s = WaferSearch(1, 4, [Candidate(1, (32, 32), 1, 1.0), Candidate(2, (0, 0), 0, math.inf)], 1)
    assert s.table()["kv_in_flight"].tolist() == [1, 0] and s.table()["chosen"].tolist() == [True, False]
    assert s.describe().startswith("wafers: --wafers cheapest planned 1..2 and chose 1 on 32x32")


def test_wafers_cheapest_on_the_command_line(tmp_path):
    out = tmp_path / "c.h5"
    r = CliRunner().invoke(cli, ["system", "--model", "tiny", "--system", "cs3", "--set", 'system.wafer="small"',
                                 "--wafers", "cheapest", "--batch", "8", "--context", "4500", "--prompt-len", "0",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "wafers: --wafers cheapest planned 1..2 and chose 2" in r.output
    with h5py.File(out) as f:
        assert f["summary/wafers"][()] == 2 and f["summary/fewest_wafers"][()] == 1
        assert f["wafer_search/wafers"][()].tolist() == [1, 2] and f["wafer_search/chosen"][()].tolist() == [0, 1]
    rep = CliRunner().invoke(cli, ["report", str(out)])
    assert rep.exit_code == 0 and "--wafers cheapest planned 1..2" in rep.output


@pytest.mark.parametrize("extra", [["--generate", "3"], ["--mla-groups", "auto"]])
def test_wafers_cheapest_with_options_that_choose_wafers_otherwise_is_one_error(extra, tmp_path):
    r = CliRunner().invoke(cli, ["system", "--model", "tiny", "--wafers", "cheapest", *extra,
                                 "-o", str(tmp_path / "x.h5")])
    assert r.exit_code == 2 and "--wafers cheapest" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.h5").exists()
