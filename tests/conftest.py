import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from wse import hardware  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one test worker per core: the engine's default is then one Numba thread (tests that ask
    # for more still get them); oversubscribed cores would stall the parallel kernel's
    # per-cycle barrier for tens of times its work
    import numba
    numba.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_fanout(tmp_path_factory, monkeypatch):
    """Commands run in this process and cache stages in a folder of the test session, never the
    user's: tests that want a Dask cluster or a cache of their own say so."""
    monkeypatch.setenv("WSE_JOBS", "1")
    monkeypatch.setenv("WSE_CACHE", str(tmp_path_factory.getbasetemp() / "stage-cache"))
    monkeypatch.delenv("WSE_SCHEDULER", raising=False)


@pytest.fixture(scope="session")
def tiny() -> hardware.WaferConfig:
    """8x8 WSE-3-like wafer: hop latency 2, ramp latency 2, queue depth 4, 8-wide fp16 FMAC."""
    return hardware.load_preset("tiny")


@pytest.fixture(scope="session")
def tiny2() -> hardware.WaferConfig:
    """8x8 WSE-2-like wafer: hop latency 1, 4-wide fp16 FMAC."""
    return hardware.load_preset("tiny2")


@pytest.fixture(scope="session")
def small() -> hardware.WaferConfig:
    """64x64 WSE-3-like wafer for whole-model tests."""
    return hardware.load_preset("small")
