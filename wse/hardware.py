"""Wafer configuration: every hardware and engine parameter, its unit, default and source.

A configuration is built from a preset (wse/presets/<name>.toml), optionally a TOML file that
names a `base` preset and overrides keys, and `--set section.key=value` overrides, and is then
validated. Keys carry their unit in the name. Values tagged [U] in PARAMS are assumptions, not
published facts; docs/model.md lists them.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .tomlfile import read_toml, toml_value
from . import isa

# SIMD widths are keyed "<kind>_<dtype>"; these are the combinations the ISA defines.
SIMD_KEYS = (
    "fmac_fp16", "fmac_fp32", "fmac_mixed",
    "add_fp16", "add_fp32",
    "mul_fp16", "mul_fp32",
    "max_fp16", "max_fp32",
    "mov_fp16", "mov_fp32",
    "scale_fp16", "scale_fp32",
    "scale_fp8", "scale_int8", "scale_int4",  # dequantizing low-precision weights to fp16 [U]
    "dot_fp16", "dot_fp32", "dot_mixed",  # [U] as fmac
    "exp_fp16", "exp_fp32", "rsqrt_fp16", "rsqrt_fp32", "recip_fp16", "recip_fp32",
    "silu_fp16", "silu_fp32",  # [U] each pass as fmac
    "rmax_fp16", "rmax_fp32", "rsum_fp16", "rsum_fp32", "sub_fp16", "sub_fp32",  # [U] as max, add, add
    "rfind_mixed",  # [U] as max over fp16 sources into an fp32 index
    "fill_fp16", "fill_fp32",  # [U] as mov: a scalar source, no SRAM read
)


@dataclasses.dataclass(frozen=True)
class Param:
    section: str
    key: str
    kind: type
    unit: str
    lo: float | None
    hi: float | None
    description: str


# One line per parameter: section, key, type, unit, bounds, description (with source tag).
PARAMS: tuple[Param, ...] = (
    Param("wafer", "name", str, "", None, None, "configuration name"),
    Param("wafer", "mesh_width", int, "PEs", 1, 4096, "user-visible PE columns [P SDK fabric-dims]"),
    Param("wafer", "mesh_height", int, "PEs", 1, 4096, "user-visible PE rows [P SDK fabric-dims]"),
    Param("wafer", "clock_hz", float, "Hz", 1e6, 1e11, "core clock [U: 1.1 GHz per WaferLLM]"),
    Param("sram", "sram_bytes", int, "bytes", 64, 1 << 24, "SRAM per PE, code and data [P]"),
    Param("sram", "sram_reserved_bytes", int, "bytes", 0, 1 << 24,
          "SRAM kept for code, descriptors and runtime; workload generators place no data there [U]"),
    Param("sram", "sram_banks", int, "banks", 1, 64, "SRAM banks per PE [P SDK appendix]"),
    Param("sram", "sram_bank_word_bytes", int, "bytes", 1, 64,
          "interleave unit: successive words live in successive banks [P SDK appendix]"),
    Param("sram", "sram_bank_conflict_modulus", int, "banks", 1, 64,
          "two read streams conflict when their banks agree modulo this [P SDK appendix]"),
    Param("sram", "sram_read_ports", int, "accesses/cycle", 1, 8, "vector read accesses per cycle [P SDK]"),
    Param("sram", "sram_write_ports", int, "accesses/cycle", 1, 8, "vector write accesses per cycle [P SDK]"),
    Param("sram", "sram_port_bytes", int, "bytes", 2, 256,
          "width of one SRAM access; caps SIMD width at port_bytes / element bytes [U]"),
    Param("compute", "microthreads", int, "threads", 1, 32, "hardware microthreads per PE [P WSE-3]"),
    Param("compute", "vector_setup_cycles", int, "cycles", 0, 100000,
          "fixed cost of starting a vector compute op [U: fitted 8-17 on WSE-3]"),
    Param("compute", "fabric_setup_cycles", int, "cycles", 0, 100000,
          "fixed cost of starting a send / receive / fused op [U]"),
    *(Param("simd_width", k, int, "elements/cycle", 1, 256, f"SIMD width of {k} [P SDK appendix; fp32 fmac U]")
      for k in SIMD_KEYS),
    Param("fabric", "colors", int, "colors", 1, 32, "routable colors (virtual channels) [P]"),
    Param("fabric", "queue_depth_wavelets", int, "wavelets", 1, 32767,
          "input queue depth per color, router and CE side [U]"),
    Param("fabric", "hop_latency_cycles", int, "cycles", 1, 30, "router-to-router latency per hop [P WSE-2, U WSE-3]"),
    Param("fabric", "ramp_latency_cycles", int, "cycles", 1, 30, "router <-> CE latency each way [P Reduce]"),
    Param("fabric", "link_wavelets_per_cycle", int, "wavelets/cycle", 1, 8,
          "wavelets per cycle per link direction, ramps included [P: 1]"),
    Param("engine", "watchdog_cycles", int, "cycles", 1, 1 << 40,
          "stop as deadlocked after this many cycles without progress"),
    Param("engine", "max_cycles", int, "cycles", 1, 1 << 50, "stop a run that reaches this many cycles"),
)
PARAM_BY_PATH = {f"{p.section}.{p.key}": p for p in PARAMS}
SECTIONS = tuple(dict.fromkeys(p.section for p in PARAMS))


@dataclasses.dataclass(frozen=True)
class WaferConfig:
    """A resolved, validated configuration. `values` maps "section.key" to its value."""

    values: dict[str, Any]

    def __getattr__(self, key: str) -> Any:
        # Flat attribute access: cfg.hop_latency_cycles. Keys are unique across sections.
        values = self.__dict__.get("values")
        if values is None:
            raise AttributeError(key)
        flat = self.__dict__.get("_flat")
        if flat is None:
            flat = {path.split(".", 1)[1]: v for path, v in values.items()}
            object.__setattr__(self, "_flat", flat)
        try:
            return flat[key]
        except KeyError:
            raise AttributeError(key) from None

    def key(self) -> tuple:
        """A hashable identity of the configuration's values (computed once per object)."""
        k = self.__dict__.get("_key")
        if k is None:
            k = tuple(sorted(self.values.items()))
            object.__setattr__(self, "_key", k)
        return k

    def simd_width(self, kind: int, dtype: int) -> int | None:
        """SIMD width for a compute kind and dtype, or None when the ISA has no such form."""
        key = f"{isa.KIND_NAMES[kind]}_{isa.DTYPE_NAMES[dtype]}"
        return self.values.get(f"simd_width.{key}")

    def nested(self) -> dict[str, dict[str, Any]]:
        """The configuration as {section: {key: value}}, the TOML file layout."""
        out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for path, v in self.values.items():
            s, k = path.split(".", 1)
            out[s][k] = v
        return out

    def to_toml(self) -> str:
        """The full configuration as a TOML document that load_config reads back identically."""
        lines = []
        for section, kv in self.nested().items():
            lines.append(f"[{section}]")
            for k, v in kv.items():
                lines.append(f"{k} = {_toml_value(v)}")
            lines.append("")
        return "\n".join(lines)

    def with_overrides(self, sets: list[str] | tuple[str, ...]) -> "WaferConfig":
        """A new configuration with `section.key=value` overrides applied and validated."""
        values = dict(self.values)
        for s in sets:
            path, value = _parse_set(s)
            values[path] = value
        return _validated(values, "--set")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _parse_set(s: str) -> tuple[str, Any]:
    if "=" not in s:
        raise ConfigError(f"--set {s!r}: expected section.key=value")
    path, raw = (x.strip() for x in s.split("=", 1))
    _check_path(path, "--set")
    return path, toml_value(raw)


