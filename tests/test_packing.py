"""Wafer shares filled with whole expert regions (wse/system/packing.py).

Composition of filled shares equal to their full simulations: test_system.py,
test_uniform_slots_put_every_wafer_on_one_shape (tiny-moe's uniform plans are filled shares)."""
import pytest

from wse.errors import WseError
from wse.system.config import load_system
from wse.system.packing import cut_points, filled_plans, filled_shares, regions, slot_shapes
from wse.system.wafers import _own_best, placed_shares, wafer_plans
from wse.workload.layer_sizes import most_rows
from wse.workload.decode import ffn_layers, model_units, splits_ffn, units_chain
from wse.workload.models import load_model
from wse.workload.params import DecodeParams
from wse.workload.plan import FitError


@pytest.mark.parametrize("model", ["kimi-k2", "moe16", "tiny-mla"])
def test_cut_points_begin_whole_regions_and_count_them(model):
    spec = load_model(model)
    params = DecodeParams(weights="fp8", moe_mapping="regions")
    units = model_units(spec)
    split = ffn_layers(spec, range(spec.layers), splits_ffn(spec, params, True))
    for per in (1, 3, 11, 12):
        chain = units_chain(units, per, split)
        n, cuts = cut_points(spec, params, per)
        assert n == len(chain) == regions(spec, params)(per)
        assert cuts[n] == len(units)
        for k, (kind, layer, experts) in enumerate(chain):
            if kind == "ffn":  # a layer's FFN region stays with its layer region
                assert k not in cuts
            else:
                assert units[cuts[k]] == (layer, -1 if kind == "layer" else experts[0])


def test_slot_shapes_are_tall_whole_bands_largest_first():
    spec = load_model("kimi-k2")
    cfg = load_system("cs3x64").wafer_config
    shapes = slot_shapes(spec, cfg, 20_000)
    assert shapes and all(P * Q > 20_000 and Q >= P for P, Q in shapes)
    assert [P * Q for P, Q in shapes] == sorted((P * Q for P, Q in shapes), reverse=True)
    H, cap = cfg.mesh_height, most_rows(spec)  # rows of a whole number of bands, or a layer's most
    assert all(Q == H // (H // Q) or Q == cap for _, Q in shapes)


def _elements(plan):
    return [(s.kind, s.index, s.experts) for s in plan.slots if s.kind not in ("embedding", "lm_head")]


def test_kimi_k2_fills_31_cs3_where_the_byte_split_needs_32():
    spec = load_model("kimi-k2")
    cfg = load_system("cs3x64").wafer_config
    params = DecodeParams(weights="fp8", uniform_slots=True)
    with pytest.raises(WseError):  # balanced by bytes, wafer 0 places on no slot size
        placed_shares(spec, cfg, params, 31, True)
    shares, plans = filled_shares(spec, cfg, params, 31, 95, 130)
    units = model_units(spec)
    assert shares[0][0] == 0 and shares[-1][1] == len(units)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(shares, shares[1:]))
    assert [p.units for p in plans] == shares and {(p.P, p.Q) for p in plans} == {(95, 130)}
    assert plans[0].embed and plans[-1].head and not any(p.embed or p.head for p in plans[1:-1])
    # every wafer holds whole regions of the model's chain on 95x130: its elements, in order
    split = ffn_layers(spec, range(spec.layers), splits_ffn(spec, params, True))
    whole = units_chain(units, plans[0].experts_per_region, split)
    assert [e for p in plans for e in _elements(p)] == whole
    # as evenly as the regions allow: middle wafers within one region of each other
    middle = [len(_elements(p)) for p in plans[1:-1]]
    assert max(middle) - min(middle) <= 1


def test_filled_shares_fail_cleanly_where_the_slots_cannot_hold_the_regions(small_moe):
    spec = load_model("kimi-k2")
    cfg = load_system("cs3x64").wafer_config
    params = DecodeParams(weights="fp8", uniform_slots=True)
    with pytest.raises(FitError, match="30 wafers hold at most 2160 regions, fewer than its 2162"):
        filled_shares(spec, cfg, params, 30, 95, 130)
    with pytest.raises(FitError, match="20 wafers hold at most 1440 regions, fewer than it needs even"):
        filled_shares(spec, cfg, params, 20, 95, 130)
    system, spec, params = small_moe  # the regions would fit the slots; wafer 0's share does not place
    with pytest.raises(FitError, match="wafer 0 of 2 places no run of the chain's regions from 0 of 10"):
        filled_shares(spec, system.wafer_config, params, 2, 12, 64)


def test_wafer_plans_take_filled_shares_on_larger_slots(small_moe):
    system, spec, params = small_moe
    plans = wafer_plans(spec, system, params, 3)
    assert {(p.P, p.Q) for p in plans} == {(16, 64)}
    assert [p.units for p in plans] == filled_shares(spec, system.wafer_config, params, 3, 16, 64)[0]


@pytest.fixture
def small_moe():
    system = load_system("cs3", ['system.wafer="small"', "system.wafers=2"])
    params = DecodeParams(context=16, moe_mapping="regions", experts_per_region=1, uniform_slots=True)
    return system, load_model("tiny-moe"), params


def test_without_uniform_slots_each_filled_share_takes_its_own_best_shape():
    spec = load_model("kimi-k2")
    cfg = load_system("cs3x64").wafer_config
    params = DecodeParams(weights="fp8")
    shares, plans = filled_shares(spec, cfg, params, 31, 95, 130)
    for w in (0, 7):
        own = _own_best(spec, cfg, params, shares, w, plans[w])
        assert own.units == shares[w] and own.P * own.Q >= 95 * 130
        assert own is plans[w] or own.P * own.Q > 95 * 130


def test_filled_shares_of_moe16_compose_to_their_full_simulations():
    """moe16 (16 experts a layer, top-2, a shared expert) filled into 3 wafers of 128x128 PEs on
    32x42 slots, each cut inside a layer's experts: every wafer's composed step equals its full
    simulation, counter for counter (cycles where it ends in a hand-off, FLOPs, SRAM bytes,
    wavelets, ops, wavelet-hops), the stand-in's own work taken out."""
    from checked import COUNTERS, run, standin_work
    from wse import hardware
    from wse.workload.chain import chain_of
    from wse.workload.compose import compose
    from wse.workload.stages import full_trace
    cfg = hardware.resolve("small", None, ["wafer.mesh_width=128", "wafer.mesh_height=128"])
    spec = load_model("moe16")
    shares, plans = filled_plans(spec, cfg, DecodeParams(context=32, moe_mapping="regions", experts_per_region=1), 3)
    assert {(p.P, p.Q) for p in plans} == {(32, 42)} and [b for _, b in shares][-1] == len(model_units(spec))
    assert any(chain_of(p).leading for p in plans) and any(chain_of(p).trailing for p in plans)
    for plan in plans:
        full = run(full_trace(plan)[0], cfg)
        d = compose(plan, lambda t: run(t, cfg))
        minus, b0 = standin_work(plan, cfg) if chain_of(plan).leading else ({}, 0)
        if "end" in d.outputs:
            assert d.total_cycles == full.total_cycles - b0
        for c in COUNTERS:
            assert d.total(c) == full.pe(c).sum() - minus.get(c, 0), c
        assert d.link_total("wavelets") == full.link("wavelets").sum() - minus.get("hops", 0)
