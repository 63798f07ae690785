"""Exports of a run file: a Chrome/Perfetto trace of op timelines, and CSV tables."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..errors import RunFileError
from .store import RunFile


def perfetto(rf: RunFile, path: str | Path) -> int:
    """Chrome trace-event JSON (opens in ui.perfetto.dev / chrome://tracing): one process per
    sampled PE, one track per microthread, one slice per op, timed in microseconds at the
    configured clock. Returns the number of slices."""
    ev = rf.events
    if ev is None:
        raise RunFileError(f"{rf.path}: the run file has no /events (op timelines)")
    clock = rf.config().clock_hz
    names = _tag_names(rf)
    out = []
    pids: dict[tuple[int, int], int] = {}
    for i in range(len(ev["x"])):
        pe = (int(ev["x"][i]), int(ev["y"][i]))
        pid = pids.setdefault(pe, len(pids))
        start, end = int(ev["start_cycle"][i]), int(ev["end_cycle"][i])
        out.append({"name": names.get(int(ev["tag"][i]), f"op {int(ev['op'][i])}"), "ph": "X", "pid": pid,
                    "tid": int(ev["thread"][i]), "ts": start / clock * 1e6, "dur": (end - start) / clock * 1e6,
                    "args": {"op": int(ev["op"][i]), "start_cycle": start, "end_cycle": end}})
    for (x, y), pid in pids.items():
        out.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"PE ({x}, {y})"}})
    _write(path, lambda f: json.dump({"traceEvents": out, "displayTimeUnit": "ns"}, f))
    return len(out) - len(pids)


def _tag_names(rf: RunFile) -> dict[int, str]:
    ops = rf.ops
    if ops is None:
        return {}
    return {int(t): str(n) for t, n in zip(ops["tag"], ops["name"])}


def csv_tables(rf: RunFile, path: str | Path) -> list[Path]:
    """The summary (metric, value) as PATH and the ops table as PATH-ops.csv."""
    path = Path(path)
    _write(path, lambda f: _rows(f, ["metric", "value"], sorted(rf.summary.items())))
    written = [path]
    ops = rf.ops
    if ops is not None:
        ops_path = path.with_name(f"{path.stem}-ops{path.suffix or '.csv'}")
        from .store import OPS
        cols = [c for c in OPS if c in ops] + [c for c in ops if c not in OPS]
        n = len(ops[cols[0]]) if cols else 0
        _write(ops_path, lambda f: _rows(f, cols, [[_cell(ops[c][i]) for c in cols] for i in range(n)]))
        written.append(ops_path)
    return written


def _cell(v):
    return v.item() if isinstance(v, np.generic) else v


def _rows(f, header, rows) -> None:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def _write(path: str | Path, fill) -> None:
    from ..files import replacing
    path = Path(path)
    with replacing(path, RunFileError, "file") as tmp:
        with open(tmp, "w", newline="") as f:
            fill(f)
