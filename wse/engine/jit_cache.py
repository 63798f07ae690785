"""Where Numba keeps the engine's compiled kernels: one folder per digest of the sources they
are compiled from.

Numba's own cache checks only the timestamp of the file that defines a function. The stepping
kernels (kernels.py) inline functions and fold constants from accounting.py, layout.py and
isa.py, so after an edit to one of those a cached kernel would load the old machine code:
counters silently wrong until kernels.py itself changes. With the folder keyed on a digest of
every file compiled code reads, any edit compiles afresh (once; the folder is then shared by
every process of that source, test and pool workers included).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

ENV = "NUMBA_CACHE_DIR"
_HERE = Path(__file__).resolve().parent


def sources() -> list[Path]:
    """The files whose code or constants the engine's compiled functions contain."""
    return sorted(_HERE.glob("*.py")) + [_HERE.parent / "isa.py"]


def digest(paths: list[Path] | None = None) -> str:
    """sha256 over the files' names and bytes, in order."""
    h = hashlib.sha256()
    for p in sources() if paths is None else paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def root() -> Path:
    """The user's cache directory (platformdirs) / wse-sim / numba. Not under $WSE_CACHE: that
    names the stage cache (docs/scale-out.md), which runs and tests point at fresh folders, and
    compiled kernels depend only on the sources and the machine (set $NUMBA_CACHE_DIR to move them)."""
    import platformdirs
    return Path(platformdirs.user_cache_dir("wse-sim", appauthor=False)) / "numba"


def configure() -> str | None:
    """Point Numba's cache at root()/<digest> unless $NUMBA_CACHE_DIR already names a folder
    (the user's choice, or a parent process's configure: the same folder). Runs before any
    engine function is compiled or loaded (wse/engine/__init__.py); returns the folder set."""
    if os.environ.get(ENV):
        return None
    folder = str(root() / digest()[:16])
    os.environ[ENV] = folder  # read by numba.config on import, and inherited by worker processes
    if "numba" in sys.modules:  # imported already: its config holds the value read then
        import numba
        numba.config.CACHE_DIR = folder
    return folder
