"""Engine speed benchmark: dense `neighbor` traffic (256x256 and the whole wse3 mesh),
cold JIT compile and warm start; the same figures as `wse bench --only dense,wse3,jit`
(definitions in wse/bench.py and docs/performance.md).

    python tools/bench_engine.py [--quick] [--json]
"""
from __future__ import annotations

import argparse
import json

from wse import bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    results = {n: bench.run_isolated(n, a.quick) for n in ("dense", "wse3", "jit")}
    print(json.dumps(results) if a.json else "\n".join(bench.format_results(results)))


if __name__ == "__main__":
    main()