def _check_path(path: str, where: str) -> Param:
    p = PARAM_BY_PATH.get(path)
    if p is None:
        near = difflib.get_close_matches(path, PARAM_BY_PATH.keys(), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(f"{where}: unknown configuration key {path!r}{hint}")
    return p


def _validated(values: dict[str, Any], where: str) -> WaferConfig:
    out: dict[str, Any] = {}
    for p in PARAMS:
        path = f"{p.section}.{p.key}"
        if path not in values:
            raise ConfigError(f"{where}: missing configuration key {path!r}")
        v = values[path]
        if p.kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if p.kind is int and isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, p.kind) or isinstance(v, bool):
            raise ConfigError(f"{where}: {path} must be {p.kind.__name__}, got {v!r}")
        if p.lo is not None and not (p.lo <= v <= p.hi):
            raise ConfigError(f"{where}: {path} = {v!r} is out of range [{p.lo:g}, {p.hi:g}]")
        out[path] = v
    for path in values:
        _check_path(path, where)
    if out["sram.sram_reserved_bytes"] >= out["sram.sram_bytes"]:
        raise ConfigError(f"{where}: sram.sram_reserved_bytes must be below sram.sram_bytes")
    for k in SIMD_KEYS:
        dtype = k.rsplit("_", 1)[1]
        elem = max(isa.DTYPE_SRC_BYTES[isa.DTYPE_NAMES.index(dtype)],
                   isa.DTYPE_DST_BYTES[isa.DTYPE_NAMES.index(dtype)])
        if out["sram.sram_port_bytes"] < elem:
            raise ConfigError(f"{where}: sram.sram_port_bytes = {out['sram.sram_port_bytes']} "
                              f"is narrower than one {dtype} element")
    return WaferConfig(out)


