"""The sweep file (docs/results-schema.md, "Sweep files"): one table, a row per point, every input
and every headline figure, with units; its plots (a Pareto front and one figure per swept axis)
and its CSV export.

Layout: root attributes `kind = "sweep"`, `schema_version`, `wse_version`, `created`, `spec`
(the spec's TOML text), `axes` (the swept keys), `points` (points in the spec) and `complete`
(every point has a row); group `/points` with one 1-D dataset per column along dimension
`point`, each with `units`, `description` and `dims` attributes, as the run files' tables are
(xarray opens the group as a Dataset). Written as a temporary file renamed into place.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..errors import RunFileError
from ..files import replacing
from .store import attach_scales, plain

SCHEMA_VERSION = 1
Row = dict[str, tuple[Any, str, str]]  # column -> (value, units, description)


def is_sweep(path: str | Path) -> bool:
    """Whether `path` is an HDF5 file with kind = "sweep"."""
    try:
        with h5py.File(path, "r") as f:
            return plain(f.attrs.get("kind", "")) == "sweep"
    except (OSError, ValueError):
        return False


def write_sweep(path: str | Path, rows: list[Row], spec, complete: bool) -> None:
    """Write the table atomically (spec: system.sweep.Spec)."""
    path = Path(path)
    cols: dict[str, tuple[str, str]] = {}
    for r in rows:
        for k, (_, units, desc) in r.items():
            cols.setdefault(k, (units, desc))
    if "error" in cols:  # last, whichever row came first
        cols["error"] = cols.pop("error")
    with replacing(path, RunFileError, "sweep file") as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["complete"] = False
            f.attrs["kind"] = "sweep"
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["wse_version"] = __version__
            f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            f.attrs["spec"] = spec.text
            f.attrs["axes"] = json.dumps(spec.axes)
            f.attrs["points"] = len(spec.points)
            g = f.create_group("points", track_order=True)
            for k, (units, desc) in cols.items():
                d = g.create_dataset(k, data=_column([r[k][0] if k in r else None for r in rows]))
                d.attrs["units"], d.attrs["description"], d.attrs["dims"] = units, desc, "point"
            attach_scales(g)  # the key column `point` becomes the dimension scale: xarray names it
            f.attrs["complete"] = complete


def _column(values: list[Any]) -> np.ndarray:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return np.array([bool(v) for v in values])
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        if all(isinstance(v, int) for v in present) and len(present) == len(values):
            return np.array(values, dtype=np.int64)
        return np.array([math.nan if v is None else float(v) for v in values])
    return np.array(["" if v is None else str(v) for v in values], dtype=h5py.string_dtype())


def read_rows(path: str | Path) -> list[Row]:
    """The rows of an earlier sweep at `path` ([] when there is no file). A file there that is
    not a sweep file is refused, never overwritten."""
    path = Path(path)
    if not path.exists():
        return []
    if not is_sweep(path):
        raise RunFileError(f"{path}: exists and is not a sweep file (not overwriting it)")
    table, units, descs = read_table(path)[:3]
    n = len(table.get("point", []))
    return [{k: (plain(table[k][i]), units[k], descs[k]) for k in table} for i in range(n)]


def read_table(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str], dict[str, Any]]:
    """(columns, units, descriptions, attributes) of a sweep file; errors name the file."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if plain(f.attrs.get("kind", "")) != "sweep" or "points" not in f:
                raise RunFileError(f"{path}: not a sweep file")
            attrs = {k: plain(v) for k, v in f.attrs.items()}
            axes = json.loads(attrs.get("axes", "[]"))
            if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
                raise ValueError("attribute axes is not a list of keys")
            cols, units, descs = {}, {}, {}
            for k, d in f["points"].items():
                a = d[()]
                cols[k] = np.array([plain(v) for v in a], dtype=object) if a.dtype.kind in "OS" else a
                units[k], descs[k] = plain(d.attrs.get("units", "")), plain(d.attrs.get("description", ""))
    except RunFileError:
        raise
    except OSError:
        raise RunFileError(f"{path}: not a readable HDF5 sweep file") from None
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:  # JSONDecodeError included
        raise RunFileError(f"{path}: damaged sweep file ({type(e).__name__}: {e})") from None
    if any(not isinstance(c, np.ndarray) or c.ndim != 1 for c in cols.values()):
        raise RunFileError(f"{path}: a sweep column is not one-dimensional")
    lengths = {len(c) for c in cols.values()}
    if len(lengths) > 1:
        raise RunFileError(f"{path}: sweep columns differ in length")
    return cols, units, descs, attrs


