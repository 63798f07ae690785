"""Counter-for-counter comparison of two engine results."""
import numpy as np

from wse import isa


def assert_same(a, b, what: str = "") -> None:
    assert a.total_cycles == b.total_cycles, f"{what}: total_cycles {a.total_cycles} != {b.total_cycles}"
    assert a.stop == b.stop, f"{what}: stop {a.stop_name} != {b.stop_name}"
    for i, name in enumerate(isa.PE_COUNTER_NAMES):
        x, y = a.pe_counters[:, :, i], b.pe_counters[:, :, i]
        if not np.array_equal(x, y):
            where = tuple(int(v[0]) for v in np.nonzero(x != y))
            raise AssertionError(f"{what}: PE counter {name} differs at (y, x) = {where}: "
                                 f"{x[where]} != {y[where]}")
    for i, name in enumerate(isa.LINK_COUNTER_NAMES):
        x, y = a.link_counters[..., i], b.link_counters[..., i]
        if not np.array_equal(x, y):
            where = tuple(int(v[0]) for v in np.nonzero(x != y))
            raise AssertionError(f"{what}: link counter {name} differs at (y, x, port) = {where}: "
                                 f"{x[where]} != {y[where]}")


def compare_values(tr, cfg, seed: int) -> str:
    """A functional run's values, the dataflow evaluator against the reference stepper carrying
    payloads cycle by cycle (from random fp16 SRAM): 'same' (byte for byte, asserted), or 'skip'
    when the run does not complete or its values depend on the schedule (a race). The payloads
    must not change the reference's timing."""
    import numpy as np

    from randomtrace import random_sram
    from wse.engine import functional, reference
    from wse.trace_check import validate

    validate(tr, cfg)
    sram = random_sram(tr, seed)
    timing = reference.simulate(tr, cfg)
    ref = reference.simulate(tr, cfg, sram)
    assert ref.total_cycles == timing.total_cycles and np.array_equal(ref.pe_counters, timing.pe_counters) \
        and np.array_equal(ref.link_counters, timing.link_counters), f"seed {seed}: payloads changed the timing"
    if not ref.complete:
        return "skip"
    try:
        v = functional.evaluate(tr, sram)
    except functional.FunctionalError:  # waiters of one semaphore race in dataflow order
        return "skip"
    if v.raced:
        return "skip"
    n = v.sram.shape[1]
    assert np.array_equal(v.sram, ref.sram[:, :n]) and np.array_equal(ref.sram[:, n:], sram[:, n:]), \
        f"seed {seed}: values differ"
    return "same"
