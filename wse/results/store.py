"""The HDF5 run file (schema 1, docs/results-schema.md): what a run measured, written so that an
incomplete file never looks complete.

Root attributes name the run (schema and package versions, creation time, the resolved
configuration as TOML, the trace hash, seed, threads, wall time, stop reason) and `complete`,
which is set last and only for a completed run. Groups: `/summary` scalars, `/pe/<counter>`
[H, W] and `/link/<counter>` [H, W, 4] arrays, `/timeline` samples, the `/ops` table (one row
per workload-level op), `/events` (op timelines of sampled PEs), `/stuck`, and job tables such as
`/stages`. Every dataset carries `units`, `description` and `dims`; arrays are chunked and
compressed (gzip with shuffle). Files are written under a unique temporary name in the same
folder (files.temp_path) and renamed into place, so the name always holds a whole, readable
file: a placeholder at the start of a run, snapshots while it runs, the final file at the end.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__, isa
from ..engine.result import EngineResult
from ..errors import RunFileError
from ..files import printable, replacing
from ..hardware import WaferConfig, config_from_toml_text

SCHEMA_VERSION = 1
LINK_PORTS = "north,south,east,west"
# Attributes that differ between two runs of the same inputs (excluded from determinism checks).
VOLATILE_ATTRS = ("created", "wall_seconds", "threads")

TIMELINE = {  # name -> (units, description, dims)
    "cycle": ("cycle", "end of each sampling interval", "sample"),
    "busy_pe_cycles": ("cycles", "busy PE-cycles in the interval (divide by its length for active PEs)", "sample"),
    "flops": ("flop", "FLOPs executed in the interval", "sample"),
    "wavelets_in_flight": ("wavelets", "wavelets in router and CE queues at the sample", "sample"),
    "region_busy_pe_cycles": ("cycles", "busy PE-cycles in the interval per region (see regions)", "sample,region"),
    "regions": ("", "region names: 'layer L' for PEs running a layer, else their op's name", "region"),
}
OPS = {
    "tag": ("", "row of the trace's /tags table", "op"),
    "name": ("", "workload-level op, e.g. 'layer 3 qkv'", "op"),
    "layer": ("", "decoder layer, -1 when none", "op"),
    "kind": ("", "op kind: norm, gemv, attention, ffn, allreduce, transfer, barrier, ...", "op"),
    "start_cycle": ("cycle", "first step of any PE op with this tag", "op"),
    "end_cycle": ("cycle", "cycle after the last such op completed", "op"),
    "ops": ("ops", "PE ops completed", "op"),
    "pes": ("PEs", "PEs whose programs contain the op", "op"),
    "flops": ("flop", "FLOPs of the completed ops", "op"),
    "sram_bytes": ("bytes", "SRAM bytes read and written by the completed ops", "op"),
    "wavelets": ("wavelets", "wavelets the completed ops sent or received", "op"),
}
EVENTS = {
    "x": ("", "PE column", "event"),
    "y": ("", "PE row", "event"),
    "thread": ("", "microthread", "event"),
    "op": ("", "op index in the trace's op table", "event"),
    "tag": ("", "row of the trace's /tags table", "event"),
    "start_cycle": ("cycle", "first step of the op", "event"),
    "end_cycle": ("cycle", "cycle after it completed", "event"),
}


@dataclasses.dataclass
class RunInfo:
    """Identity of a run: where the trace came from and how it was stepped."""

    trace_path: str
    trace_hash: str
    trace_mesh: tuple[int, int]  # (width, height) simulated
    threads: int
    wall_seconds: float
    seed: int = 0  # runs are deterministic; kept for generators that draw random choices


def summary_values(res: EngineResult, cfg: WaferConfig) -> dict[str, tuple[Any, str, str]]:
    """Scalars for /summary: name -> (value, units, description)."""
    pe = res.pe_counters.astype(np.int64, copy=False)
    H, W = pe.shape[:2]
    cycles = res.total_cycles
    n_pe = H * W
    active = int((pe[:, :, isa.C_OPS] > 0).sum())
    busy = int(pe[:, :, isa.C_BUSY].sum())
    flops = int(pe[:, :, isa.C_FLOPS].sum())
    peak_flops_per_pe_cycle = 2 * min(cfg.simd_width(isa.KIND_FMAC, isa.DTYPE_FP16) or 1, cfg.sram_port_bytes // 2)
    link_slots = 4 * n_pe * cycles * cfg.link_wavelets_per_cycle
    out: dict[str, tuple[Any, str, str]] = {
        "total_cycles": (cycles, "cycles", "cycles until every thread finished and every queue drained"),
        "seconds": (cycles / cfg.clock_hz, "s", "total_cycles at the configured clock"),
        "simulated_pes": (n_pe, "PEs", "PEs in the trace's mesh"),
        "active_pes": (active, "PEs", "PEs that completed at least one op"),
        "pe_utilization": (busy / (n_pe * cycles) if cycles else 0.0, "fraction",
                           "busy PE-cycles over all simulated PE-cycles"),
        "active_pe_utilization": (busy / (active * cycles) if cycles and active else 0.0, "fraction",
                                  "busy PE-cycles over the PE-cycles of active PEs"),
        "flop_efficiency": (flops / (n_pe * cycles * peak_flops_per_pe_cycle) if cycles else 0.0,
                            "fraction", "FLOPs over the fp16 FMAC peak of the simulated PEs"),
        "link_utilization": (int(res.link_counters[..., isa.L_WAVELETS].sum()) / link_slots if link_slots else 0.0,
                             "fraction", "wavelets carried over the capacity of all links of the mesh"),
        "idle_cycles": (int(res.idle_cycles().sum()), "cycles", "PE-cycles in no busy, setup or stall class"),
    }
    for i, (name, units, desc) in enumerate(isa.PE_COUNTERS):
        if name in ("finish_cycle", "peak_queue_wavelets"):
            out[f"max_{name}"] = (int(pe[:, :, i].max(initial=0)), units, f"largest over PEs: {desc}")
        else:
            out[name] = (int(pe[:, :, i].sum()), units, f"sum over PEs: {desc}")
    for i, (name, units, desc) in enumerate(isa.LINK_COUNTERS):
        out[f"link_{name}"] = (int(res.link_counters[:, :, :, i].sum()), units, f"sum over links: {desc}")
    return out


def write_run(path: str | Path, res: EngineResult, cfg: WaferConfig, info: RunInfo,
              extra: dict[str, tuple[Any, str, str]] | None = None,
              tables: dict[str, dict[str, np.ndarray]] | None = None) -> Path:
    """Write the run file. Returns its path. `complete` is true only for a completed run.

    `extra` adds job-level scalars to /summary (name -> (value, units, description));
    `tables` adds columnar groups (group -> {column: array}).
    """
    path = Path(path)
    with replacing(path, RunFileError, "run file") as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["complete"] = False
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["wse_version"] = __version__
            f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            f.attrs["config"] = cfg.to_toml()
            f.attrs["wafer"] = cfg.name
            f.attrs["trace_path"] = printable(info.trace_path)
            f.attrs["trace_hash"] = info.trace_hash
            f.attrs["trace_mesh_width"], f.attrs["trace_mesh_height"] = info.trace_mesh
            f.attrs["seed"] = info.seed
            f.attrs["threads"] = info.threads
            f.attrs["wall_seconds"] = info.wall_seconds
            f.attrs["stop_reason"] = res.stop_name
            g = f.create_group("summary")
            for name, (value, units, desc) in {**summary_values(res, cfg), **(extra or {})}.items():
                _dataset(g, name, value, units, desc, "")
            g = f.create_group("pe")
            for i, (name, units, desc) in enumerate(isa.PE_COUNTERS):
                _dataset(g, name, res.pe(name), units, desc, "y,x")
            _dataset(g, "idle_cycles", res.idle_cycles(), "cycles",
                     "cycles in none of the busy, setup or stall classes", "y,x")
            g = f.create_group("link")
            g.attrs["ports"] = LINK_PORTS
            for name, units, desc in isa.LINK_COUNTERS:
                _dataset(g, name, res.link(name), units,
                         f"{desc} (port order {LINK_PORTS})", "y,x,port")
            if res.timeline is not None:
                g = f.create_group("timeline")
                tl = dict(res.timeline)
                tl["regions"] = tl.pop("region_names")
                for name, (units, desc, dims) in TIMELINE.items():
                    _dataset(g, name, tl[name], units, desc, dims)
            for group, spec, data in (("ops", OPS, res.ops), ("events", EVENTS, res.events)):
                if data is not None:
                    g = f.create_group(group)
                    for name, (units, desc, dims) in spec.items():
                        _dataset(g, name, data[name], units, desc, dims)
            if res.stuck:
                _dataset(f, "stuck", np.array(res.stuck, dtype=object), "",
                         "unfinished threads and undrained queues at the stop", "line")
            for group, cols in (tables or {}).items():
                tg = f.create_group(group)
                for col, arr in cols.items():
                    _dataset(tg, col, arr, "cycles" if col == "cycles" else "", f"{group}: {col}", "row")
            for g in f.values():
                if isinstance(g, h5py.Group):
                    attach_scales(g)
            f.flush()
            f.attrs["complete"] = res.complete
    return path


def _dataset(g: h5py.Group, name: str, value: Any, units: str, desc: str, dims: str) -> None:
    if isinstance(value, str):
        data = np.array(printable(value), dtype=h5py.string_dtype())
    else:
        data = np.asarray(value)
        if data.dtype == object or data.dtype.kind == "U":
            data = np.array([str(v) for v in data.reshape(-1)], dtype=h5py.string_dtype()).reshape(data.shape)
    kw: dict[str, Any] = {}
    if data.ndim >= 1 and data.size > 1 and data.dtype.kind != "O":
        kw = dict(compression="gzip", shuffle=True, chunks=True)
    d = g.create_dataset(name, data=data, **kw)
    d.attrs["units"] = units
    d.attrs["description"] = desc
    d.attrs["dims"] = dims


def attach_scales(g: h5py.Group) -> None:
    """Give every dimension a dataset's `dims` attribute names a dimension scale of that name in
    the group (netCDF-4 style: xarray with h5netcdf then shows named dimensions): index
    0..n-1, or the port names for `port`; a 1-D column already named like the dimension is used."""
    for name, d in list(g.items()):
        dims = str(plain(d.attrs.get("dims", "")))
        if not dims or d.ndim == 0 or dims == name:
            continue
        for i, dim in enumerate(dims.split(",")[: d.ndim]):
            if dim not in g:
                n = d.shape[i]
                data = np.array(LINK_PORTS.split(","), dtype=h5py.string_dtype()) if dim == "port" and n == 4 \
                    else np.arange(n, dtype=np.int64)
                sc = g.create_dataset(dim, data=data)
                sc.attrs["units"], sc.attrs["description"], sc.attrs["dims"] = "", f"{dim} index", dim
            sc = g[dim]
            if not isinstance(sc, h5py.Dataset) or sc.shape != (d.shape[i],):
                continue
            if not h5py.h5ds.is_scale(sc.id):
                sc.make_scale(dim)
            d.dims[i].attach_scale(sc)


def _members(g: h5py.Group) -> dict[str, h5py.Dataset]:
    """A group's datasets, without the dimension scales of its pure index dimensions."""
    return {k: d for k, d in g.items() if isinstance(d, h5py.Dataset)
            and not (h5py.h5ds.is_scale(d.id) and str(plain(d.attrs.get("description", ""))) == f"{k} index")}


