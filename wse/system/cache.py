"""The stage cache: every stage simulation's result stored under a content key, so a later run,
a sweep point or another user sharing the directory does not simulate it again.

A key is the sha256 of what determines a stage's counters (docs/scale-out.md): the engine's
semantic version and a digest of the source code that builds and steps stages, the resolved
wafer configuration, the model, the decode parameters, the plan's run-wide shape and the stage's
own build key (or, for a trace already built, its content hash). Output options (run file,
progress, threads, worker count) are not in it: they do not change a counter.

Entries are `.npz` files (numpy arrays and one JSON metadata string, no pickles; integer arrays
stored in the narrowest integer type that holds their values and widened back on reading,
except the counters, which stay narrow (EngineResult.narrowed), deflated at level 1: a big
stage's 75 MB of counters, mostly zeros, write in a quarter of the time numpy's default
compression takes, in the process that waits on the workers), written
through files.replacing (a temporary name in the same folder, renamed into place), so a killed
writer leaves no entry that reads as valid; zip's CRC-32 of every member is checked on reading, and an entry that fails
it (or does not parse) is reported once, removed and recomputed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..engine.result import EngineResult, narrowest
from ..errors import WseError
from ..files import replacing

ENTRY_FORMAT = 2
SUFFIX = ".npz"
STATS_FILE = "last-run.json"
TEMPORARY = ".wse-*.partial"  # files.temp_path: a write in progress, or left by a killed writer
# what builds and steps a stage: a change to any of these files changes every key
_SOURCES = ("engine", "workload", "trace.py", "isa.py", "hardware.py", "system/wafers.py")
_TABLES = ("ops", "timeline", "events")
COUNTERS = ("pe_counters", "link_counters")  # read back in the narrow types they are stored in
_SCALARS = ("total_cycles", "stop", "wall_seconds", "threads", "stepped_pe_cycles", "stepped_cycles",
            "jumped_cycles")


class CacheError(WseError):
    """The cache directory cannot be used."""


def default_dir() -> Path:
    """$WSE_CACHE, else the user's cache directory (platformdirs) / wse-sim."""
    env = os.environ.get("WSE_CACHE")
    if env:
        return Path(env)
    import platformdirs
    return Path(platformdirs.user_cache_dir("wse-sim", appauthor=False))


_digest: str | None = None


def source_digest() -> str:
    """sha256 over the source files that build and simulate stages (_SOURCES), in path order."""
    global _digest
    if _digest is None:
        root = Path(__file__).resolve().parents[1]
        h = hashlib.sha256()
        for name in _SOURCES:
            p = root / name
            for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
        _digest = h.hexdigest()
    return _digest


def canonical(obj: Any) -> Any:
    """A JSON-able form of `obj` that equal values share and unequal ones do not: dataclasses
    by type name and fields, mappings with sorted keys, arrays by dtype, shape and sha256,
    floats by repr (nan and inf included). Anything else is refused rather than guessed."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"~": type(obj).__qualname__,
                **{f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {"~": "dict", "items": sorted(([canonical(k), canonical(v)] for k, v in obj.items()), key=_json)}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return {"~": "set", "items": sorted((canonical(v) for v in obj), key=_json)}
    if isinstance(obj, np.ndarray):
        return {"~": "array", "dtype": obj.dtype.str, "shape": list(obj.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()}
    if isinstance(obj, np.generic):
        return canonical(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return {"~": "float", "repr": repr(obj)}
    raise TypeError(f"no canonical form for {type(obj).__name__}")


def _json(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def content_key(*parts: Any) -> str:
    """The cache key of a stage: sha256 of the semantic version, the source digest and `parts`."""
    from ..engine import SEMANTIC_VERSION
    doc = [ENTRY_FORMAT, SEMANTIC_VERSION, source_digest(), canonical(list(parts))]
    return hashlib.sha256(_json(doc).encode()).hexdigest()


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stored: int = 0
    corrupt: int = 0

    @property
    def hit_rate(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else math.nan


class StageCache:
    """Stage results under content keys in `root` (created on first store)."""

    def __init__(self, root: str | Path, warn: Callable[[str], None] | None = None):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise CacheError(f"--cache {self.root}: not a directory")
        self.stats = CacheStats()
        self._warn = warn or (lambda msg: None)
        self._unwritable = False
        self._unreadable = False

    def _path(self, key: str) -> Path:
        return self.root / "stages" / key[:2] / (key + SUFFIX)

    def get(self, key: str) -> tuple[EngineResult, dict[str, Any]] | None:
        """(result, extra) stored under `key`, or None (a miss). A damaged entry is reported
        through `warn`, removed and counted as a miss."""
        path = self._path(key)
        try:
            if not path.is_file():
                self.stats.misses += 1
                return None
            got = _read(path, key)
        except (ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:  # the bytes are wrong: damaged
            self.stats.corrupt += 1
            self.stats.misses += 1
            self._warn(f"stage cache entry {path} is damaged ({type(e).__name__}: {e}); simulating it again")
            path.unlink(missing_ok=True)
            return None
        except OSError as e:  # unreadable here (permissions, I/O): not damage, left alone
            self.stats.misses += 1
            if not self._unreadable:
                self._warn(f"stage cache {self.root}: cannot read entries ({e.strerror or e}); simulating them")
            self._unreadable = True
            return None
        self.stats.hits += 1
        return got

    def put(self, key: str, result: EngineResult, extra: dict[str, Any] | None = None) -> None:
        """Store a completed stage's result (and JSON-able `extra`, e.g. its anchor) atomically."""
        if not result.complete:
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with replacing(path, CacheError, "the entry") as tmp, open(tmp, "wb") as f:
                _write(f, key, result, extra or {})
        except (OSError, CacheError) as e:  # the run goes on without storing: its results do not need it
            if not self._unwritable:
                why = e.strerror or e if isinstance(e, OSError) else e
                self._warn(f"stage cache {self.root}: cannot store entries ({why}); going on without")
            self._unwritable = True
            return
        self.stats.stored += 1

    def save_stats(self) -> None:
        """Record this run's hits and misses for `wse cache info`."""
        if not self.root.is_dir():
            return
        try:
            with replacing(self.root / STATS_FILE, CacheError, "cache statistics") as tmp:
                tmp.write_text(json.dumps(dataclasses.asdict(self.stats)))
        except CacheError:
            pass


