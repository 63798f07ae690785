"""Tall layer slots: P columns by Q >= P rows, so a wafer's area is not lost to square slots.

The placement must keep every transition a straight lane, the composed step must equal the full
simulation with FLOPs and weights conserved, and the planner must pick the largest area.
"""
import pytest
from click.testing import CliRunner

from checked import composed_equals_full
from wse import hardware
from wse.cli import cli
from wse.errors import WseError
from wse.workload.decode import plan_model
from wse.workload.layer_sizes import most_rows, plan_layer
from wse.workload.params import DecodeParams
from wse.workload.models import load_model
from wse.workload.placement import direction, serpentine
from wse.workload.plan import FitError


def test_serpentine_lays_tall_slots_in_bands_of_their_rows():
    slots = serpentine(7, 1, 1, 10, 40, 70, Q=23)
    kinds = [s.kind for s in slots]
    assert kinds == ["embedding"] + ["layer"] * 7 + ["lm_head"]
    for s in slots:
        if s.kind == "layer":
            assert (s.region.width, s.region.height) == (10, 23) and s.region.y0 % 23 == 0
        else:  # tables are P rows tall at the top of their band
            assert s.region.height == 10 and s.region.y0 % 23 == 0
    for a, b in zip(slots, slots[1:]):
        assert direction(a.region, b.region) in ("east", "west", "south")


@pytest.mark.parametrize("model, kw", [("tiny", {}), ("tiny-mla", dict(batch=2, context=20)),
                                       ("tiny-moe", dict(moe_mapping="regions", experts_per_region=2))])
def test_composed_step_equals_the_full_simulation(model, kw, small):
    spec = load_model(model)
    plan = plan_model(spec, small, DecodeParams(**kw), P=16, Q=24)
    assert (plan.P, plan.Q) == (16, 24)
    composed_equals_full(plan, small)


def test_the_planner_takes_the_largest_area(small):
    spec = load_model("tiny-mla")
    tall = plan_model(spec, small, DecodeParams(batch=2))
    square = plan_model(spec, small, DecodeParams(batch=2, slot_shape="square"))
    assert tall.Q >= tall.P and square.Q == square.P
    assert tall.P * tall.Q >= square.P * square.P


def test_llama_405b_layers_need_tall_slots():
    spec, cfg = load_model("llama3.1-405b"), hardware.load_preset("wse3")
    params = DecodeParams(context=1024)
    plan = plan_model(spec, cfg, params, 4, None, 4, False, False)
    assert plan.Q > plan.P and [s.kind for s in plan.slots] == ["layer"] * 4
    with pytest.raises(WseError, match="found no slot size"):
        plan_model(spec, cfg, DecodeParams(context=1024, slot_shape="square"), 4, None, 4, False, False)


def test_bad_slot_shapes_are_named(small):
    spec = load_model("tiny")
    with pytest.raises(WseError, match="fewer rows than columns"):
        plan_layer(spec, 0, 16, small, DecodeParams(), Q=8)
    with pytest.raises(FitError, match=f"at most {most_rows(spec)} rows"):
        plan_layer(spec, 0, 16, small, DecodeParams(), Q=most_rows(spec) + 1)
    with pytest.raises(WseError, match="--slot-shape 'round'"):
        DecodeParams(slot_shape="round")
    r = CliRunner().invoke(cli, ["run", "--model", "tiny", "--wafer", "small", "--region", "24x16", "-o", "x.h5"])
    assert r.exit_code != 0 and "Q >= P" in r.output


def test_widths_beyond_the_row_cap_are_skipped(small):
    """tiny-mla caps rows at its 32 latent dims and 4 rotary pairs; a wide mesh offers wider slots, which the
    planner must pass over (Q >= P), expert regions included."""
    wide = small.with_overrides(["wafer.mesh_width=128"])
    spec = load_model("tiny-mla")
    plan = plan_model(spec, wide, DecodeParams(context=8, moe_mapping="regions"), 1, None, 1, False, False)
    assert plan.P <= plan.Q <= most_rows(spec) == 36
    assert [s.kind for s in plan.slots][0] == "layer" and "experts" in [s.kind for s in plan.slots]


def test_the_slot_search_remembers_each_layer_fit_check_with_its_answer():
    """decode._layer_fit answers as plan_layer does (None where it fits, its FitError where not)
    and asks plan_layer once per distinct question (the wafer-count searches repeat them)."""
    from wse.workload import decode
    spec, cfg = load_model("llama3.1-8b"), hardware.load_preset("wse3")
    params = DecodeParams(context=1024)
    decode._FITS.clear()
    assert decode._layer_fit(spec, 0, 127, cfg, params, True, 127, "all") is None
    err = decode._layer_fit(spec, 0, 4, cfg, params, True, 4, "all")
    with pytest.raises(FitError) as direct:
        plan_layer(spec, 0, 4, cfg, params, Q=4)
    assert isinstance(err, FitError) and str(err) == str(direct.value)
    n = len(decode._FITS)
    assert decode._layer_fit(spec, 0, 4, cfg, params, True, 4, "all") is err and len(decode._FITS) == n == 2
