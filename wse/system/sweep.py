"""`wse sweep`: `wse system` over a grid (and a list) of points, one table row per point
(docs/scale-out.md).

A spec is TOML: `[base]` holds what every point shares, `[grid]` lists values per axis (every
combination runs), `[[points]]` adds single points. Keys are `wse system`'s options in snake
case (model, system, wafers, batch, context, weights, slot_shape, ...) or a dotted configuration
key (`"fabric.hop_latency_cycles"`, `"cost.utilization"`: a `--set` name). Points share one
Fanout, so their stage simulations run as Dask tasks and meet in one stage cache; points run
concurrently when a cluster simulates. The output is rewritten after every point, so a rerun
after a crash finds the finished rows (by each point's key) and computes only the rest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

from ..errors import WseError
from ..tomlfile import read_toml
from .cache import canonical
from .pool import Fanout

# option -> (type, default): the inputs of `wse system` a point sets
OPTIONS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "model": (str, None), "system": (str, "cs3x4"), "wafers": ((str, int), "preset"), "batch": (int, 1),
    "context": (int, 1024), "prompt_len": (int, 512), "expert_skew": ((float, int), 0.0),
    "moe_mapping": (str, "auto"), "experts_per_region": (int, 0), "slot_shape": (str, "tall"),
    "uniform_slots": (bool, False), "weights": (str, ""), "attention": (str, "flash"), "attention_block": (int, 0),
    "flash_blocks": (str, "auto"),
    "norms": (str, "fused"), "dense_ffn": (str, "auto"), "tables": (str, "auto"), "generate": (int, 1), "gpu": (str, "h100"), "prefill_steps": (int, 16), "prefill_chunk": (int, 0), "prefill_samples": (int, 3), "prefill_keys": (str, "blocked"),
    "allreduce": (str, "auto"), "handoff": (str, "fused"), "down_gemv": (str, "auto"), "gemv_form": (str, "axpy"),
    "mla_groups": ((str, int), 1),
}


class SweepError(WseError):
    """A sweep spec or output that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point: every `wse system` option resolved, and its configuration overrides."""

    options: tuple[tuple[str, Any], ...]
    sets: tuple[tuple[str, Any], ...]

    @property
    def key(self) -> str:
        doc = json.dumps(canonical([self.options, self.sets]), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    def option(self, name: str) -> Any:
        return dict(self.options)[name]

    def set_args(self) -> list[str]:
        return [f"{k}={_toml(v)}" for k, v in self.sets]


@dataclasses.dataclass
class Spec:
    points: list[Point]
    axes: list[str]  # keys given more than one value (grid axes, or varied by [[points]])
    text: str


def load_spec(path: str | Path) -> Spec:
    """Read and check a sweep spec; every point fully resolved."""
    path = Path(path)
    doc = read_toml(path, "sweep spec", SweepError)
    for k in doc:
        if k not in ("base", "grid", "points"):
            raise SweepError(f"{path}: unknown top-level key {k!r} (expected [base], [grid], [[points]])")
    base = _table(doc, "base", path)
    grid = _table(doc, "grid", path)
    listed = doc.get("points", [])
    if not isinstance(listed, list) or not all(isinstance(p, dict) for p in listed):
        raise SweepError(f"{path}: points must be an array of tables ([[points]])")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise SweepError(f"{path}: grid.{k} must be a non-empty array of values")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else []
    if not grid and not listed:
        combos = [{}]
    raw = [{**base, **c} for c in combos] + [{**base, **p} for p in listed]
    points, seen = [], set()
    for i, r in enumerate(raw):
        p = _point(r, f"{path}: point {i + 1}")
        if p.key not in seen:
            seen.add(p.key)
            points.append(p)
    varied = [k for k in dict.fromkeys(k for r in raw for k in r)
              if len({json.dumps(canonical(r.get(k))) for r in raw}) > 1]
    return Spec(points, varied, path.read_text(encoding="utf-8"))


def _table(doc: dict, name: str, path: Path) -> dict[str, Any]:
    t = doc.get(name, {})
    if not isinstance(t, dict):
        raise SweepError(f"{path}: {name} must be a table ([{name}])")
    return t


def _point(raw: dict[str, Any], where: str) -> Point:
    from ..hardware import PARAM_BY_PATH
    from .config import SCHEMA
    system_keys = {f"{s}.{k}" for s, k, *_ in SCHEMA}
    options, sets = {}, {}
    for k, v in raw.items():
        if "." in k:
            if k not in PARAM_BY_PATH and k not in system_keys:
                raise SweepError(f"{where}: unknown configuration key {k!r}")
            if not isinstance(v, (bool, int, float, str)):
                raise SweepError(f"{where}: {k} = {v!r} is not a number, boolean or string")
            sets[k] = v
            continue
        if k not in OPTIONS:
            raise SweepError(f"{where}: unknown key {k!r} (options: {', '.join(OPTIONS)}, or a dotted "
                             "configuration key)")
        typ = OPTIONS[k][0]
        if isinstance(v, bool) != (typ is bool) or not isinstance(v, typ):
            raise SweepError(f"{where}: {k} = {v!r} has the wrong type")
        options[k] = v
    for k, (_, default) in OPTIONS.items():
        options.setdefault(k, default)
    if not options["model"]:
        raise SweepError(f"{where}: no model (set model in [base], [grid] or the point)")
    if isinstance(options["expert_skew"], int):
        options["expert_skew"] = float(options["expert_skew"])
    return Point(tuple(options.items()), tuple(sorted(sets.items())))


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def point_figures(point: Point, simulate_for: Callable[[Any], Callable], fanout: Fanout) -> dict[str, tuple]:
    """Run one point (as `wse system` would) and return its figures (name -> (value, units,
    description)). `simulate_for(cfg)` gives the in-process simulate function."""
    from .compare import figures, run_options
    from .config import load_system
    o = dict(point.options)
    system = load_system(o.pop("system"), point.set_args())
    job = run_options(system, simulate_for(system.wafer_config), fanout, **o)
    out = figures(job)
    out["system_wafers"] = out.pop("wafers")  # "wafers" is the option's column (a number, auto or preset)
    clock = system.wafer_config.clock_hz
    out["token_latency_cycles"] = (round(job.decode.latency_s * clock), "cycles",
                                   "one token through every wafer and link, in wafer clock cycles")
    out["simulations"] = (sum(s.simulations for s in job.decode.steps), "stages",
                          "distinct stage simulations the decode step composed from")
    return out


def run_sweep(spec: Spec, output: str | Path, fanout: Fanout, simulate_for: Callable[[Any], Callable],
              on_point: Callable[[Point, dict | None, str], None] | None = None) -> list[dict[str, Any]]:
    """Every point not already in `output` (a sweep file of an earlier run), written after each;
    returns the rows in spec order. A point that fails with a WseError is recorded with its
    error (and run again by the next rerun); any other failure stops the sweep, leaving the
    finished rows for a rerun."""
    from ..results.sweep import read_rows, write_sweep
    keys = [p.key for p in spec.points]
    rows = {r["point"][0]: r for r in read_rows(output) if r["point"][0] in keys and not r.get("error", ("",))[0]}
    todo = [p for p in spec.points if p.key not in rows]
    fanout.progress.point(total=len(keys), done=len(keys) - len(todo))

    def save(complete: bool) -> None:
        write_sweep(output, [rows[k] for k in keys if k in rows], spec, complete)

    named = list(dict.fromkeys(k for p in spec.points for k, _ in p.sets))

    def one(p: Point) -> tuple[dict, str]:
        try:
            return _row(p, named, point_figures(p, simulate_for, fanout)), ""
        except WseError as e:
            return _row(p, named, {}), str(e)

    save(False)
    workers = min(fanout.workers, len(todo)) if fanout.remote(len(todo)) and len(todo) > 1 else 1
    if workers == 1:
        results = ((p, one(p)) for p in todo)
    else:
        fanout.concurrent = True
        pool = ThreadPoolExecutor(workers)
        futures = {pool.submit(one, p): p for p in todo}
        results = ((futures[f], f.result()) for f in as_completed(futures))
    finished = False
    try:
        for p, (row, error) in results:
            row["error"] = (error, "", "why the point has no figures (empty: none)")
            rows[p.key] = row
            fanout.progress.point(done=1)
            if on_point:
                on_point(p, row, error)
            save(False)
        finished = True
    finally:
        if workers > 1:
            if not finished:  # a failure or Ctrl-C: tasks in flight end, and a point's next call raises
                fanout.abort()
            pool.shutdown(wait=True, cancel_futures=True)
            fanout.concurrent = False
    save(all(k in rows for k in keys))
    return [rows[k] for k in keys if k in rows]


def _row(p: Point, named: list[str], figs: dict[str, tuple]) -> dict[str, Any]:
    """The point's inputs (every configuration key the spec names, at its value for this point:
    set, or the preset's) and its figures."""
    row: dict[str, Any] = {"point": (p.key, "", "content key of the point's inputs")}
    for k, v in p.options:
        row[k] = (v, "", f"wse system --{k.replace('_', '-')}")
    given = dict(p.sets)
    resolved = None
    for k in named:
        if k not in given and resolved is None:
            try:
                from .config import load_system
                system = load_system(p.option("system"), p.set_args())
                resolved = {**system.values, **system.wafer_config.values}
            except WseError:
                resolved = {}
        v = given.get(k, (resolved or {}).get(k))
        row[k] = (v, "", f"--set {k}" + ("" if k in given else " (the preset's value)"))
    for k, v in figs.items():
        row[k] = v
    return row

