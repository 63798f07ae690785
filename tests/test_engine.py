"""Engine behaviour beyond the closed forms: backpressure, deadlock and max-cycles stops,
semaphores, shared SRAM ports, and determinism of run files for any thread count."""
import h5py
import numpy as np
import pytest

from engine_compare import assert_same
from wse import isa
from wse.engine import reference
from wse.engine.run import simulate
from wse.results.store import VOLATILE_ATTRS, RunInfo, write_run
from wse.trace import TraceBuilder, compute, recv, send, signal, wait
from wse.workload import synthetic as syn

E, W_, R_ = isa.PORT_EAST, isa.PORT_WEST, isa.PORT_RAMP


def slow_consumer(n: int, work: int) -> "Trace":  # noqa: F821
    """(0, 0) streams n wavelets 3 hops east; the receiver takes one, then computes `work`."""
    b = TraceBuilder(4, 1)
    b.route(0, 0, 0, R_, [E])
    b.route(1, 0, 0, W_, [E])
    b.route(2, 0, 0, W_, [E])
    b.route(3, 0, 0, W_, [R_])
    b.assign(0, 0, 0, [send(0, n, 0)])
    per_wavelet = [recv(0, 1, 0), compute(isa.KIND_MOV, work, dst=4096, src0=8192)]
    b.assign(3, 0, 0, per_wavelet * n)
    return b.build()


def test_slow_consumer_throttles_sender(tiny):
    n, work = 40, 64
    r = simulate(slow_consumer(n, work), tiny)
    assert r.complete
    assert r.pe("wavelets_sent").sum() == r.pe("wavelets_received").sum() == n
    depth = tiny.queue_depth_wavelets
    assert (r.pe("peak_queue_wavelets") <= depth).all()
    # the path holds at most 4 queues x depth (+ the CE queue) wavelets, so the sender cannot
    # finish until the consumer has taken all but those
    consumer_step = tiny.fabric_setup_cycles + 1 + tiny.vector_setup_cycles + work // 8
    assert r.pe("stall_send_cycles")[0, 0] > 0
    assert r.pe("finish_cycle")[0, 0] >= (n - 5 * depth - 1) * consumer_step
    # links upstream of the consumer report backpressure
    assert r.link("blocked_cycles")[0, :3, isa.PORT_EAST].sum() > 0
    assert_same(r, reference.simulate(slow_consumer(n, work), tiny), "slow consumer")


@pytest.mark.parametrize("depth", [1, 2, 3, 8])
def test_queues_never_exceed_their_depth(depth, tiny):
    cfg = tiny.with_overrides([f"fabric.queue_depth_wavelets={depth}"])
    for tr in (slow_consumer(25, 16), syn.contention(8, 4, 30, 2), syn.broadcast(8, 1, 30)):
        r = simulate(tr, cfg)
        assert r.complete
        assert r.pe("peak_queue_wavelets").max() <= depth
    # the slow consumer backs its path up completely
    assert simulate(slow_consumer(25, 16), cfg).pe("peak_queue_wavelets").max() == depth


def cyclic_wait() -> "Trace":  # noqa: F821
    """(0, 0) and (1, 0) each receive from the other before sending: a cycle of waits."""
    b = TraceBuilder(2, 1)
    b.route(0, 0, 0, R_, [E])
    b.route(1, 0, 0, W_, [R_])
    b.route(1, 0, 1, R_, [W_])
    b.route(0, 0, 1, E, [R_])
    b.assign(0, 0, 0, [recv(1, 4, 0), send(0, 4, 64)])
    b.assign(1, 0, 0, [recv(0, 4, 0), send(1, 4, 64)])
    return b.build()


def test_cyclic_wait_is_reported_as_deadlock_with_coordinates(tiny):
    cfg = tiny.with_overrides(["engine.watchdog_cycles=100"])
    r = simulate(cyclic_wait(), cfg)
    assert r.stop_name == "deadlock"
    # nothing ever progresses after the setup, which ends at cycle fabric_setup - 1
    assert r.total_cycles == cfg.fabric_setup_cycles - 1 + 100 + 1
    text = "\n".join(r.stuck)
    assert "PE (0, 0) thread 0" in text and "PE (1, 0) thread 0" in text
    assert "color 1" in text and "color 0" in text
    assert_same(r, reference.simulate(cyclic_wait(), cfg), "cyclic wait")


