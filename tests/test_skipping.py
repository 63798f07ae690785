"""Exact skipping (docs/model.md section 1.6): every skip path gives the counters, timeline,
per-op table and event log of dense stepping, and each test shows its path was taken."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine_compare import assert_same
from randomtrace import random_trace, random_wide_trace
from wse import isa
from wse.engine import run as engine_run
from wse.engine.run import simulate
from wse.trace import TraceBuilder, compute, recv, send, signal, wait
from wse.workload import synthetic as syn

E, W_, R_ = isa.PORT_EAST, isa.PORT_WEST, isa.PORT_RAMP


def assert_identical(skip, dense, what: str = "") -> None:
    """Counters, stop, timeline, ops table and event log all equal."""
    assert_same(skip, dense, what)
    for part in ("timeline", "ops", "events"):
        a, b = getattr(skip, part), getattr(dense, part)
        assert a.keys() == b.keys(), f"{what}: {part} columns"
        for k in a:
            assert np.array_equal(a[k], b[k]), f"{what}: {part}/{k} differs"
    assert dense.jumped_cycles == 0 and dense.stepped_cycles == dense.total_cycles
    assert skip.stepped_pe_cycles <= dense.stepped_pe_cycles, what


def both(trace, cfg, **kw):
    return simulate(trace, cfg, **kw), simulate(trace, cfg, dense=True, **kw)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_skipping_matches_dense_on_random_traces(seed):
    tr, cfg = random_trace(seed)
    skip, dense = both(tr, cfg, parallel=False)
    assert_identical(skip, dense, f"seed {seed}")


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_parallel_skipping_matches_dense_on_random_traces(seed):
    tr, cfg = random_trace(seed)
    skip = simulate(tr, cfg, parallel=True, threads=2)
    assert_identical(skip, simulate(tr, cfg, parallel=False, dense=True), f"seed {seed}")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(1, 1), (2, 3), (4, 4), (8, 8)]), st.booleans())
def test_tiles_skip_exactly_on_wide_traces(seed, tile, parallel):
    """Quiet tiles skipped (any tile shape, serial or parallel) against dense stepping: counters,
    timeline, per-op table and event log."""
    tr, cfg = random_wide_trace(seed)
    skip = simulate(tr, cfg, parallel=parallel, threads=2, tile=tile)
    assert_identical(skip, simulate(tr, cfg, parallel=False, dense=True), f"seed {seed} tile {tile}")


def test_setup_is_jumped_over_with_exact_setup_counts(tiny):
    """Every PE counts down a long setup: the kernel jumps to its end."""
    cfg = tiny.with_overrides(["compute.vector_setup_cycles=500"])
    skip, dense = both(syn.compute_pattern(8, 8, 64), cfg)
    assert_identical(skip, dense, "setup")
    assert (skip.pe("setup_cycles") == 500).all()
    assert skip.jumped_cycles >= 400 and skip.stepped_cycles < 60  # chunk ends step once


def test_receiver_sleeps_until_the_wavelet_arrives(tiny):
    """(3, 0) waits for data that (0, 0) sends after a long compute: it sleeps in recv stall."""
    b = TraceBuilder(4, 1)
    b.route(0, 0, 0, R_, [E])
    for x in (1, 2):
        b.route(x, 0, 0, W_, [E])
    b.route(3, 0, 0, W_, [R_])
    b.assign(0, 0, 0, [compute(isa.KIND_MOV, 4000, dst=4096, src0=8192), send(0, 6, 0)])
    b.assign(3, 0, 0, [recv(0, 6, 0)])
    tr = b.build()
    skip, dense = both(tr, tiny)
    assert_identical(skip, dense, "arrival")
    assert skip.pe("stall_recv_cycles")[0, 3] > 400
    # the receiver and the idle relays are skipped while (0, 0) computes
    assert skip.stepped_pe_cycles < dense.stepped_pe_cycles // 2


def test_sender_sleeps_until_a_queue_has_room(tiny):
    """The sender of a slow consumer stalls on full queues and wakes when credit returns."""
    from test_engine import slow_consumer
    skip, dense = both(slow_consumer(30, 96), tiny)
    assert_identical(skip, dense, "credit")
    assert skip.pe("stall_send_cycles")[0, 0] > 0
    assert skip.stepped_pe_cycles < dense.stepped_pe_cycles


def test_quiet_relays_are_skipped(tiny):
    """A broadcast row whose source computes first: relays with routes but no traffic skip."""
    skip, dense = both(syn.broadcast(8, 8, 20), tiny)
    assert_identical(skip, dense, "broadcast")
    assert skip.stepped_pe_cycles < dense.stepped_pe_cycles


def test_deadlock_is_found_by_jumping_to_the_watchdog(tiny):
    b = TraceBuilder(2, 2)
    b.assign(0, 0, 0, [wait(0), signal(1)])
    b.assign(0, 0, 1, [wait(1), signal(0)])
    b.assign(1, 1, 0, [compute(isa.KIND_MOV, 64, dst=4096, src0=8192)])
    cfg = tiny.with_overrides(["engine.watchdog_cycles=200000"])
    skip, dense = both(b.build(), cfg)
    assert skip.stop_name == "deadlock"
    assert_identical(skip, dense, "deadlock")
    assert skip.pe("stall_sync_cycles")[0, 0] == skip.total_cycles
    assert skip.jumped_cycles > 190000  # timeline sample points step once


def test_max_cycles_while_asleep(tiny):
    cfg = tiny.with_overrides(["compute.vector_setup_cycles=500", "engine.max_cycles=300"])
    skip, dense = both(syn.compute_pattern(4, 4, 64), cfg)
    assert skip.stop_name == "max_cycles" and skip.total_cycles == 300
    assert_identical(skip, dense, "max cycles")
    assert (skip.pe("setup_cycles") == 300).all()


def test_chunk_ends_inside_sleeps_are_accounted(tiny, monkeypatch):
    """Chunks of a few cycles fold the counters while CEs sleep (wake_all): same results."""
    from test_engine import slow_consumer
    cfg = tiny.with_overrides(["compute.vector_setup_cycles=37"])
    tr = slow_consumer(20, 64)
    reference = simulate(tr, cfg, dense=True)
    monkeypatch.setattr(engine_run, "MAX_CHUNK_CYCLES", 5)
    snaps = []
    skip = simulate(tr, cfg, snapshot=snaps.append, snapshot_seconds=0.0)
    assert snaps and all(s.stop_name == "running" for s in snaps)
    assert_identical(skip, reference, "small chunks")


def test_snapshots_match_dense_at_the_same_cycle(tiny, monkeypatch):
    """A snapshot taken while CEs sleep counts what dense stepping counted by then."""
    cfg = tiny.with_overrides(["compute.vector_setup_cycles=300"])
    monkeypatch.setattr(engine_run, "MAX_CHUNK_CYCLES", 16)
    snaps = []
    simulate(syn.compute_pattern(4, 4, 64), cfg, snapshot=snaps.append, snapshot_seconds=0.0)
    at = [s for s in snaps if s.total_cycles == 144]
    assert at, [s.total_cycles for s in snaps]
    dense = simulate(syn.compute_pattern(4, 4, 64), cfg.with_overrides(["engine.max_cycles=144"]), dense=True)
    assert np.array_equal(at[0].pe("setup_cycles"), dense.pe("setup_cycles"))


@pytest.mark.parametrize("model, threads", [("tiny", 1), ("tiny", 2), ("tiny-moe", 2)])
def test_decode_stage_matches_dense(model, threads):
    """A decode layer stage of a small model: kernels of every kind, skipping against dense."""
    from wse import hardware
    from wse.workload.stages import stage_S
    from wse.workload.decode import plan_model
    from wse.workload.params import DecodeParams
    from wse.workload.models import load_model
    small = hardware.load_preset("small")
    plan = plan_model(load_model(model), small, DecodeParams(batch=2, context=12), P=16)
    tr = stage_S(plan, 1).trace
    skip = simulate(tr, small, threads=threads, parallel=threads > 1)
    dense = simulate(tr, small, dense=True, parallel=False)
    assert skip.complete
    assert_identical(skip, dense, "tiny layer")


def test_compute_stretch_is_jumped_over(tiny):
    """Local compute ops run one step per cycle: the kernel jumps to each op's last step."""
    skip, dense = both(syn.compute_pattern(8, 8, 6000), tiny)
    assert_identical(skip, dense, "compute")
    assert (skip.pe("busy_cycles") >= 6000 // 8).all()
    assert skip.jumped_cycles > 0.9 * skip.total_cycles


def test_arrivals_wake_a_computing_ce(tiny):
    """(3, 0) computes on thread 0 while thread 1 receives what (0, 0) sends: each arrival
    wakes the fast-forwarded CE mid-op, and a send stalled on a full queue waits beside it."""
    b = TraceBuilder(4, 1)
    b.route(0, 0, 0, R_, [E])
    for x in (1, 2):
        b.route(x, 0, 0, W_, [E])
    b.route(3, 0, 0, W_, [R_])
    b.route(3, 0, 1, R_, [W_])
    b.route(2, 0, 1, E, [R_])
    b.assign(0, 0, 0, [compute(isa.KIND_MOV, 240, dst=4096, src0=8192), send(0, 12, 0)])
    b.assign(3, 0, 0, [compute(isa.KIND_FMAC, 6000, dst=4096, src0=16384), signal(0),
                       compute(isa.KIND_ADD, 800, dst=4096, src0=8192, src1=12288)])
    b.assign(3, 0, 1, [recv(0, 12, 0), wait(0), send(1, 40, 0)])
    b.assign(2, 0, 0, [compute(isa.KIND_MOV, 3000, dst=4096, src0=8192), recv(1, 40, 0)])
    tr = b.build()
    skip, dense = both(tr, tiny)
    assert skip.complete
    assert_identical(skip, dense, "mixed")
    assert skip.stepped_pe_cycles < dense.stepped_pe_cycles // 3


@pytest.mark.parametrize("chunk", [None, 7])
def test_runs_of_compute_ops_are_replayed_exactly(tiny, monkeypatch, chunk):
    """A thread running many short local compute ops sleeps through the whole run: setups,
    steps, completions, per-tag statistics and the event log are replayed on waking, also when
    an arrival or a chunk end interrupts the run."""
    if chunk:
        monkeypatch.setattr(engine_run, "MAX_CHUNK_CYCLES", chunk)
    b = TraceBuilder(3, 1)
    b.route(0, 0, 0, R_, [E])
    b.route(1, 0, 0, W_, [E])
    b.route(2, 0, 0, W_, [R_])
    b.assign(0, 0, 0, [compute(isa.KIND_MOV, 8 * (i % 5 + 1), dst=4096, src0=8192) for i in range(30)]
             + [send(0, 4, 0)])
    chain = [compute(isa.KIND_FMAC, 3 + 7 * (i % 4), dst=4096, src0=16384) for i in range(40)]
    b.assign(2, 0, 0, chain[:20] + [compute(isa.KIND_ADD, 64, dst=4096, src0=8192, src1=12288)] + chain[20:])
    b.assign(2, 0, 1, [recv(0, 4, 0)])
    tr = b.build()
    skip, dense = both(tr, tiny)
    assert skip.complete
    assert_identical(skip, dense, "compute runs")
    assert len(skip.events["op"]) == 31 + 41 + 1  # every op of both programmed PEs
    assert skip.stepped_pe_cycles < dense.stepped_pe_cycles // 3


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans())
def test_a_coarse_timeline_changes_nothing_but_the_timeline(seed, parallel):
    """Stage simulations sample the timeline rarely (engine_run.STAGE_TIMELINE: fewer kernel calls
    and folds): counters, per-op table and event log equal the default's; the timeline covers the
    same busy PE-cycles and FLOPs in fewer samples."""
    tr, cfg = random_wide_trace(seed)
    fine = simulate(tr, cfg, parallel=parallel, threads=2)
    for timeline in (engine_run.STAGE_TIMELINE, (7, 2)):
        coarse = simulate(tr, cfg, parallel=parallel, threads=2, timeline=timeline)
        assert_same(coarse, fine, f"seed {seed} timeline {timeline}")
        for part in ("ops", "events"):
            for k in fine.__dict__[part]:
                assert np.array_equal(getattr(coarse, part)[k], getattr(fine, part)[k]), (seed, part, k)
        for k in ("busy_pe_cycles", "flops", "region_busy_pe_cycles"):
            assert np.array_equal(coarse.timeline[k].sum(axis=0), fine.timeline[k].sum(axis=0)), (seed, k)
        assert len(coarse.timeline["cycle"]) <= max(len(fine.timeline["cycle"]), timeline[1] + 1)
    with pytest.raises(ValueError):
        simulate(tr, cfg, timeline=(0, 16))
