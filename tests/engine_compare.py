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
