"""Expert parallelism: a MoE layer's routed experts in expert regions after its layer region.

The composed step must equal the full simulation exactly, FLOPs and weights must be conserved,
each expert region must run exactly the experts the batch chose among its own, and `auto`
must keep the old mapping wherever it fits.
"""
import pytest

from checked import run
from wse import hardware
from wse.errors import WseError
from wse.system.config import load_system
from wse.system.wafers import run_decode
from wse.workload.decode import chain_elements, compose, full_trace, plan_model, region_key
from wse.workload.experts import experts_flops, plan_experts
from wse.workload.ffn import moe_experts
from wse.workload.params import DecodeParams
from wse.workload.models import load_model


def test_chain_puts_expert_groups_after_each_moe_layer():
    spec = load_model("tiny-moe")  # 4 routed experts, both layers MoE
    assert chain_elements(spec, 0, 2, 0) == [("layer", 0, None), ("layer", 1, None)]
    assert chain_elements(spec, 1, 1, 3) == [("layer", 1, None), ("experts", 1, (0, 2)), ("experts", 1, (2, 4))]
    ds = load_model("deepseek-v3")  # three dense layers first: no expert regions there
    chain = chain_elements(ds, 2, 2, 100)
    assert chain[0] == ("layer", 2, None) and chain[1] == ("layer", 3, None)
    assert [c[2] for c in chain[2:]] == [(0, 86), (86, 171), (171, 256)]


@pytest.mark.parametrize("kw", [dict(batch=1, context=16, experts_per_region=1),
                                dict(batch=3, context=20, experts_per_region=3),
                                dict(batch=2, context=16, expert_skew=1.5, experts_per_region=2), dict(batch=2, context=16)])
