"""The example traces in traces/examples/ are current and replay out of the box."""
import importlib.util
from pathlib import Path

import pytest

from wse import hardware, trace
from wse.engine.run import simulate

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("make_examples", ROOT / "tools" / "make_examples.py")
make_examples = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_examples)


@pytest.mark.parametrize("name", sorted(make_examples.EXAMPLES))
def test_example_is_current_and_runs(name):
    path = ROOT / "traces" / "examples" / name
    shipped = trace.load(path)
    assert shipped.content_hash() == make_examples.EXAMPLES[name]().content_hash(), \
        f"{name} is stale: run python tools/make_examples.py"
    r = simulate(shipped, hardware.load_preset("wse3"))
    assert r.complete and r.total_cycles > 0
