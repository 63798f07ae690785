"""The Numba engine (serial and parallel kernels) against the plain-Python reference stepper,
counter for counter, on random small traces (docs/model.md section 1)."""
from hypothesis import example, given, settings, strategies as st

from engine_compare import assert_same
from randomtrace import random_trace, random_wide_trace
from wse.engine import reference
from wse.engine.run import simulate
from wse.trace_check import validate


@settings(max_examples=120, deadline=None, derandomize=False)
@given(st.integers(0, 2**32 - 1))
def test_serial_kernel_matches_reference(seed):
    tr, cfg = random_trace(seed)
    validate(tr, cfg)
    assert_same(simulate(tr, cfg, parallel=False, validated=True), reference.simulate(tr, cfg),
                f"seed {seed}")


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_parallel_kernel_matches_reference(seed):
    tr, cfg = random_trace(seed)
    validate(tr, cfg)
    assert_same(simulate(tr, cfg, parallel=True, threads=2, validated=True), reference.simulate(tr, cfg),
                f"seed {seed}")


TILES = [(1, 1), (1, 3), (2, 2), (3, 2), (4, 5), (8, 8)]


# Fixed wide seeds besides the drawn ones (few, so the suite stays short; tools/soak.py soaks
# thousands): a completed run, a deadlock and a max_cycles stop, each on a mesh of more than one
# 8 x 8 tile with multicast to three link ports, and every tile shape once.
@settings(max_examples=10, deadline=None)
@example(45, (1, 1))  # completes, 9 x 10
@example(69, (2, 2))  # deadlocks, 9 x 11
@example(118, (3, 2))  # stops at max_cycles, 9 x 11
@example(140, (4, 5))  # completes, 11 x 12
@example(4, (1, 3))  # deadlocks, 11 x 11
@example(46, (8, 8))  # stops at max_cycles, 13 x 11
@given(st.integers(0, 2**32 - 1), st.sampled_from(TILES))
def test_wide_traces_match_reference(seed, tile):
    """16 x 16 meshes, multicast to 2-3 link ports, long streams, deep queues, semaphores across
    threads, on tiles small enough that activity crosses tile boundaries everywhere."""
    tr, cfg = random_wide_trace(seed)
    validate(tr, cfg)
    assert_same(simulate(tr, cfg, parallel=False, validated=True, tile=tile), reference.simulate(tr, cfg),
                f"seed {seed} tile {tile}")


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(TILES))
def test_wide_traces_parallel_match_reference(seed, tile):
    tr, cfg = random_wide_trace(seed)
    validate(tr, cfg)
    assert_same(simulate(tr, cfg, parallel=True, threads=2, validated=True, tile=tile),
                reference.simulate(tr, cfg), f"seed {seed} tile {tile}")


def test_wide_traces_cover_every_outcome():
    """The wide generator yields completed, deadlocked and max_cycles runs, multicast to two and
    three link ports, and meshes of more than one 8 x 8 tile."""
    from collections import Counter

    outcomes, ports, big = Counter(), set(), 0
    for seed in range(60):
        tr, cfg = random_wide_trace(seed)
        outcomes[simulate(tr, cfg, parallel=False).stop_name] += 1
        ports |= {bin(int(v) & 15).count("1") for v in tr.routes["tx"]}
        big += tr.mesh_width > 8 and tr.mesh_height > 8
    assert set(outcomes) == {"complete", "deadlock", "max_cycles"} and outcomes["complete"] >= 30
    assert {2, 3} <= ports and big >= 10


def test_random_traces_cover_every_outcome():
    """The generator is worth trusting: it yields completed, deadlocked and max_cycles runs and
    exercises multicast, fused chain ops, semaphores and every dtype (the low-precision
    dequantize forms included)."""
    from collections import Counter

    from wse import isa
    outcomes, opcodes, dtypes, multicast = Counter(), set(), set(), 0
    for seed in range(80):
        tr, cfg = random_trace(seed)
        r = reference.simulate(tr, cfg)
        outcomes[r.stop_name] += 1
        opcodes |= set(int(c) for c in tr.ops["opcode"])
        computing = tr.ops["opcode"] != isa.OP_SEND
        dtypes |= set(int(c) for c in tr.ops["dtype"][computing & (tr.ops["kind"] != isa.KIND_NONE)])
        tx = tr.routes["tx"].astype(int)
        multicast += int((((tx & 15) != 0) & ((tx >> isa.PORT_RAMP) & 1 == 1)).sum())
    assert set(outcomes) == {"complete", "deadlock", "max_cycles"}
    assert outcomes["complete"] >= 20
    assert opcodes == set(range(isa.N_OPCODES)) and dtypes == set(range(isa.N_DTYPES))
    assert multicast > 0