def info(root: str | Path) -> dict[str, Any]:
    """Entries, bytes, leftover temporary files and the last run's hits and misses."""
    root = Path(root)
    entries = list((root / "stages").rglob("*" + SUFFIX)) if root.is_dir() else []
    temporary = list((root / "stages").rglob(TEMPORARY)) if root.is_dir() else []
    last = None
    try:
        last = json.loads((root / STATS_FILE).read_text())
    except (OSError, ValueError):
        pass
    return {"directory": str(root), "entries": len(entries), "bytes": sum(f.stat().st_size for f in entries),
            "temporary": len(temporary), "last_run": last}


def clear(root: str | Path) -> int:
    """Remove every entry (and leftover temporary file); returns how many files went."""
    root = Path(root)
    n = 0
    if (root / "stages").is_dir():
        for f in [*(root / "stages").rglob("*" + SUFFIX), *(root / "stages").rglob(TEMPORARY)]:
            f.unlink(missing_ok=True)
            n += 1
        for d in sorted((root / "stages").rglob("*"), reverse=True):
            if d.is_dir():
                try:
                    d.rmdir()
                except OSError:
                    pass
    (root / STATS_FILE).unlink(missing_ok=True)
    return n


def _write(f, key: str, r: EngineResult, extra: dict[str, Any]) -> None:
    meta = {"format": ENTRY_FORMAT, "key": key, "stuck": r.stuck, "extra": extra,
            **{k: getattr(r, k) for k in _SCALARS}}
    arrays: dict[str, np.ndarray] = {"pe_counters": r.pe_counters, "link_counters": r.link_counters}
    for t in _TABLES:
        for name, a in (getattr(r, t) or {}).items():
            a = np.asarray(a)
            arrays[f"{t}.{name}"] = a.astype(str) if a.dtype == object else a
        if getattr(r, t) is not None:
            meta.setdefault("tables", []).append(t)
    widen = {}
    for name, a in arrays.items():
        small = narrowest(a)
        if small is not a:
            widen[name] = a.dtype.str
            arrays[name] = small
    meta["widen"] = widen
    arrays["meta"] = np.array(json.dumps(meta))
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True) as z:
        for name, a in arrays.items():  # (what np.savez_compressed writes, at level 1)
            with z.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, a, allow_pickle=False)


def _read(path: Path, key: str) -> tuple[EngineResult, dict[str, Any]]:
    with np.load(path, allow_pickle=False) as z:
        data = {name: z[name] for name in z.files}  # reads every member: zip checks each CRC-32
    meta = json.loads(str(data.pop("meta")))
    if meta.get("format") != ENTRY_FORMAT or meta.get("key") != key:
        raise ValueError("entry does not belong to its key")
    for name, dt in meta["widen"].items():
        if name not in COUNTERS:  # (counters stay narrow: EngineResult.narrowed)
            data[name] = data[name].astype(np.dtype(dt))
    tables: dict[str, dict[str, np.ndarray]] = {t: {} for t in meta.get("tables", [])}
    for name, a in data.items():
        if "." in name:
            t, col = name.split(".", 1)
            tables[t][col] = a.astype(object) if a.dtype.kind == "U" else a
    r = EngineResult(int(meta["total_cycles"]), int(meta["stop"]), data["pe_counters"], data["link_counters"],
                     list(meta["stuck"]), float(meta["wall_seconds"]), int(meta["threads"]),
                     tables.get("timeline"), tables.get("ops"), tables.get("events"),
                     int(meta["stepped_pe_cycles"]), int(meta["stepped_cycles"]), int(meta["jumped_cycles"]))
    if not r.complete:
        raise ValueError("entry holds an incomplete run")
    return r, meta["extra"]
