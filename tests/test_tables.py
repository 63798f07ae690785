"""The compiled table passes (engine/tables.py) against the numpy they replace: route order,
the route rules, and the state buffer a finished simulation hands to the next."""
import copy

import numpy as np
import pytest

from randomtrace import random_trace, random_wide_trace
from wse import isa, trace_check
from wse.engine import state as st
from wse.engine.run import simulate
from wse.engine.tables import route_order, routes_broken
from wse.errors import TraceError


def test_route_order_is_a_stable_sort_by_pe_then_color():
    rng = np.random.default_rng(5)
    for n_pes in (1, 7, 300):
        n = int(rng.integers(0, 2000))
        pe = rng.integers(0, n_pes, n).astype(np.int32)
        color = rng.integers(0, 24, n).astype(np.int8)  # duplicates included: their order is kept
        want = np.argsort(pe.astype(np.int64) * 64 + color, kind="stable")
        assert np.array_equal(route_order(pe, color, n_pes), want)
    with pytest.raises(IndexError):
        route_order(np.array([0, 3], np.int32), np.zeros(2, np.int8), 3)


def _mutated(t, rng):
    """t with one route field changed at random (or none): valid or not, as it happens."""
    t = copy.copy(t)
    r = {k: v.copy() for k, v in t.routes.items()}
    t.routes = r
    if len(r["pe"]) and rng.random() < 0.7:
        i = int(rng.integers(len(r["pe"])))
        field = rng.choice(["color", "rx", "tx", "pe"])
        if field == "color":
            r["color"][i] = rng.integers(-1, 26)
        elif field == "rx":
            r["rx"][i] = rng.integers(0, isa.N_PORTS)
        elif field == "tx":
            r["tx"][i] = rng.integers(1, 1 << isa.N_PORTS)
        else:
            r["pe"][i] = rng.integers(0, t.n_pes)
    return t


@pytest.mark.parametrize("make", [random_trace, random_wide_trace])
def test_routes_broken_says_what_the_named_checks_say(make):
    rng = np.random.default_rng(11)
    seen = set()
    for seed in range(60):
        t0, cfg = make(seed)
        for _ in range(4):
            t = _mutated(t0, rng)
            r = t.routes
            order = route_order(r["pe"], r["color"], t.n_pes)
            broken = routes_broken(r["pe"], r["color"], r["rx"], r["tx"], order, t.mesh_width, t.mesh_height,
                                   cfg.colors)
            try:
                trace_check._name_route_problem(t, cfg, "t")
                named = False
            except TraceError:
                named = True
            assert broken == named, seed
            seen.add(broken)
    assert seen == {True, False}  # both kinds were tried


def test_a_released_state_buffer_serves_the_next_run_exactly():
    """Runs that reuse the buffer of the one before (larger or smaller) give what fresh runs
    give, and a result is not touched by the runs after it."""
    traces = [random_wide_trace(s) for s in (3, 4, 5)]
    st._SPARE.clear()
    fresh = []
    for t, cfg in traces:
        fresh.append(simulate(t, cfg))
        st._SPARE.clear()
    kept = [simulate(t, cfg) for t, cfg in traces + traces[::-1]]
    assert st._SPARE  # the last run's buffer is kept
    for res, want in zip(kept, fresh + fresh[::-1]):
        assert res.total_cycles == want.total_cycles
        assert np.array_equal(res.pe_counters, want.pe_counters)
        assert np.array_equal(res.link_counters, want.link_counters)
    first = fresh[0].pe_counters.copy()
    simulate(*traces[1])
    assert np.array_equal(fresh[0].pe_counters, first)
