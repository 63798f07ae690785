"""Per-part cycles of a decode layer, side by side for several run files.

    python tools/layer_parts.py classic.h5 flash.h5 [...]

Each part's span is its first op's start to its last op's end over all PEs (parts overlap:
one PE may start the next part while another finishes this one), read from the run file's
/ops table (docs/results-schema.md). The `layer` row is the composed cycles per layer.
"""
from __future__ import annotations

import sys

import h5py

PARTS = ("input", "norm1", "qkv", "attention", "o", "norm2", "ffn", "handoff", "output")


def spans(path: str) -> dict[str, int]:
    with h5py.File(path, "r") as f:
        ops = f["ops"]
        names = [n.decode() for n in ops["name"][:]]
        start, end = ops["start_cycle"][:], ops["end_cycle"][:]
        out = {}
        for n, s, e in zip(names, start, end):
            part = n.split()[-1] if n.startswith("layer ") else None
            if part in PARTS:
                out[part] = out.get(part, 0) + int(e - s)
        if "summary" in f and "layer_cycles" in f["summary"]:
            out["layer"] = int(f["summary"]["layer_cycles"][()])
    return out


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip().splitlines()[0])
        return 2
    cols = [spans(p) for p in paths]
    print(f"{'part':<10}" + "".join(f"{p[-28:]:>30}" for p in paths))
    for part in PARTS + ("layer",):
        if any(part in c for c in cols):
            print(f"{part:<10}" + "".join(f"{c.get(part, 0):>30,}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
