"""Soak the engine against the reference stepper on many random traces (outside the suite).

    python tools/soak.py [--seeds N] [--start S] [--generator wide|small|both] [--values]

For each seed: the plain-Python reference stepper, the serial kernel on a random tile shape,
the parallel kernel (2 threads) on another, and dense stepping must agree counter for counter
(dense and skipping also on the timeline, per-op table and event log). Prints a tally of
outcomes and exits 1 at the first disagreement, naming the seed. With --values: the functional
evaluator against the reference stepper carrying payloads, byte for byte, on the same traces with
each thread's SRAM its own (tests/engine_compare.compare_values). docs/performance.md records
the last soaks.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from engine_compare import assert_same, compare_values  # noqa: E402
from randomtrace import privatize, random_trace, random_wide_trace  # noqa: E402

from wse.engine import reference  # noqa: E402
from wse.engine.run import simulate  # noqa: E402
from wse.trace_check import validate  # noqa: E402

TILES = [(1, 1), (1, 2), (2, 1), (2, 3), (3, 3), (4, 4), (4, 16), (8, 8)]


def check(gen, seed: int) -> str:
    tr, cfg = gen(seed)
    validate(tr, cfg)
    rng = np.random.default_rng(seed)
    t1, t2 = (TILES[int(i)] for i in rng.integers(0, len(TILES), 2))
    ref = reference.simulate(tr, cfg)
    serial = simulate(tr, cfg, parallel=False, validated=True, tile=t1)
    assert_same(serial, ref, f"seed {seed} serial tile {t1}")
    assert_same(simulate(tr, cfg, parallel=True, threads=2, validated=True, tile=t2), ref,
                f"seed {seed} parallel tile {t2}")
    dense = simulate(tr, cfg, parallel=False, validated=True, dense=True)
    assert_same(dense, ref, f"seed {seed} dense")
    for part in ("timeline", "ops", "events"):
        a, b = getattr(serial, part), getattr(dense, part)
        for k in a:
            assert np.array_equal(a[k], b[k]), f"seed {seed}: {part}/{k} differs between skipping and dense"
    return ref.stop_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10000)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--generator", choices=("wide", "small", "both"), default="both")
    ap.add_argument("--values", action="store_true", help="soak functional values instead of counters")
    a = ap.parse_args()
    gens = {"wide": [random_wide_trace], "small": [random_trace], "both": [random_wide_trace, random_trace]}[a.generator]
    tally: Counter = Counter()
    t0 = time.perf_counter()
    for i, seed in enumerate(range(a.start, a.start + a.seeds)):
        for gen in gens:
            try:
                if a.values:
                    tr, cfg = gen(seed)
                    tally[f"{gen.__name__}:{compare_values(privatize(tr), cfg, seed)}"] += 1
                else:
                    tally[f"{gen.__name__}:{check(gen, seed)}"] += 1
            except AssertionError as e:
                print(f"MISMATCH ({gen.__name__}): {e}", flush=True)
                sys.exit(1)
        if (i + 1) % 500 == 0:
            print(f"{i + 1} seeds, {time.perf_counter() - t0:.0f} s: {dict(tally)}", flush=True)
    print(f"done: {a.seeds} seeds from {a.start} in {time.perf_counter() - t0:.0f} s, all agree: {dict(tally)}")


if __name__ == "__main__":
    main()
