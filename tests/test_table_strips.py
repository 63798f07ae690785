"""Table strips (--tables): the embedding and the LM head as strips as wide as the mesh above
and below the bands of layer slots, so their bytes do not take layer slots.

Lanes cross a strip's edge on their columns; a strip's rows hold the hidden size in chunks of
their own (split over its rows), so each row's lane parts are relayed along the row (the
embedding) or gathered along it (the LM head), and a lane spanning two rows meets over one hop.
The step must compute what numpy computes, compose exactly, and let llama3.1-70b place on 4 CS-3.
"""
import pytest
from click.testing import CliRunner

from checked import composed_equals_full
from test_functional_layer import _run
from wse import hardware
from wse.cli import cli
from wse.errors import WseError
from wse.workload import decode
from wse.workload.decode import plan_model
from wse.workload.mesh import offsets, split
from wse.workload.models import load_model
from wse.workload.params import DecodeParams
from wse.workload.placement import PlacementError, direction, serpentine, strip_rows


def test_strip_rows_put_each_lane_on_the_rows_holding_its_elements():
    assert strip_rows(256, 32, 32) == tuple((d, d) for d in range(32))  # as many rows as lanes: one each
    assert strip_rows(256, 32, 1) == ((0, 0),) * 32
    rows = strip_rows(8192, 152, 68)
    lanes, row0 = offsets(split(8192, 152)), offsets(split(8192, 68)) + [8192]
    for d, (j1, j2) in enumerate(rows):
        first, last = lanes[d], lanes[d] + split(8192, 152)[d] - 1
        assert row0[j1] <= first < row0[j1 + 1] and row0[j2] <= last < row0[j2 + 1] and j2 - j1 <= 1
    assert any(j2 > j1 for j1, j2 in rows)  # (lanes that straddle two rows)
    with pytest.raises(PlacementError, match="shorter than the lanes"):
        strip_rows(100, 60, 55)  # rows of 1 element, lanes of 2: a lane would span three rows


def test_serpentine_puts_the_strips_above_and_below_the_bands():
    slots = serpentine(7, 0, 0, 10, 43, 80, Q=23, strips=(3, 5), hidden=40)
    assert [s.kind for s in slots] == ["embedding"] + ["layer"] * 7 + ["lm_head"]
    emb, head = slots[0], slots[-1]
    assert (emb.region.x0, emb.region.y0, emb.region.width, emb.region.height) == (0, 0, 43, 3)
    assert slots[1].region.y0 == 3 and head.region.y0 == 3 + 2 * 23 and head.region.width == 43
    for a, b in zip(slots, slots[1:]):
        assert direction(a.region, b.region) in ("east", "west", "south")
    with pytest.raises(PlacementError, match="LM head strip"):
        serpentine(9, 0, 0, 10, 43, 74, Q=23, strips=(3, 5), hidden=40)  # 3 full bands: 2 rows left below


def _strip_plan(monkeypatch, model, cfg, rows, **kw):
    """A plan with table strips of the given (embedding, LM head) rows."""
    monkeypatch.setattr(decode, "_strip_rows", lambda spec, P, cfg, head, params: rows[head])
    plan = plan_model(load_model(model), cfg, DecodeParams(tables="strips", **kw), P=16, Q=20)
    assert [s.region.height for s in plan.slots if s.strip] == list(rows)
    return plan


@pytest.mark.parametrize("model, rows, kw", [
    ("tiny", (3, 5), dict(batch=2, token=300)),  # the token's column east of every lane: relays west
    ("tiny", (2, 16), dict(batch=3, token=159)),  # a batch gathered from two columns inside the lanes' span
    ("tiny-moe", (2, 3), dict(batch=2, moe_mapping="regions", experts_per_region=2)),  # the head after a collector
])
def test_a_step_with_table_strips_composes_exactly(monkeypatch, model, rows, kw, small):
    composed_equals_full(_strip_plan(monkeypatch, model, small, rows, context=12, **kw), small)


def test_strips_compose_counter_for_counter_beside_sixteen_experts_on_a_128_mesh(monkeypatch):
    """Beyond the tiny models: moe16 (hidden 512, 16 experts in expert regions, batch 2) on a
    128x128 mesh with 5- and 7-row strips (lanes across two rows, the head after a collector)."""
    from test_expert_regions import assert_composed_equals_full
    cfg = hardware.resolve("small", None, ["wafer.mesh_width=128", "wafer.mesh_height=128"])
    monkeypatch.setattr(decode, "_strip_rows", lambda spec, P, cfg, head, params: (5, 7)[head])
    plan = plan_model(load_model("moe16"), cfg, DecodeParams(context=32, batch=2, moe_mapping="regions",
                                                              experts_per_region=2, tables="strips"))
    assert [s.kind for s in plan.slots if s.strip] == ["embedding", "lm_head"] and plan.slots[-2].kind == "experts"
    assert any(j2 > j1 for s in plan.slots if s.strip for j1, j2 in s.strip)
    d, full = assert_composed_equals_full(plan, cfg)
    assert d.total_cycles == full.total_cycles


