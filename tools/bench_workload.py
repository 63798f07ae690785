"""Workload speed benchmark: one llama3.1-8b decode layer on wse3, a whole composed 8B decode
token, and llama3.1-70b at its per-wafer share of layers; the same figures as
`wse bench --only layer,token8b,token70b` (definitions in wse/bench.py, docs/performance.md).

    python tools/bench_workload.py [--quick] [--json] [--skip-70b]
"""
from __future__ import annotations

import argparse
import json

from wse import bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--skip-70b", action="store_true", help="leave out the (longest) 70B figure")
    a = ap.parse_args()
    names = ("layer", "token8b") if a.skip_70b else ("layer", "token8b", "token70b")
    results = {n: bench.run_isolated(n, a.quick) for n in names}
    print(json.dumps(results) if a.json else "\n".join(bench.format_results(results)))


if __name__ == "__main__":
    main()
