"""The Numba engine (serial and parallel kernels) against the plain-Python reference stepper,
counter for counter, on random small traces (docs/model.md section 1)."""
from hypothesis import given, settings, strategies as st

from engine_compare import assert_same
from randomtrace import random_trace
from wse.engine import reference
from wse.engine.run import simulate
from wse.trace import validate


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