def csv_sweep(path_in: str | Path, path_out: str | Path) -> Path:
    """The table as CSV, units in a second header row."""
    import csv
    cols, units, _, _ = read_table(path_in)
    names = list(cols)
    n = len(next(iter(cols.values()))) if cols else 0
    from .export import _write

    def fill(f):
        w = csv.writer(f)
        w.writerow(names)
        w.writerow([units[k] for k in names])
        w.writerows([[plain(cols[k][i]) for k in names] for i in range(n)])
    _write(path_out, fill)
    return Path(path_out)


def pareto(cost: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both (lower cost, higher rate), by rate."""
    ok = np.flatnonzero(np.isfinite(cost) & np.isfinite(rate))
    front = [i for i in ok if not any((cost[j] <= cost[i] and rate[j] >= rate[i])
                                      and (cost[j] < cost[i] or rate[j] > rate[i]) for j in ok)]
    return np.array(sorted(front, key=lambda i: rate[i]), dtype=np.int64)


def plot_sweep(path: str | Path, outdir: str | Path) -> list[Path]:
    """pareto.png ($/Mtok against tokens/s per user, wafer system and GPU nodes) and one
    axis_<key>.png per swept axis (tokens/s per user and $/Mtok against it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, _, _, attrs = read_table(path)
    out = Path(outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFileError(f"{out}: cannot create the plot folder ({e.strerror})") from None
    need = ("tokens_per_s_per_user", "cost_per_mtok_usd")
    if any(k not in cols for k in need):
        raise RunFileError(f"{path}: no point has figures yet (nothing to plot)")
    written = []

    def save(fig, name):
        p = out / name
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(p)

    fig, ax = plt.subplots(figsize=(7, 5))
    for side, rate_k, cost_k, mark in (("wafer system", *need, "o"),
                                       ("GPU nodes", "gpu_tokens_per_s_per_user", "gpu_cost_per_mtok_usd", "s"),
                                       ("wafer system, deepest pipeline", "tokens_per_s_per_user_full",
                                        "cost_per_mtok_full_usd", "^"),
                                       ("GPU nodes, cheapest batch", "gpu_tokens_per_s_per_user_cheapest",
                                        "gpu_cost_per_mtok_cheapest_usd", "v")):
        if rate_k not in cols:
            continue
        rate, cost = _floats(cols[rate_k]), _floats(cols[cost_k])
        ax.scatter(rate, cost, marker=mark, alpha=0.5, label=side)
        front = pareto(cost, rate)
        if len(front):
            ax.plot(rate[front], cost[front], marker=mark, label=f"{side}: Pareto front")
    ax.set_xlabel("tokens/s per user")
    ax.set_ylabel("$ per million tokens")
    ax.set_yscale("log")
    ax.set_title("cost against speed per user")
    ax.legend()
    save(fig, "pareto.png")

    axes = [a for a in json.loads(attrs.get("axes", "[]")) if a in cols]
    for a in axes:
        others = [o for o in axes if o != a]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
        groups: dict[tuple, list[int]] = {}
        for i in range(len(cols[a])):
            groups.setdefault(tuple(plain(cols[o][i]) for o in others), []).append(i)
        xs = list(dict.fromkeys(plain(v) for v in cols[a]))
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        for g, idx in list(groups.items())[:12]:
            idx = sorted(idx, key=lambda i: plain(cols[a][i]) if numeric else xs.index(plain(cols[a][i])))
            x = [plain(cols[a][i]) if numeric else xs.index(plain(cols[a][i])) for i in idx]
            label = ", ".join(f"{o}={v}" for o, v in zip(others, g)) or None
            top.plot(x, _floats(cols[need[0]])[idx], marker="o", label=label)
            bottom.plot(x, _floats(cols[need[1]])[idx], marker="o", label=label)
        top.set_ylabel("tokens/s per user")
        bottom.set_ylabel("$ per million tokens")
        bottom.set_xlabel(a)
        if not numeric:
            bottom.set_xticks(range(len(xs)), [str(x) for x in xs])
        if others:
            top.legend(fontsize=7)
        top.set_title(f"against {a}")
        save(fig, f"axis_{a.replace('.', '_')}.png")
    return written


def _floats(a: np.ndarray) -> np.ndarray:
    out = np.full(len(a), math.nan)
    for i, v in enumerate(a):
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            pass
    return out
