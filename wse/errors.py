"""Exceptions for bad input. The CLI turns each into one line on stderr and a non-zero exit."""
from __future__ import annotations


class WseError(Exception):
    """Base class: a user-facing error whose message names the file, key or PE at fault."""

    exit_code = 2


class ConfigError(WseError):
    """A wafer configuration (preset name, TOML file or --set override) is invalid."""


class TraceError(WseError):
    """A trace file or in-memory trace is unreadable or inconsistent."""


class RunFileError(WseError):
    """A run file cannot be read or written."""
