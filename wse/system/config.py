"""Wafer system configuration: how many wafers, the links between them, energy and cost.

Presets live in wse/presets/systems/*.toml (`base = "<preset>"` inherits one); a file given by
path works the same way, and `--set section.key=value` overrides single values: a system key
(the SCHEMA below) or a key of the wafer configuration (hardware.PARAMS, e.g.
fabric.hop_latency_cycles), applied to the system's wafer preset. Every value that is not a
published fact is an assumption listed in docs/system.md.
"""
from __future__ import annotations

import dataclasses
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import WseError
from ..tomlfile import read_toml, toml_value
from ..hardware import PARAM_BY_PATH, WaferConfig, load_preset
from .link import TOPOLOGIES


class SystemConfigError(WseError):
    """A malformed or invalid system configuration."""


# (section, key, type, low, high, meaning)
SCHEMA: tuple[tuple[str, str, type, float, float, str], ...] = (
    ("system", "name", str, 0, 0, "system name"),
    ("system", "wafer", str, 0, 0, "wafer preset of every system"),
    ("system", "wafers", int, 1, 4096, "systems (one wafer each) in the chain"),
    ("system", "link_bytes_per_s", float, 1e6, 1e15, "bandwidth of one system-to-system link, each way"),
    ("system", "link_latency_s", float, 0.0, 1.0, "latency of one system-to-system transfer"),
    ("system", "topology", str, 0, 0, "chain (each system linked to its neighbours) or switch (all into one)"),
    ("system", "links_per_wafer", int, 1, 64, "links from a system to each neighbour (chain) or into the switch"),
    ("energy", "pj_per_fmac", float, 0.0, 1e4, "energy of one fused multiply-add (2 FLOPs)"),
    ("energy", "pj_per_sram_byte", float, 0.0, 1e4, "energy per byte read or written in PE SRAM"),
    ("energy", "pj_per_wavelet_hop", float, 0.0, 1e5, "energy of one wavelet crossing one PE-to-PE link"),
    ("energy", "static_w_per_wafer", float, 0.0, 1e6, "static power of a wafer"),
    ("energy", "overhead_w_per_system", float, 0.0, 1e6, "power supply, cooling and I/O of a system"),
    ("energy", "pj_per_link_byte", float, 0.0, 1e6, "energy per byte over a system-to-system link"),
    ("cost", "usd_per_system_hour", float, 0.0, 1e6, "cost of one system for one hour"),
    ("cost", "utilization", float, 1e-3, 1.0, "fraction of hours serving at the modelled rate"),
)


@dataclasses.dataclass(frozen=True)
class SystemConfig:
    values: dict[str, Any]
    wafer_sets: tuple[str, ...] = ()  # `section.key=value` overrides of the wafer preset

    def __getattr__(self, key: str) -> Any:
        values = self.__dict__.get("values")
        if values is not None:
            for (section, k, *_rest) in SCHEMA:
                if k == key:
                    return values[f"{section}.{k}"]
        raise AttributeError(key)

    @property
    def wafer_config(self) -> WaferConfig:
        cfg = load_preset(self.wafer)
        return cfg.with_overrides(self.wafer_sets) if self.wafer_sets else cfg

    def with_wafers(self, n: int) -> "SystemConfig":
        return _validated({**self.values, "system.wafers": n}, "--wafers", self.wafer_sets)


def system_names() -> list[str]:
    d = resources.files("wse") / "presets" / "systems"
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".toml"))


def _read(doc: dict[str, Any], where: str, depth: int = 0) -> dict[str, Any]:
    values: dict[str, Any] = {}
    base = doc.get("base")
    if base is not None:
        if not isinstance(base, str) or depth > 8:
            raise SystemConfigError(f"{where}: base must name a system preset")
        values = _read(_preset_doc(base), f"system preset {base}", depth + 1)
    known = {(s, k) for s, k, *_ in SCHEMA}
    for section, kv in doc.items():
        if section == "base":
            continue
        if not isinstance(kv, dict):
            raise SystemConfigError(f"{where}: top-level key {section!r} must be a [section] table")
        for k, v in kv.items():
            if (section, k) not in known:
                raise SystemConfigError(f"{where}: unknown key {section}.{k}")
            values[f"{section}.{k}"] = v
    return values


def _preset_doc(name: str) -> dict[str, Any]:
    if name not in system_names():
        raise SystemConfigError(f"unknown system preset {name!r} (presets: {', '.join(system_names())})")
    return tomllib.loads((resources.files("wse") / "presets" / "systems" / f"{name}.toml").read_text())


def _validated(values: dict[str, Any], where: str, wafer_sets: tuple[str, ...] = ()) -> SystemConfig:
    out: dict[str, Any] = {}
    for section, key, typ, lo, hi, _ in SCHEMA:
        path = f"{section}.{key}"
        if path not in values:
            raise SystemConfigError(f"{where}: missing key {path}")
        v = values[path]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise SystemConfigError(f"{where}: {path} must be {typ.__name__}, got {v!r}")
        if typ is not str and not lo <= v <= hi:
            raise SystemConfigError(f"{where}: {path} = {v} is outside [{lo:g}, {hi:g}]")
        out[path] = v
    if out["system.topology"] not in TOPOLOGIES:
        raise SystemConfigError(f"{where}: system.topology = {out['system.topology']!r} is not one of "
                                f"{', '.join(TOPOLOGIES)}")
    try:
        cfg = load_preset(out["system.wafer"])
    except WseError as e:
        raise SystemConfigError(f"{where}: system.wafer: {e}") from None
    if wafer_sets:
        cfg.with_overrides(wafer_sets)  # refuses a bad value now, naming it
    return SystemConfig(out, tuple(wafer_sets))


def load_system(name_or_path: str, sets: tuple[str, ...] | list[str] = ()) -> SystemConfig:
    """A system preset (cs3, cs3x4, ...) or a TOML file, then `section.key=value` overrides."""
    path = Path(name_or_path)
    if name_or_path in system_names():
        where, doc = f"system preset {name_or_path}", _preset_doc(name_or_path)
    elif path.suffix == ".toml" or path.exists():
        where, doc = str(path), read_toml(path, "system file", SystemConfigError)
    else:
        from ..hardware import preset_names
        hint = (f"; {name_or_path!r} is a wafer preset: --set system.wafer=\"{name_or_path}\" puts it in a system"
                if name_or_path in preset_names() else "")
        raise SystemConfigError(f"--system: unknown system preset {name_or_path!r} (presets: "
                                f"{', '.join(system_names())}){hint}")
    values = _read(doc, where)
    wafer_sets = []
    for s in sets:
        if "=" not in s:
            raise SystemConfigError(f"--set {s!r}: expected section.key=value")
        key, raw = (x.strip() for x in s.split("=", 1))
        if key in PARAM_BY_PATH:
            wafer_sets.append(f"{key}={raw}")
            continue
        if tuple(key.split(".", 1)) not in {(a, b) for a, b, *_ in SCHEMA}:
            raise SystemConfigError(f"--set {s!r}: unknown key {key} (neither a system nor a wafer key)")
        values[key] = toml_value(raw)
    return _validated(values, where, tuple(wafer_sets))