def test_composed_step_equals_the_full_simulation(kw, small):
    plan = plan_model(load_model("tiny-moe"), small, DecodeParams(moe_mapping="regions", **kw))
    per = kw.get("experts_per_region") or 4
    assert plan.experts_per_region == per
    kinds = [s.kind for s in plan.slots]
    assert kinds.count("experts") == 2 * -(-4 // per)
    trace, builds = full_trace(plan)
    full = run(trace, small)
    composed = compose(plan, lambda t: run(t, small))
    assert composed.total_cycles == full.total_cycles
    # every region's work once, and the analytic FLOPs of each region
    assert composed.total("flops") == int(full.pe("flops").sum()) == sum(sum(b.flops.values()) for b in builds)
    assert composed.link_total("wavelets") == int(full.link("wavelets").sum())
    assert sum(b.weight_bytes for b in builds) == 2 * plan.spec.total_params()


def test_each_expert_region_runs_the_experts_chosen_among_its_own(small):
    spec = load_model("tiny-moe")
    params = DecodeParams(batch=1, moe_mapping="regions", experts_per_region=1)
    chosen = moe_experts(spec, 0, 1)  # experts 0 and 1 (and the shared one, in the layer region)
    idle = active = 0
    for e in range(4):
        ep = plan_experts(spec, 0, (e, e + 1), 16, small, params)
        executed, model = experts_flops(ep)
        if e in chosen:
            active += 1
            assert ep.local_experts() == {0: chosen[e]} and model > 0
        else:
            idle += 1
            assert ep.local_experts() == {} and model == 0 and executed["ffn"] == 0
    assert (active, idle) == (2, 2)


def test_idle_expert_regions_share_one_simulation(small):
    spec = load_model("tiny-moe")
    plan = plan_model(spec, small, DecodeParams(batch=1, moe_mapping="regions", experts_per_region=1))
    keys = {region_key(plan, s) for s in plan.slots if s.kind == "experts"}
    assert ("experts", False, "users", ()) in keys  # idle, not last: one key for all of them
    layer_keys = {region_key(plan, s) for s in plan.slots if s.kind == "layer"}
    assert len(layer_keys) == 1  # router and shared expert only: the same in both MoE layers


def test_auto_keeps_local_experts_where_they_fit_and_falls_back_to_regions(small):
    spec = load_model("tiny-moe")
    assert plan_model(spec, small, DecodeParams(batch=2)).experts_per_region == 0
    tight = small.with_overrides(["wafer.mesh_width=96", "wafer.mesh_height=48", "sram.sram_bytes=2048",
                                  "sram.sram_reserved_bytes=0"])
    with pytest.raises(WseError, match="found no slot size"):
        plan_model(spec, tight, DecodeParams(context=8, moe_mapping="local"))
    plan = plan_model(spec, tight, DecodeParams(context=8))
    assert plan.experts_per_region == 4 and [s.kind for s in plan.slots].count("experts") == 2
    composed = compose(plan, lambda t: run(t, tight))
    assert composed.total_cycles == run(full_trace(plan)[0], tight).total_cycles


def test_bad_mapping_options_are_named():
    with pytest.raises(WseError, match="--moe-mapping 'experts' is not one of auto, local, regions"):
        DecodeParams(moe_mapping="experts")
    with pytest.raises(WseError, match="--experts-per-region -2 must be at least 0"):
        DecodeParams(experts_per_region=-2)
    with pytest.raises(WseError, match="--moe-mapping regions: tiny has no MoE layer"):
        plan_model(load_model("tiny"), hardware.load_preset("small"), DecodeParams(moe_mapping="regions"))


def test_expert_regions_on_a_two_wafer_system(small):
    spec = load_model("tiny-moe")
    system = load_system("cs3x4", ['system.wafer="small"'])
    params = DecodeParams(batch=2, context=16, moe_mapping="regions", experts_per_region=2)
    d = run_decode(spec, system, params, 2, lambda t: run(t, small))
    assert [s.layers for s in d.steps] == [range(0, 1), range(1, 2)]
    # only the residual stream of the batch crosses the link between layer groups
    assert d.ledger.sent == [2 * spec.hidden_size * 2]
    assert d.steps[0].flops > 0 and d.steps[1].flops > 0


def test_units_split_a_layers_experts_over_wafers(small):
    from wse.system.wafers import split_units, uses_units, wafer_plans
    from wse.workload.decode import model_units
    spec = load_model("tiny-moe")
    system = load_system("cs3x4", ['system.wafer="small"'])
    params = DecodeParams(batch=2, context=16, moe_mapping="regions", experts_per_region=2)
    assert uses_units(spec, system, params)
    assert not uses_units(spec, system, DecodeParams(batch=2))  # auto: the local mapping places
    units = model_units(spec)
    assert units[:2] == [(0, -1), (0, 0)] and len(units) == 10
    for w in (1, 2, 3, 4):
        shares = split_units(spec, params, w)
        assert shares[0][0] == 0 and shares[-1][1] == 10 and all(a < b for a, b in shares)
        assert all(b == c for (_, b), (c, _) in zip(shares, shares[1:]))
    plans = wafer_plans(spec, system, params, 3)
    assert plans[1].slots[0].kind == "experts"  # wafer 1 continues layer 0's experts
    regions = [(s.index, s.experts) for p in plans for s in p.slots if s.kind == "experts"]
    for layer in (0, 1):  # every routed expert once, in order
        covered = [e for L, (a, b) in regions if L == layer for e in range(a, b)]
        assert covered == list(range(4))
    assert sum(b.weight_bytes for p in plans for b in full_trace(p)[1]) == 2 * spec.total_params()
    d = run_decode(spec, system, params, 3, lambda t: run(t, small))
    payload = (2 * spec.hidden_size + spec.moe.experts_per_token) * params.batch * 2
    assert d.ledger.sent == [payload, payload]
    assert sum(d.ledger.sent) == sum(d.ledger.received)


def test_expert_regions_running_different_experts_alike_share_a_simulation(small):
    """Tile copies sit a multiple of the bank period apart and the payload buffers below the
    weights, so regions running different experts, or holding more or fewer, for the same
    number of sequences simulate alike, counter for counter, and share a key."""
    from engine_compare import assert_same
    from wse.workload.decode import bank_period
    from wse.workload.experts import decode_experts
    from wse.workload.region import Lanes
    from wse.workload.mesh import MeshBuilder, Region
    spec = load_model("tiny-moe")
    params = DecodeParams(batch=1, moe_mapping="regions", experts_per_region=4)
    results = []
    # uniform choice: layer 0 runs experts 0 and 1, layer 1 runs 1 and 2
    for layer, experts in ((0, (0, 4)), (1, (0, 4)), (1, (1, 4))):
        ep = plan_experts(spec, layer, experts, 8, small, params)
        assert ep.shapes["gate_up"].tile_bytes() % bank_period(small) == 0
        assert list(ep.local_experts().values()) == [1, 1] and ep.last
        b = MeshBuilder(8, 8, 4)
        decode_experts(ep, Region(0, 0, 8, 8), b, Lanes(None, {}, None, {}))
        results.append(run(b.build(), small))
    assert list(moe_experts(spec, 0, 1))[:2] != list(moe_experts(spec, 1, 1))[:2]
    assert_same(results[0], results[1], "experts 0, 1 against experts 1, 2")
    assert_same(results[0], results[2], "experts 0, 1 of 4 against experts 1, 2 of 3")