@dataclasses.dataclass
class RunFile:
    """A run file read back: attributes, summary scalars and every group's datasets."""

    path: Path
    attrs: dict[str, Any]
    summary: dict[str, Any]
    pe: dict[str, np.ndarray]
    link: dict[str, np.ndarray]
    stuck: list[str]
    tables: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    def config(self) -> WaferConfig:
        return config_from_toml_text(self.attrs["config"], f"{self.path}: attribute config")

    @property
    def timeline(self) -> dict[str, np.ndarray] | None:
        return self.tables.get("timeline")

    @property
    def ops(self) -> dict[str, np.ndarray] | None:
        return self.tables.get("ops")

    @property
    def events(self) -> dict[str, np.ndarray] | None:
        return self.tables.get("events")


def read_run(path: str | Path) -> RunFile:
    """Read a run file with plain h5py and check it against the schema (docs/results-schema.md);
    anything missing, misshapen, not a number where one belongs, or unreadable is one
    RunFileError naming the file and the member."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise RunFileError(f"{path}: not a readable HDF5 run file") from None
    try:
        with f:
            try:
                version = int(f.attrs["schema_version"])
            except (KeyError, TypeError, ValueError):
                raise RunFileError(f"{path}: not a wse run file (no schema_version attribute)") from None
            if version != SCHEMA_VERSION:
                raise RunFileError(f"{path}: run file schema_version {version} is not supported")
            for g in ("summary", "pe", "link"):
                if g not in f or not isinstance(f[g], h5py.Group):
                    raise RunFileError(f"{path}: /{g} is missing or not a group")
            attrs = {k: plain(v) for k, v in f.attrs.items()}
            summary = {k: plain(d[()]) for k, d in _members(f["summary"]).items()}
            pe = {k: d[()] for k, d in _members(f["pe"]).items()}
            link = {k: d[()] for k, d in _members(f["link"]).items()}
            stuck = [plain(s) for s in f["stuck"][()]] if "stuck" in f else []
            groups = [g for g in f if g not in ("summary", "pe", "link") and isinstance(f[g], h5py.Group)]
            tables = {g: {k: _column(d[()]) for k, d in _members(f[g]).items()} for g in groups}
            dims = {g: {k: plain(d.attrs.get("dims", "")) for k, d in _members(f[g]).items()} for g in groups}
    except RunFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise RunFileError(f"{path}: damaged run file ({type(e).__name__}: {e})") from None
    rf = RunFile(path, attrs, summary, pe, link, stuck, tables)
    _check(rf, dims)
    return rf


# attributes every run file has: name -> (type, what)
_ATTRS = {"complete": (bool, "a boolean"), "config": (str, "TOML text"), "wafer": (str, "text"),
          "trace_path": (str, "text"), "trace_hash": (str, "text"), "trace_mesh_width": (int, "a mesh width"),
          "trace_mesh_height": (int, "a mesh height"), "stop_reason": (str, "a stop reason"),
          "threads": (int, "a count"), "wall_seconds": (float, "seconds")}


def _check(rf: RunFile, dims: dict[str, dict[str, str]]) -> None:
    """The schema's invariants: attributes typed, summary scalars numeric, counter arrays
    present and shaped [H, W] / [H, W, 4] by the mesh, table columns of one length."""
    where = str(rf.path)
    for k, (typ, what) in _ATTRS.items():
        v = rf.attrs.get(k)
        ok = isinstance(v, bool) if typ is bool else (
            isinstance(v, typ) and not isinstance(v, bool) if typ is not float else
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v >= 0)
        if not ok:
            raise RunFileError(f"{where}: attribute {k} is {'missing' if v is None else repr(v)}; expected {what}")
    if rf.attrs["stop_reason"] not in isa.STOP_NAMES:
        raise RunFileError(f"{where}: attribute stop_reason {rf.attrs['stop_reason']!r} is not one of "
                           f"{', '.join(isa.STOP_NAMES)}")
    W, H = rf.attrs["trace_mesh_width"], rf.attrs["trace_mesh_height"]
    if W < 1 or H < 1:
        raise RunFileError(f"{where}: trace mesh {W}x{H} is empty")
    rf.config()  # the configuration parses (a RunFileError naming the attribute otherwise)
    for k, v in rf.summary.items():  # scalars; a job's figures may be NaN (e.g. no prefill), text
        if not isinstance(v, (int, float, str)):
            raise RunFileError(f"{where}: /summary/{k} is not a scalar")
    for k in _SUMMARY_CORE:
        v = rf.summary.get(k)
        if v is None:
            raise RunFileError(f"{where}: /summary/{k} is missing")
        if isinstance(v, (str, bool)) or not np.isfinite(v) or v < 0:
            raise RunFileError(f"{where}: /summary/{k} is {v}, not a finite number at least 0")
    for group, data, names, shape in (("pe", rf.pe, [n for n, *_ in isa.PE_COUNTERS] + ["idle_cycles"], (H, W)),
                                      ("link", rf.link, [n for n, *_ in isa.LINK_COUNTERS], (H, W, 4))):
        for n in names:
            a = data.get(n)
            if a is None:
                raise RunFileError(f"{where}: /{group}/{n} is missing")
            if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype.kind not in "iuf":
                got = a.shape if isinstance(a, np.ndarray) else type(a).__name__
                raise RunFileError(f"{where}: /{group}/{n} has shape {got}; expected {shape} numbers (the mesh)")
    for group, cols in rf.tables.items():  # columns along one dimension have one length
        first = {k: str(dims[group].get(k) or "").split(",")[0] for k in cols}
        named = set(first.values()) - {""}
        along: dict[str, set[int]] = {}
        for k, c in cols.items():  # a column without dims belongs to the group's one dimension
            if isinstance(c, np.ndarray) and c.ndim >= 1:
                dim = first[k] or (next(iter(named)) if len(named) == 1 else "")
                along.setdefault(dim, set()).add(len(c))
        for dim, lengths in along.items():
            if len(lengths) > 1:
                raise RunFileError(f"{where}: the columns of /{group} along {dim or 'rows'} differ in length "
                                   f"({sorted(lengths)})")


_SUMMARY_CORE = ("total_cycles", "seconds", "simulated_pes", "active_pes", "pe_utilization", "flops",
                 "wavelets_sent", "wavelets_received", "link_wavelets")


def _column(a: Any) -> Any:
    if isinstance(a, np.ndarray) and a.dtype.kind in "OS":
        return np.array([plain(v) for v in a.reshape(-1)], dtype=object).reshape(a.shape)
    return plain(a)


def plain(v: Any) -> Any:
    """An HDF5 scalar as Python: numpy scalars as their value, bytes as text."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    return v