def _flatten(doc: dict[str, Any], where: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, kv in doc.items():
        if section == "base":
            continue
        if not isinstance(kv, dict):
            raise ConfigError(f"{where}: top-level key {section!r} must be a [section] table "
                              f"(sections: {', '.join(SECTIONS)})")
        for k, v in kv.items():
            path = f"{section}.{k}"
            _check_path(path, where)
            flat[path] = v
    return flat


def preset_names() -> list[str]:
    """Names of the built-in presets."""
    d = resources.files("wse") / "presets"
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".toml"))


def _read_preset(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise ConfigError(f"unknown wafer preset {name!r} (presets: {', '.join(preset_names())})")
    text = (resources.files("wse") / "presets" / f"{name}.toml").read_text()
    doc = tomllib.loads(text)
    base = doc.get("base")
    values = _read_preset(base) if base else {}
    values.update(_flatten(doc, f"preset {name}"))
    return values


def load_preset(name: str) -> WaferConfig:
    """A built-in preset: wse2, wse3, or one of the small test meshes."""
    return _validated(_read_preset(name), f"preset {name}")


def load_config(path: str | Path) -> WaferConfig:
    """A TOML configuration file: `base = "<preset>"` (default wse3) plus [section] overrides."""
    path = Path(path)
    doc = read_toml(path, "configuration file", ConfigError)
    base = doc.get("base", "wse3")
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a preset name string")
    try:
        values = _read_preset(base)
    except ConfigError as e:
        raise ConfigError(f"{path}: base: {e}") from None
    values.update(_flatten(doc, str(path)))
    return _validated(values, str(path))


def resolve(preset: str | None = None, config_file: str | Path | None = None,
            sets: tuple[str, ...] | list[str] = ()) -> WaferConfig:
    """The configuration the CLI uses: a preset or a file (not both), then --set overrides."""
    if preset is not None and not preset.strip():
        raise ConfigError("--wafer: empty preset name (presets: " + ", ".join(preset_names()) + ")")
    if config_file is not None and not str(config_file).strip():
        raise ConfigError("--config: empty file name")
    if preset and config_file:
        raise ConfigError("give either --wafer or --config, not both")
    cfg = load_config(config_file) if config_file else load_preset(preset or "wse3")
    return cfg.with_overrides(sets) if sets else cfg


def config_from_toml_text(text: str, where: str) -> WaferConfig:
    """Rebuild a configuration from WaferConfig.to_toml() output (e.g. stored in a run file)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: malformed configuration: {e}") from None
    return _validated(_flatten(doc, where), where)
