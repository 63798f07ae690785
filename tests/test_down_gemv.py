"""The FFN's down GEMV stored by output (--down-gemv dot; auto where it takes fewer cycles):
one DOT per output element over the row's FFN dims instead of one FMAC per FFN dim over the
column's hidden chunk. The same products (FLOPs, weight bytes), the engine against the reference
stepper, and auto taking the faster form; values: test_functional_layer (its 3x5 layers take
dots under auto; a forced case too)."""
import pytest

from checked import run
from engine_compare import assert_same
from wse.engine import reference
from wse.workload.gemv import dots_cheaper
from wse.workload.layer import decode_layer, layer_flops, layer_weight_bytes
from wse.workload.layer_sizes import plan_layer
from wse.workload.mesh import MeshBuilder, Region
from wse.workload.models import load_model
from wse.workload.params import DecodeParams
from wse.workload.region import Lanes


def _layer(cfg, P, Q, **kw):
    plan = plan_layer(load_model("tiny"), 0, P, cfg, DecodeParams(batch=2, context=14, **kw), Q=Q)
    b = MeshBuilder(P, Q, 4)
    build = decode_layer(plan, Region(0, 0, P, Q), b, Lanes(None, {}, None, {}))
    return plan, build, b.build()


def test_down_dots_match_the_reference_stepper_and_do_the_same_work(small):
    dot, build, trace = _layer(small, 4, 8, down_gemv="dot")
    axpy = plan_layer(load_model("tiny"), 0, 4, small, DecodeParams(batch=2, context=14, down_gemv="axpy"), Q=8)
    assert dot.shapes["down"].dots and not axpy.shapes["down"].dots
    fast = run(trace, small)
    assert_same(fast, reference.simulate(trace, small), "down dots")
    assert int(fast.pe("flops").sum()) == sum(build.flops.values()) == sum(layer_flops(dot)[0].values())
    assert layer_flops(dot) == layer_flops(axpy) and layer_weight_bytes(dot) == layer_weight_bytes(axpy)


@pytest.mark.parametrize("P, Q", [(16, 16), (4, 8)])
def test_auto_takes_the_form_with_fewer_cycles(P, Q, small):
    """16x16: 16 outputs of 32 FFN dims a PE (DOTs: 16 ops of 4 steps; FMACs: 32 of 2); 4x8: 64
    of 64 (a tie: the FMACs stay)."""
    cycles = {f: run(_layer(small, P, Q, down_gemv=f)[2], small).total_cycles for f in ("axpy", "dot")}
    auto = plan_layer(load_model("tiny"), 0, P, small, DecodeParams(batch=2, context=14), Q=Q).shapes["down"]
    assert auto.dots == dots_cheaper(auto, small) == (P == 16)
    assert (cycles["dot"] < cycles["axpy"]) == auto.dots
