"""Wafer configuration: presets, TOML files, --set overrides, round trips and error messages."""
from __future__ import annotations

import tomllib
from importlib import resources

import pytest

from wse import hardware, isa
from wse.errors import ConfigError, WseError
from wse.hardware import SIMD_KEYS, WaferConfig

ALL_PRESETS = ("small", "tiny", "tiny2", "wse2", "wse3")

# Values the preset files document ([P] published or [U] assumed); a change here is a model change.
WSE3_SIMD = dict(fmac_fp16=8, fmac_fp32=1, fmac_mixed=4, add_fp16=8, add_fp32=4, mul_fp16=8,
                 mul_fp32=4, max_fp16=8, max_fp32=4, mov_fp16=8, mov_fp32=4, scale_fp16=8,
                 scale_fp32=4)
WSE2_SIMD = dict(fmac_fp16=4, fmac_fp32=1, fmac_mixed=2, add_fp16=4, add_fp32=2, mul_fp16=4,
                 mul_fp32=2, max_fp16=1, max_fp32=1, mov_fp16=4, mov_fp32=2, scale_fp16=4,
                 scale_fp32=2)


def _write(tmp_path, text: str, name: str = "wafer.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ---- presets ---------------------------------------------------------------------------------

def test_preset_names_lists_all_builtin_presets():
    assert hardware.preset_names() == sorted(ALL_PRESETS)


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_every_preset_loads_and_has_every_key(name):
    cfg = hardware.load_preset(name)
    assert isinstance(cfg, WaferConfig)
    assert cfg.name == name
    assert set(cfg.values) == set(hardware.PARAM_BY_PATH)
    for path, p in hardware.PARAM_BY_PATH.items():
        v = cfg.values[path]
        assert isinstance(v, p.kind) and not isinstance(v, bool), path
        if p.lo is not None:
            assert p.lo <= v <= p.hi, path


def test_wse3_preset_values():
    c = hardware.load_preset("wse3")
    assert (c.mesh_width, c.mesh_height) == (762, 1172)
    assert c.clock_hz == 1.1e9 and isinstance(c.clock_hz, float)
    assert c.sram_bytes == 49152
    assert c.sram_reserved_bytes == 4176
    assert c.sram_banks == 8
    assert c.sram_bank_word_bytes == 2
    assert c.sram_bank_conflict_modulus == 4
    assert (c.sram_read_ports, c.sram_write_ports) == (2, 1)
    assert c.sram_port_bytes == 16
    assert c.microthreads == 8
    assert (c.vector_setup_cycles, c.fabric_setup_cycles) == (8, 8)
    assert c.colors == 24
    assert c.queue_depth_wavelets == 4
    assert c.hop_latency_cycles == 2
    assert c.ramp_latency_cycles == 2
    assert c.link_wavelets_per_cycle == 1
    assert c.watchdog_cycles == 100000
    assert c.max_cycles == 10_000_000_000
    for k, v in WSE3_SIMD.items():
        assert c.values[f"simd_width.{k}"] == v, k


def test_wse2_preset_values_override_wse3():
    c = hardware.load_preset("wse2")
    assert (c.mesh_width, c.mesh_height) == (757, 996)
    assert c.hop_latency_cycles == 1
    assert c.sram_port_bytes == 8
    # inherited from the wse3 base
    assert c.sram_bytes == 49152
    assert c.colors == 24
    assert c.ramp_latency_cycles == 2
    assert c.microthreads == 8
    for k, v in WSE2_SIMD.items():
        assert c.values[f"simd_width.{k}"] == v, k


@pytest.mark.parametrize("name, base, size", [("tiny", "wse3", (8, 8)), ("tiny2", "wse2", (8, 8)),
                                              ("small", "wse3", (64, 64))])
def test_small_presets_are_their_base_with_a_smaller_mesh(name, base, size):
    c, b = hardware.load_preset(name), hardware.load_preset(base)
    assert (c.mesh_width, c.mesh_height) == size
    differ = {k for k in c.values if c.values[k] != b.values[k]}
    assert differ == {"wafer.name", "wafer.mesh_width", "wafer.mesh_height"}


def _preset_doc_simd(name: str) -> dict:
    """SIMD widths as written in the preset file, following its base chain."""
    doc = tomllib.loads((resources.files("wse") / "presets" / f"{name}.toml").read_text())
    out = _preset_doc_simd(doc["base"]) if "base" in doc else {}
    out.update(doc.get("simd_width", {}))
    return out


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_simd_widths_match_the_preset_files(name):
    cfg = hardware.load_preset(name)
    doc = _preset_doc_simd(name)
    assert set(doc) == set(SIMD_KEYS)
    for k in SIMD_KEYS:
        kind, dtype = k.rsplit("_", 1)
        assert cfg.simd_width(isa.KIND_NAMES.index(kind), isa.DTYPE_NAMES.index(dtype)) == doc[k]


def test_simd_width_is_none_for_forms_the_isa_lacks():
    cfg = hardware.load_preset("wse3")
    assert cfg.simd_width(isa.KIND_MAX, isa.DTYPE_MIXED) is None
    assert cfg.simd_width(isa.KIND_ADD, isa.DTYPE_MIXED) is None
    assert cfg.simd_width(isa.KIND_FMAC, isa.DTYPE_MIXED) == 4
    assert cfg.simd_width(isa.KIND_FMAC, isa.DTYPE_FP16) == 8


def test_attribute_access_for_unknown_key_raises_attribute_error():
    cfg = hardware.load_preset("tiny")
    with pytest.raises(AttributeError):
        cfg.no_such_key  # noqa: B018


def test_nested_groups_keys_by_section():
    n = hardware.load_preset("tiny").nested()
    assert list(n) == list(hardware.SECTIONS)
    assert n["wafer"]["mesh_width"] == 8
    assert n["fabric"]["colors"] == 24
    assert n["simd_width"]["fmac_fp16"] == 8
    assert sum(len(v) for v in n.values()) == len(hardware.PARAMS)


# ---- round trips -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_PRESETS)
def test_to_toml_round_trips_through_config_from_toml_text(name):
    cfg = hardware.load_preset(name)
    text = cfg.to_toml()
    back = hardware.config_from_toml_text(text, "run file")
    assert back == cfg
    assert back.values == cfg.values
    assert {k: type(v) for k, v in back.values.items()} == {k: type(v) for k, v in cfg.values.items()}
    for section in hardware.SECTIONS:
        assert f"[{section}]" in text


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_to_toml_round_trips_through_load_config(tmp_path, name):
    cfg = hardware.load_preset(name)
    p = _write(tmp_path, cfg.to_toml())
    assert hardware.load_config(p) == cfg


@pytest.mark.parametrize("wafer_name", ['odd "quoted" name', "back\\slash", "tab\there", "ünïcode"])
def test_to_toml_round_trips_names_with_special_characters(wafer_name):
    cfg = hardware.load_preset("tiny")
    cfg = WaferConfig({**cfg.values, "wafer.name": wafer_name})
    back = hardware.config_from_toml_text(cfg.to_toml(), "x")
    assert back.name == wafer_name


def test_to_toml_round_trips_a_name_with_a_newline():
    cfg = hardware.load_preset("tiny").with_overrides(['wafer.name="two\\nlines"'])
    assert cfg.name == "two\nlines"
    back = hardware.config_from_toml_text(cfg.to_toml(), "x")
    assert back == cfg


def test_to_toml_round_trips_after_overrides():
    cfg = hardware.load_preset("tiny2").with_overrides(
        ["fabric.colors=7", "wafer.clock_hz=850e6", "engine.max_cycles=123456789012"])
    back = hardware.config_from_toml_text(cfg.to_toml(), "x")
    assert back == cfg
    assert back.colors == 7 and back.clock_hz == 850e6 and back.max_cycles == 123456789012


# ---- TOML files and overrides ----------------------------------------------------------------

def test_config_file_with_base_and_overrides(tmp_path):
    p = _write(tmp_path, 'base = "wse2"\n[wafer]\nname = "mine"\nmesh_width = 10\n'
                         '[fabric]\ncolors = 16\nqueue_depth_wavelets = 8\n')
    c = hardware.load_config(p)
    assert c.name == "mine"
    assert (c.mesh_width, c.mesh_height) == (10, 996)
    assert c.colors == 16
    assert c.queue_depth_wavelets == 8
    assert c.hop_latency_cycles == 1  # from wse2
    assert c.values["simd_width.fmac_fp16"] == 4  # from wse2


def test_config_file_without_base_defaults_to_wse3(tmp_path):
    p = _write(tmp_path, "[fabric]\ncolors = 12\n")
    c = hardware.load_config(p)
    assert c.colors == 12
    assert c.hop_latency_cycles == 2
    assert (c.mesh_width, c.mesh_height) == (762, 1172)
    assert c.name == "wse3"


def test_config_file_int_for_float_key_is_accepted(tmp_path):
    p = _write(tmp_path, 'base = "tiny"\n[wafer]\nclock_hz = 900000000\n')
    c = hardware.load_config(p)
    assert c.clock_hz == 9e8 and isinstance(c.clock_hz, float)


def test_with_overrides_applies_and_converts_values():
    base = hardware.load_preset("tiny")
    c = base.with_overrides(["fabric.colors=16", "wafer.clock_hz=2e9", "wafer.name=bench",
                             "compute.microthreads=4.0", "engine.watchdog_cycles = 50"])
    assert c.colors == 16
    assert c.clock_hz == 2e9
    assert c.name == "bench"
    assert c.microthreads == 4 and isinstance(c.microthreads, int)
    assert c.watchdog_cycles == 50
    # the original is untouched
    assert base.colors == 24 and base.name == "tiny" and base.watchdog_cycles == 100000


def test_with_overrides_quoted_string_value():
    c = hardware.load_preset("tiny").with_overrides(['wafer.name="a b"'])
    assert c.name == "a b"


def test_resolve_defaults_to_wse3():
    assert hardware.resolve() == hardware.load_preset("wse3")


def test_resolve_preset_with_sets():
    c = hardware.resolve("tiny", None, ("fabric.hop_latency_cycles=5", "sram.sram_read_ports=1"))
    assert c.hop_latency_cycles == 5
    assert c.sram_read_ports == 1
    assert c.mesh_width == 8


def test_resolve_config_file_with_sets(tmp_path):
    p = _write(tmp_path, 'base = "tiny"\n[fabric]\ncolors = 10\n')
    c = hardware.resolve(None, p, ["fabric.colors=11"])
    assert c.colors == 11
    assert c.mesh_width == 8


# ---- errors ----------------------------------------------------------------------------------

def test_config_error_is_a_wse_error_with_exit_code_2():
    assert issubclass(ConfigError, WseError)
    assert ConfigError.exit_code == 2


@pytest.mark.parametrize("call", [lambda: hardware.load_preset("wse9"),
                                  lambda: hardware.resolve("wse9")])
def test_unknown_preset(call):
    with pytest.raises(ConfigError) as e:
        call()
    msg = str(e.value)
    assert "unknown wafer preset 'wse9'" in msg
    for name in ALL_PRESETS:
        assert name in msg


def test_unknown_key_in_file_has_did_you_mean_hint(tmp_path):
    p = _write(tmp_path, 'base = "tiny"\n[fabric]\ncolours = 3\n')
    with pytest.raises(ConfigError) as e:
        hardware.load_config(p)
    msg = str(e.value)
    assert str(p) in msg
    assert "'fabric.colours'" in msg
    assert "did you mean fabric.colors?" in msg


def test_unknown_section_in_file_has_did_you_mean_hint(tmp_path):
    p = _write(tmp_path, 'base = "tiny"\n[fabrc]\ncolors = 3\n')
    with pytest.raises(ConfigError) as e:
        hardware.load_config(p)
    assert str(p) in str(e.value)
    assert "'fabrc.colors'" in str(e.value)
    assert "did you mean fabric.colors?" in str(e.value)


def test_unknown_key_in_set_has_did_you_mean_hint():
    with pytest.raises(ConfigError) as e:
        hardware.load_preset("tiny").with_overrides(["fabric.hop_latency=3"])
    msg = str(e.value)
    assert msg.startswith("--set")
    assert "'fabric.hop_latency'" in msg
    assert "did you mean fabric.hop_latency_cycles?" in msg


def test_unknown_key_without_close_match_has_no_hint():
    with pytest.raises(ConfigError) as e:
        hardware.resolve("tiny", None, ["zzz.qqq=1"])
    assert "'zzz.qqq'" in str(e.value)
    assert "did you mean" not in str(e.value)


def test_set_without_equals_sign():
    with pytest.raises(ConfigError) as e:
        hardware.resolve("tiny", None, ["fabric.colors"])
    assert "'fabric.colors'" in str(e.value)
    assert "section.key=value" in str(e.value)


@pytest.mark.parametrize("text, fragment", [
    ('[fabric]\ncolors = "many"\n', "fabric.colors must be int, got 'many'"),
    ("[fabric]\ncolors = 2.5\n", "fabric.colors must be int, got 2.5"),
    ("[fabric]\ncolors = true\n", "fabric.colors must be int, got True"),
    ('[wafer]\nclock_hz = "fast"\n', "wafer.clock_hz must be float, got 'fast'"),
    ("[wafer]\nname = 3\n", "wafer.name must be str, got 3"),
])
def test_wrong_type_in_file(tmp_path, text, fragment):
    p = _write(tmp_path, 'base = "tiny"\n' + text)
    with pytest.raises(ConfigError) as e:
        hardware.load_config(p)
    assert str(p) in str(e.value)
    assert fragment in str(e.value)


def test_wrong_type_in_set():
    with pytest.raises(ConfigError) as e:
        hardware.resolve("tiny", None, ["compute.microthreads=lots"])
    assert "compute.microthreads must be int, got 'lots'" in str(e.value)


@pytest.mark.parametrize("text, fragment", [
    ("[fabric]\ncolors = 99\n", "fabric.colors = 99 is out of range [1, 32]"),
    ("[wafer]\nmesh_width = 0\n", "wafer.mesh_width = 0 is out of range [1, 4096]"),
    ("[fabric]\nhop_latency_cycles = 31\n", "fabric.hop_latency_cycles = 31 is out of range [1, 30]"),
    ("[wafer]\nclock_hz = 1.0\n", "wafer.clock_hz = 1.0 is out of range"),
    ("[sram]\nsram_reserved_bytes = 49152\n", "sram.sram_reserved_bytes must be below sram.sram_bytes"),
    ("[sram]\nsram_port_bytes = 2\n", "sram.sram_port_bytes = 2 is narrower than one fp32 element"),
])
def test_out_of_range_value_in_file(tmp_path, text, fragment):
    p = _write(tmp_path, 'base = "tiny"\n' + text)
    with pytest.raises(ConfigError) as e:
        hardware.load_config(p)
    assert str(p) in str(e.value)
    assert fragment in str(e.value)


def test_out_of_range_value_in_set():
    with pytest.raises(ConfigError) as e:
        hardware.resolve("tiny", None, ["engine.watchdog_cycles=0"])
    assert "engine.watchdog_cycles = 0 is out of range" in str(e.value)


def test_malformed_toml(tmp_path):
    p = _write(tmp_path, 'base = "tiny"\n[wafer\nname = "x"\n')
    with pytest.raises(ConfigError) as e:
        hardware.load_config(p)
    assert str(p) in str(e.value)
    assert "malformed TOML" in str(e.value)
    assert "line 2" in str(e.value)


def test_malformed_text_in_config_from_toml_text():
    with pytest.raises(ConfigError) as e:
        hardware.config_from_toml_text("[wafer\n", "runs/a.h5: attribute config")
    assert "runs/a.h5: attribute config" in str(e.value)
    assert "malformed configuration" in str(e.value)


def test_incomplete_text_in_config_from_toml_text_names_missing_key():
    text = hardware.load_preset("tiny").to_toml().replace("colors = 24\n", "")
    with pytest.raises(ConfigError) as e:
        hardware.config_from_toml_text(text, "where")
    assert "missing configuration key 'fabric.colors'" in str(e.value)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as e:
        hardware.load_config(p)
    assert str(p) in str(e.value)
    assert "cannot read configuration file" in str(e.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        hardware.load_config(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_non_utf8_file_raises_config_error(tmp_path):
    p = tmp_path / "binary.toml"
    p.write_bytes(b"\xff\xfe[wafer]\x00\x81\n")
    with pytest.raises(ConfigError) as e:
        hardware.load_config(p)
    assert str(p) in str(e.value)


def test_top_level_non_table_key(tmp_path):
    p = _write(tmp_path, 'base = "tiny"\ncolors = 3\n')
    with pytest.raises(ConfigError) as e:
        hardware.load_config(p)
    msg = str(e.value)
    assert str(p) in msg
    assert "top-level key 'colors' must be a [section] table" in msg
    assert "fabric" in msg


def test_base_that_is_not_a_string(tmp_path):
    p = _write(tmp_path, "base = 3\n")
    with pytest.raises(ConfigError) as e:
        hardware.load_config(p)
    assert str(p) in str(e.value)
    assert "base must be a preset name string" in str(e.value)


def test_unknown_base_preset_in_file_names_the_preset(tmp_path):
    p = _write(tmp_path, 'base = "wse9"\n')
    with pytest.raises(ConfigError) as e:
        hardware.load_config(p)
    assert "'wse9'" in str(e.value)


def test_unknown_base_preset_in_file_names_the_file(tmp_path):
    p = _write(tmp_path, 'base = "wse9"\n')
    with pytest.raises(ConfigError) as e:
        hardware.load_config(p)
    assert str(p) in str(e.value)


def test_preset_and_config_both_given(tmp_path):
    p = _write(tmp_path, 'base = "tiny"\n')
    with pytest.raises(ConfigError) as e:
        hardware.resolve("tiny", p)
    assert "--wafer" in str(e.value) and "--config" in str(e.value)
    assert "not both" in str(e.value)
