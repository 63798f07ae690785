"""A dense layer split over two slots (--dense-ffn region): its layer region keeps attention and
the KV cache, the slot after it the FFN (docs/workloads.md, "Dense FFN regions").

The split must cost nothing but one more hand-off (FLOPs, weights and KV cache conserved), compose
exactly, compute the layer (functional check), and leave the layer region the KV room that bounds
a MoE model's pipeline depth.
"""
import pytest

from test_expert_regions import assert_composed_equals_full
from wse import hardware
from wse.errors import WseError
from wse.system.wafers import extra_in_flight_of, region_infos
from wse.workload.decode import chain_elements, ffn_plan, layer_plan, plan_model, splits_ffn
from wse.workload.layer_sizes import plan_layer
from wse.workload.mesh import Region
from wse.workload.models import load_model
from wse.workload.params import DecodeParams
from wse.workload.plan import FitError
from wse.workload.region import handoff_flops
from wse.workload.stages import full_trace


def _plan(name, small, dense_ffn="auto", **kw):
    return plan_model(load_model(name), small, DecodeParams(context=16, moe_mapping="regions", dense_ffn=dense_ffn,
                                                             **kw))


def test_auto_splits_dense_layers_where_routed_experts_are_in_expert_regions(small):
    spec = load_model("tiny-mla")  # layer 0 dense, layers 1-2 MoE
    split = _plan("tiny-mla", small)
    assert [(s.kind, s.index) for s in split.slots[:4]] == [("embedding", -1), ("layer", 0), ("ffn", 0), ("layer", 1)]
    assert [s.kind for s in _plan("tiny-mla", small, "layer").slots].count("ffn") == 0
    local = plan_model(spec, small, DecodeParams(context=16, moe_mapping="local"))
    assert not local.split_ffn and "ffn" not in {s.kind for s in local.slots}
    assert splits_ffn(spec, DecodeParams(dense_ffn="region"), False)  # any model, on request
    assert not splits_ffn(load_model("tiny"), DecodeParams(), False)
    assert chain_elements(spec, 0, 2, 2, frozenset({0})) == [
        ("layer", 0, None), ("ffn", 0, None), ("layer", 1, None), ("experts", 1, (0, 2)), ("experts", 1, (2, 4))]
    assert [i.label for i in region_infos(split)][1:3] == ["layer region", "ffn region"]


def test_the_split_conserves_flops_weights_and_kv_and_adds_one_handoff(small):
    builds = {}
    for how in ("layer", "region"):
        plan = _plan("tiny-mla", small, how)
        builds[how] = (plan, full_trace(plan)[1])
    (p0, whole), (p1, split) = builds["layer"], builds["region"]
    assert (p0.P, p0.Q) == (p1.P, p1.Q)
    for field in ("model_flops", "weight_bytes", "kv_bytes"):
        assert sum(getattr(b, field) for b in whole) == sum(getattr(b, field) for b in split), field
    extra = sum(sum(b.flops.values()) for b in split) - sum(sum(b.flops.values()) for b in whole)
    assert extra == handoff_flops(Region(0, 0, p1.P, p1.Q))
    att, ffn = layer_plan(p1, 0), ffn_plan(p1, 0)
    assert "kv" in att.buf and "kv" not in ffn.buf and "gu" in ffn.buf and "gu" not in att.buf
    assert not {"w_gate_up", "w_down"} & set(att.mem.buffers) and not {"w_a", "w_o"} & set(ffn.mem.buffers)
    assert extra_in_flight_of(p1) > extra_in_flight_of(p0)


@pytest.mark.parametrize("name,kw", [("tiny-mla", dict(batch=2)),
                                     ("moe16", dict(dense_ffn="region", moe_mapping="local"))])
def test_a_split_step_composes_counter_for_counter(name, kw, small):
    kw = dict(dict(context=16, moe_mapping="regions"), **kw)
    plan = plan_model(load_model(name), small, DecodeParams(**kw))
    assert "ffn" in {s.kind for s in plan.slots}
    assert_composed_equals_full(plan, small)


def test_the_split_layer_region_holds_the_kv_caches_kimi_k2s_whole_dense_layer_cannot():
    """Kimi K2 at fp8 on 127x130 slots: its dense layer 0 (latent attention and an 18,432-wide
    FFN) does not fit whole; split, its layer region has about the KV room of a MoE layer
    region (attention, router and shared expert)."""
    spec, cfg = load_model("kimi-k2"), hardware.load_preset("wse3")
    prm = DecodeParams(context=1024, weights="fp8")
    with pytest.raises(FitError, match="layer 0 on a 127x130 region"):
        plan_layer(spec, 0, 127, cfg, prm, Q=130)
    att = plan_layer(spec, 0, 127, cfg, prm, Q=130, part="attention")
    plan_layer(spec, 0, 127, cfg, prm, Q=130, part="ffn")
    moe = plan_layer(spec, 1, 127, cfg, prm, routed=False, Q=130)

    def room(p):
        return (p.mem.limit - p.mem.top) // p.kv_bytes_per_pe
    assert room(att) >= room(moe) > 100


def test_only_a_dense_layer_splits_and_bad_values_are_named(small):
    spec, cfg = load_model("tiny-mla"), small
    with pytest.raises(WseError, match="no 'ffn' part"):
        plan_layer(spec, 1, 16, cfg, DecodeParams(context=16), routed=False, Q=32, part="ffn")
    with pytest.raises(WseError, match="--dense-ffn 'x'"):
        DecodeParams(dense_ffn="x")
