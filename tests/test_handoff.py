"""The fused hand-off (--handoff fused, the default): a region ending with an FFN nests its
one-element row sync at the roots of the FFN's (last expert's) down all-reduce instead of ending
with a region-wide barrier (region.handoff_sync). Composition must stay exact, the FLOPs must match the
closed form, and regions ending otherwise keep the barrier; the engine is held to the reference
stepper on fused layers by test_flash (both kinds of down all-reduce root, below)."""
import pytest

from checked import composed_equals_full, run
from wse.workload.chain import chain_of, key_B
from wse.workload.decode import ffn_plan, layer_plan, plan_model
from wse.workload.layer import layer_flops
from wse.workload.layer_sizes import plan_layer
from wse.workload.mesh import Region, Y
from wse.workload.models import load_model
from wse.workload.params import DecodeParams
from wse.workload.region import handoff_flops, reducers
from wse.workload.stages import full_trace


def test_a_fused_handoff_composes_exactly_and_saves_cycles(small):
    """moe16 with expert regions and split dense layers: the dense layer's FFN region and the MoE
    layer regions (their shared expert's down all-reduce) fuse; the attention half, the
    embedding and the expert regions' collectors keep the barrier. (The composed == full tests
    of the other suites run fused hand-offs too, by default.)"""
    spec, kw = load_model("moe16"), dict(context=16, moe_mapping="regions", dense_ffn="region")
    fused = plan_model(spec, small, DecodeParams(**kw))
    barrier = plan_model(spec, small, DecodeParams(handoff="barrier", **kw))
    composed_equals_full(fused, small)
    assert run(full_trace(fused)[0], small).total_cycles < run(full_trace(barrier)[0], small).total_cycles
    kinds = {}
    for s in fused.slots:
        if s.kind in ("layer", "ffn"):
            lp = ffn_plan(fused, s.index) if s.kind == "ffn" else layer_plan(fused, s.index)
            kinds[(s.kind, spec.is_moe_layer(s.index))] = lp.fused_handoff
    assert kinds == {("layer", False): False, ("ffn", False): True, ("layer", True): True}
    keys = [key_B(fused, u) for u in chain_of(fused).anchored[:-1]]
    assert keys[0] == key_B(barrier, 0) and "fused" not in keys[0]  # the embedding's barrier
    assert any("fused" in k for k in keys)


@pytest.mark.parametrize("kw", [dict(attention_block=2), dict(attention="classic")])
def test_the_fused_sync_rides_both_kinds_of_down_all_reduce(kw, small):
    """The layers test_flash.test_a_flash_layer_matches_the_reference_stepper runs (FFN and
    hand-off included) against the reference stepper: flash row blocks make the down all-reduce
    a segmented line's two-level, whose final root hosts the sync; without them (classic) it is
    the flat variant, whose root hosts it in one chunk. The sync costs one row's adds, not every
    row's and then the root column's."""
    spec, P, Q = load_model("tiny"), 4, 8
    plan = plan_layer(spec, 0, P, small, DecodeParams(batch=2, context=14, **kw), Q=Q)
    red = reducers(Region(0, 0, P, Q), None, plan.params, spec, small)
    flat = red[Y].flat_from is not None and min(plan.Hc) * plan.params.batch >= red[Y].flat_from
    assert plan.fused_handoff and red[Y].segments != flat
    barrier = plan_layer(spec, 0, P, small, DecodeParams(batch=2, context=14, handoff="barrier", **kw), Q=Q)
    saved = layer_flops(barrier)[0]["allreduce"] - layer_flops(plan)[0]["allreduce"]
    assert saved == handoff_flops(Region(0, 0, P, Q)) - (P - 1) > 0


def test_regions_ending_otherwise_keep_the_barrier(small):
    """A MoE layer region computing no expert (routed ones in expert regions, no shared one)
    ends with its router: the barrier; one with a shared expert, or its routed ones, fuses."""
    kw = dict(context=12)
    for name, routed, fused in (("tiny-oss", False, False), ("tiny-moe", False, True), ("tiny-moe", True, True)):
        lp = plan_layer(load_model(name), 1, 4, small, DecodeParams(**kw), routed=routed, Q=16)
        assert lp.moe and lp.fused_handoff == fused, name
    half = plan_layer(load_model("tiny"), 1, 4, small, DecodeParams(**kw), Q=8, part="attention")
    assert not half.fused_handoff
    assert not plan_layer(load_model("tiny"), 1, 4, small, DecodeParams(handoff="barrier", **kw), Q=8).fused_handoff
