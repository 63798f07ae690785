"""Reading a TOML file with one clear error naming the file (configurations, specs, presets)."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .errors import WseError


def read_toml(path: str | Path, what: str, error: type[WseError]) -> dict[str, Any]:
    """The parsed document; `error` (a WseError) names the file when it cannot be read, is not
    UTF-8 text or is not valid TOML. `what` says what the file is ("model spec", ...)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: {what} is not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: malformed TOML: {e}") from None


def toml_value(raw: str) -> Any:
    """A `--set key=value` value: a TOML value (1, 2.5e9, true, "x"), else the bare string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