def test_semaphore_cycle_is_a_deadlock(tiny):
    b = TraceBuilder(1, 1)
    b.assign(0, 0, 0, [wait(0), signal(1)])
    b.assign(0, 0, 1, [wait(1), signal(0)])
    cfg = tiny.with_overrides(["engine.watchdog_cycles=10"])
    r = simulate(b.build(), cfg)
    # nothing ever progresses: the watchdog fires at the end of cycle watchdog - 1
    assert r.stop_name == "deadlock" and r.total_cycles == 10
    assert any("semaphore 0" in s for s in r.stuck) and any("semaphore 1" in s for s in r.stuck)
    assert r.pe("stall_sync_cycles")[0, 0] == 10


def test_max_cycles_stops_and_reports(tiny):
    cfg = tiny.with_overrides(["engine.max_cycles=50"])
    r = simulate(syn.compute_pattern(2, 2, 10_000), cfg)
    assert r.stop_name == "max_cycles" and r.total_cycles == 50
    assert any("elements left" in s for s in r.stuck)
    assert (r.pe("busy_cycles") == 50 - cfg.vector_setup_cycles).all()


def test_signal_orders_threads(tiny):
    """A wait releases the cycle after the signal; the waiting thread counts sync stalls."""
    b = TraceBuilder(1, 1)
    b.assign(0, 0, 0, [compute(isa.KIND_ADD, 80, 0, 1024, 2052), signal(3)])
    b.assign(0, 0, 1, [wait(3), compute(isa.KIND_MOV, 8, 4096, 6144)])
    r = simulate(b.build(), tiny)
    s, e = tiny.vector_setup_cycles, 8
    signal_cycle = s + 80 // e  # the add's last step is at s + 10 - 1; the signal runs next
    wait_cycle = signal_cycle + 1  # the signal is visible one cycle later
    assert r.total_cycles == wait_cycle + 1 + s + 1  # then the MOV's setup and its one step
    assert r.pe("stall_sync_cycles")[0, 0] == 0  # thread 0 was busy while thread 1 waited
    assert_same(r, reference.simulate(b.build(), tiny), "signal")


def test_two_threads_share_the_write_port(tiny):
    """Two MOVs each need the single write port every step: they take turns."""
    b = TraceBuilder(1, 1)
    b.assign(0, 0, 0, [compute(isa.KIND_MOV, 64, 0, 8192)])
    b.assign(0, 0, 1, [compute(isa.KIND_MOV, 64, 4096, 12288)])
    r = simulate(b.build(), tiny)
    assert r.total_cycles == tiny.vector_setup_cycles + 2 * 64 // 8
    two_ports = simulate(b.build(), tiny.with_overrides(["sram.sram_write_ports=2"]))
    assert two_ports.total_cycles == tiny.vector_setup_cycles + 64 // 8


def test_wider_links_carry_two_streams_at_full_rate(tiny):
    wide = tiny.with_overrides(["fabric.link_wavelets_per_cycle=2"])
    n = 100
    narrow_cycles = simulate(syn.contention(8, 4, n, 2), tiny).total_cycles
    wide_cycles = simulate(syn.contention(8, 4, n, 2), wide).total_cycles
    assert narrow_cycles - wide_cycles == n


def test_empty_trace_completes_at_zero(tiny):
    b = TraceBuilder(3, 3)
    r = simulate(b.build(), tiny)
    assert r.complete and r.total_cycles == 0 and r.pe_counters.sum() == 0


def _run_file_contents(path):
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: v for k, v in f.attrs.items() if k not in VOLATILE_ATTRS}

        def visit(name, obj):  # (dimension-scale bookkeeping holds object references: compared as names)
            if isinstance(obj, h5py.Dataset):
                attrs = {k: v for k, v in obj.attrs.items() if k not in ("DIMENSION_LIST", "REFERENCE_LIST")}
                attrs["scales"] = [[s.name for s in d.values()] for d in obj.dims]
                out[name] = (obj[()], attrs)
        f.visititems(visit)
    return out


@pytest.mark.parametrize("make", [lambda: syn.neighbor(64, 64, 30, colors=4),
                                  lambda: slow_consumer(30, 8)])
def test_run_files_identical_for_one_and_two_threads(make, tiny, tmp_path):
    from wse import hardware
    cfg = hardware.load_preset("small")
    tr = make()
    files = []
    for threads in (1, 2):
        r = simulate(tr, cfg, parallel=True, threads=threads)
        path = tmp_path / f"run{threads}.h5"
        write_run(path, r, cfg, RunInfo("t.h5", tr.content_hash(), (tr.mesh_width, tr.mesh_height),
                                        threads, r.wall_seconds))
        files.append(_run_file_contents(path))
    a, b = files
    assert a.keys() == b.keys()
    assert a["attrs"] == b["attrs"]
    for k in a:
        if k != "attrs":
            assert np.array_equal(a[k][0], b[k][0]), k
            assert a[k][1] == b[k][1], k
