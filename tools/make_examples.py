"""Regenerate the example traces shipped in traces/examples/ (replayable with `wse run`).

    python tools/make_examples.py
"""
from __future__ import annotations

from pathlib import Path

from wse.workload import synthetic

EXAMPLES = {
    "neighbor-64x64.h5": lambda: synthetic.neighbor(64, 64, 256, colors=4),
    "stream-32x1.h5": lambda: synthetic.stream(32, 1, 512, 31),
    "contention-16x4.h5": lambda: synthetic.contention(16, 4, 256, 8),
    "broadcast-32x1.h5": lambda: synthetic.broadcast(32, 1, 256),
    "chain-reduce-32x1.h5": lambda: synthetic.chain_reduce(32, 1, 1024),
    "compute-16x16.h5": lambda: synthetic.compute_pattern(16, 16, 4096),
}
OUT = Path(__file__).resolve().parent.parent / "traces" / "examples"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in EXAMPLES.items():
        make().save(OUT / name)
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
