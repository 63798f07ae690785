"""Output files, one mechanism for every command: an output is checked before any work (not
empty, not a folder, not one of the command's inputs, in a folder that exists and can be
written), a stale result at its name is removed when a run is interrupted before replacing it,
and every file is written under a unique temporary name in the same folder and renamed into
place — so no input is ever clobbered, no temporary name collides with a user's file, and the
name never holds a half-written file or a previous run's result that looks like this one's."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import WseError


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), option: str = "-o",
                 folder: bool = False) -> Path:
    """The output path, or a WseError naming `option` and what is wrong with it. folder: the
    output is a folder (created with its parents if missing)."""
    raw = os.fspath(path)
    if not raw.strip():
        raise WseError(f"{option}: empty {'folder' if folder else 'file'} name")
    p = Path(raw)
    for i in inputs:
        if i is None or not os.fspath(i):
            continue
        if _same(p, Path(os.fspath(i))):
            raise WseError(f"{option} {raw}: is an input of this command ({os.fspath(i)}); choose another name")
    if folder:
        if p.exists() and not p.is_dir():
            raise WseError(f"{option} {raw}: exists and is not a folder")
        target = p
        while not target.exists():
            target = target.parent
        if not os.access(target, os.W_OK | os.X_OK):
            raise WseError(f"{option} {raw}: folder {target} is not writable")
        return p
    if p.is_dir():
        raise WseError(f"{option} {raw}: is a folder (give a file name)")
    parent = p.parent
    if not parent.is_dir():
        raise WseError(f"{option} {raw}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WseError(f"{option} {raw}: folder {parent} is not writable")
    return p


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def claim(path: str | os.PathLike) -> None:
    """Remove a previous file at the output's name (a run interrupted before it wrote anything:
    a previous run's complete file must not stand for this one's)."""
    p = Path(path)
    if p.is_file() or p.is_symlink():
        try:
            p.unlink()
        except OSError as e:
            raise WseError(f"-o {os.fspath(path)}: cannot replace the existing file ({e.strerror})") from None


def temp_path(path: str | os.PathLike) -> Path:
    """A new, empty, uniquely named file beside `path` to write into before renaming; its name
    does not carry the user's (a name that is not valid UTF-8 stays out of HDF5's way)."""
    parent = Path(path).parent
    fd, tmp = tempfile.mkstemp(prefix=".wse-", suffix=".partial", dir=parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # the mode any new file gets, not mkstemp's private 0600
    finally:
        os.close(fd)
    return Path(tmp)


def printable(text: str) -> str:
    """`text` (e.g. a path from a name that is not valid UTF-8) as text HDF5 can store: bytes
    that are not UTF-8 shown as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def replacing(path: str | os.PathLike, error: type[WseError], what: str) -> Iterator[Path]:
    """Write `path` whole or not at all: yields a temporary file beside it (temp_path), renamed
    onto `path` when the block succeeds and removed when it fails in any way (Ctrl-C included);
    an OSError becomes `error` naming the file."""
    tmp = None
    try:
        tmp = temp_path(path)
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise error(f"{os.fspath(path)}: cannot write {what} ({e.strerror or e})") from None
        raise