@pytest.mark.parametrize("rows, batch, token", [((6, 5), 2, 165), ((4, 9), 3, 159), ((1, 1), 1, 1000)])
def test_a_step_with_table_strips_computes_the_greedy_token(monkeypatch, rows, batch, token):
    """Relays west and east of the token's column (and through it), lanes across two rows, a
    one-row strip (every lane on it), a batch from two columns: the step equals numpy's."""
    from wse.workload.step_tensors import step_trace
    cfg = hardware.load_preset("small")
    plan = _strip_plan(monkeypatch, "tiny", cfg, rows, context=64, batch=batch, token=token, moe_mapping="local")
    check, res = _run(step_trace(plan), cfg)
    assert {"logits", "token"} <= {r.name for r in check}
    assert all(r.ok and r.copies_disagree == 0 for r in check) and not res.raced, check


def test_auto_keeps_table_slots_where_they_place():
    spec, cfg = load_model("llama3.1-8b"), hardware.load_preset("wse3")
    auto, slots = (plan_model(spec, cfg, DecodeParams(context=1024, tables=t)) for t in ("auto", "slots"))
    assert auto.slots == slots.slots and not any(s.strip for s in auto.slots)
    forced = plan_model(spec, cfg, DecodeParams(context=1024, tables="strips"))
    assert [s.kind for s in forced.slots if s.strip] == ["embedding", "lm_head"]
    assert forced.slots[0].region.width == cfg.mesh_width


def test_llama_70b_places_on_four_cs3_with_table_strips():
    """80 layers of ~1.7 GB fill 20 slots of 76x553 on each CS-3 (the largest area: 152x276
    holds 76 PEs fewer); the tables' 2.1 GB each fit the rows left over as strips, not as slots
    beside the layers."""
    from wse.system.config import load_system
    from wse.system.wafers import fewest_wafers, wafer_plans
    spec, system = load_model("llama3.1-70b"), load_system("cs3x4")
    params = DecodeParams(context=1024, uniform_slots=True)
    assert fewest_wafers(spec, system, params) == 4
    plans = wafer_plans(spec, system, params, 4)
    assert [p.n_layers for p in plans] == [20] * 4 and {(p.P, p.Q) for p in plans} == {(76, 553)}
    assert plans[0].slots[0].strip and plans[0].slots[0].kind == "embedding"
    assert plans[-1].slots[-1].strip and plans[-1].slots[-1].kind == "lm_head"
    assert fewest_wafers(spec, system, DecodeParams(context=1024, uniform_slots=True, tables="slots")) == 5


def test_a_bad_tables_value_is_one_error_line(tmp_path):
    with pytest.raises(WseError, match="--tables 'rows'"):
        DecodeParams(tables="rows")
    r = CliRunner().invoke(cli, ["system", "--model", "tiny", "--tables", "rows", "-o", str(tmp_path / "x.h5")])
    assert r.exit_code == 2 and "rows" in r.output and not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("tables", ["slots", "strips"])
def test_every_wafers_prefill_times_the_lm_head_on_its_region(monkeypatch, tables):
    """TTFT's LM head GEMV runs on the last wafer's LM head region, whatever the wafer whose
    layer kernels are being timed ends with (found: wafers before the last timed it on their
    last layer slot's width, which llama3.1-70b's head does not fit)."""
    import types
    from wse.system import pool
    from wse.system.config import load_system
    from wse.system.ttft import prefill_seconds
    from wse.system.wafers import wafer_plans
    from wse.workload import prefill as pf
    system = load_system("cs3", ['system.wafer="small"', "system.wafers=2"])
    spec = load_model("tiny")
    plans = wafer_plans(spec, system, DecodeParams(context=64, tables=tables), 2)
    seen = []
    monkeypatch.setattr(pool, "prefill_kernels", lambda *a, **k: None)

    def timed(spec, cfg, P, S, lm_width, layers, simulate, kernels=None, Q=None, lm_rows=None):
        seen.append((lm_width, lm_rows))
        return types.SimpleNamespace(layer_cycles=1, ttft_cycles=2)
    monkeypatch.setattr(pf, "prefill", timed)
    prefill_seconds(spec, system, plans, 64, simulate=None)
    head = plans[-1].slots[-1].region
    assert plans[0].slots[-1].kind == "layer" and len(seen) == 2 and set(seen) == {(head.width, head.height)}
