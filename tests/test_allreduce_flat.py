"""The auto all-reduce (collectives.LineAllReduce with flat_latency): long vectors in one two-way
chain over the whole line to the two-level's final root, short ones two-level, on one set of routes."""
import pytest

from checked import run
from engine_compare import assert_same
from wse.engine import reference
from wse.engine.run import simulate
from wse.trace_check import validate
from wse.workload.collectives import LineAllReduce, ReduceColors
from wse.workload.compose import compose
from wse.workload.decode import plan_model
from wse.workload.kernels import allreduce
from wse.workload.mesh import X, Y, MeshBuilder, Region, RegionProgram, tagged
from wse.workload.models import load_model
from wse.workload.params import DecodeParams
from wse.workload.region import THREADS, merge
from wse.workload.stages import full_trace

COLORS = ReduceColors.from_base(0)


@pytest.mark.parametrize("n", list(range(2, 70)) + [127, 152, 195, 293, 390, 586])
def test_the_flat_chains_share_the_two_level_routes(n):
    """Wherever both variants route a color at a position they route it alike (routes() checks),
    so one set of static routes serves both; the flat variant only adds routes."""
    for groups in {None, 2, max(1, n // 3), n}:
        two = LineAllReduce(n, COLORS, groups=groups).routes()
        both = LineAllReduce(n, COLORS, groups=groups, flat_latency=(2, 2))
        routes = both.routes()
        assert all(routes[c][p] == r for c, per in two.items() for p, r in per.items())
        if both.flat is not None:
            assert both.flat.final_root == both.final_root


def _line(n: int, elements: int, algo: str, cfg) -> int:
    return run(allreduce((1, n), elements, "y", cfg, algo)[0], cfg).total_cycles


@pytest.mark.parametrize("n", [64, 127])
def test_the_threshold_picks_the_faster_variant_away_from_it(n, small):
    """Well above the threshold the flat chain (its root takes in both sides' m wavelets, not both
    levels') is faster; well below it the two-level's shorter chains are."""
    red = LineAllReduce(n, COLORS, flat_latency=(small.hop_latency_cycles, small.ramp_latency_cycles))
    lo, hi = max(1, red.flat_from // 4), 3 * red.flat_from
    assert _line(n, hi, "auto", small) < _line(n, hi, "two-level", small)
    assert _line(n, lo, "auto", small) == _line(n, lo, "two-level", small)
    assert _line(n, lo, "two-level", small) < _flat_only(n, lo, small)


def _flat_only(n: int, elements: int, cfg) -> int:
    """An all-reduce forced onto the flat variant (threshold 1)."""
    import wse.workload.collectives as C
    orig = C.LineAllReduce.flat_threshold
    C.LineAllReduce.flat_threshold = lambda self, hop, ramp: 1
    try:
        return _line(n, elements, "auto", cfg)
    finally:
        C.LineAllReduce.flat_threshold = orig


def _sequence(n: int, lengths: list[int]):
    """One line running all-reduces of these lengths one after another on the same buffer."""
    R = Region(0, 0, n, 1)
    b = MeshBuilder(n, 1, THREADS, kernel="sequence")
    red = LineAllReduce(n, COLORS, flat_latency=(2, 2))
    for color, per in red.routes().items():
        b.line_routes(R, X, color, per)
    prog = RegionProgram(R, THREADS)
    prog.add_roles(X, [red.role(i) for i in range(n)])
    prog.add_roles(Y, [0])
    t = b.tag("allreduce", -1, "allreduce")

    def ops(xr, yr, sp):
        out: dict = {}
        for m in lengths:
            merge(out, red.role_ops(xr[0], m, 64, 64 + 2 * max(lengths)))
        return tagged(out, t)
    prog.add(ops)
    prog.program_ids(b)
    return b.build(), red


@pytest.mark.parametrize("n, lengths", [(16, [33, 2]), (16, [2, 33, 2]), (16, [33, 2, 33, 2, 2, 33]),
                                        (13, [40, 1, 40, 3]), (25, [1, 90, 90, 2, 1, 90])])
def test_flat_and_two_level_all_reduces_follow_each_other(n, lengths, small):
    """(Found: a flat call followed by a two-level one deadlocked — a group root above the final
    root took its upper side on thread 1 while thread 0 still received the flat chain on that
    color; thread 1 now waits for thread 0 to pass the flat call, SEM_FLAT_CLEAR.)"""
    tr, red = _sequence(n, lengths)
    assert any(m >= red.flat_from for m in lengths) and any(m < red.flat_from for m in lengths)
    validate(tr, small)
    fast = simulate(tr, small)
    assert fast.complete
    assert_same(fast, reference.simulate(tr, small), f"sequence {lengths}")
    assert fast.pe("flops").sum() == (n - 1) * sum(lengths)


@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("elements", [2, 21, 300])
def test_the_auto_all_reduce_sums_every_line(axis, elements, tiny):
    from test_functional import _check
    tr, facts = allreduce((8, 6), elements, axis, tiny, "auto")
    rows, res = _check(tr, tiny)
    assert all(r.ok for r in rows) and not res.raced
    assert res.pe("flops").sum() == facts["allreduce_flops"]


def test_a_model_composes_exactly_with_flat_all_reduces(small):
    """tiny on 16x16 slots: some of its all-reduces are long enough for the flat chain (fewer
    cycles than two-level throughout); composed still equals the full step, with the same FLOPs."""
    spec = load_model("tiny")
    out = {}
    for algo in ("two-level", "auto"):
        plan = plan_model(spec, small, DecodeParams(context=12, algo=algo), P=16)
        trace, builds = full_trace(plan)
        full = run(trace, small)
        assert compose(plan, lambda t: run(t, small)).total_cycles == full.total_cycles
        out[algo] = (full.total_cycles, full.pe("flops").sum(), sum(b.weight_bytes for b in builds))
    assert out["auto"][0] < out["two-level"][0]
    assert out["auto"][1:] == out["two-level"][1:]


@pytest.mark.parametrize("w, h", [(3, 3), (3, 5), (5, 3), (16, 16)])
def test_the_hand_off_barrier_nests_a_flat_column_all_reduce(w, h, small):
    """On short lines even the barrier's one element goes flat (the threshold is 1 on 3 PEs):
    the column all-reduce nested at the row root brings its own broadcast thread's ops along.
    (Found: only threads 0 and 1 of the nested ops were kept, leaving a semaphore signalled and
    never waited.)"""
    from wse.workload.region import handoff, reducers
    R = Region(0, 0, w, h)
    b = MeshBuilder(w, h, THREADS, kernel="barrier")
    red = reducers(R, b, DecodeParams(), cfg=small)
    prog = RegionProgram(R, THREADS)
    prog.add_roles(X, [red[X].role(i) for i in range(w)])
    prog.add_roles(Y, [red[Y].role(j) for j in range(h)])
    t = b.tag("barrier", -1, "handoff")
    prog.add(lambda xr, yr, sp: tagged(handoff(red, xr[0], yr[0], 64, 128), t))
    prog.program_ids(b)
    tr = b.build()
    validate(tr, small)
    fast = simulate(tr, small)
    assert fast.complete and fast.pe("flops").sum() == h * (w - 1) + (h - 1)
    assert_same(fast, reference.simulate(tr, small), f"barrier {w}x{h}")


@pytest.mark.parametrize("latency", [(2, 2), (1, 1), (2, 1)])
def test_the_threshold_is_the_least_length_the_model_favours(latency):
    """flat_from is the least m with m (saved - 1 / chunks(m)) >= extra latency (chunks grow
    with m, so the condition is checked per chunk count, not iterated to a fixed point). (Found:
    a fixed-point iteration alternated between two lengths, e.g. 52 and 64 on 72 PEs.)"""
    from wse.workload.collectives import flat_chunks

    def favoured(red, m):
        extra, saved = red.flat_model(*latency)
        k = flat_chunks(m)
        return m * (saved * k - 1) >= extra * k
    for n in range(3, 400):
        red = LineAllReduce(n, COLORS, flat_latency=latency)
        if red.flat is None:  # one group (short lines), or a root that saves nothing
            assert red.groups == 1 or red.flat_threshold(*latency) is None
            continue
        m = red.flat_from
        assert favoured(red, m) and not any(favoured(red, x) for x in range(1, m)), (n, m)
