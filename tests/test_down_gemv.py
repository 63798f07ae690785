"""The FFN's down GEMV stored by output (--down-gemv dot; auto where it takes fewer cycles):
one DOT per output element over the row's FFN dims instead of one FMAC per FFN dim over the
column's hidden chunk. The same products (FLOPs, weight bytes), the engine against the reference
stepper, and auto taking the faster form; values: test_functional_layer (its 3x5 layers take
dots under auto; a forced case too)."""
import pytest

from checked import run
from engine_compare import assert_same
from wse.engine import reference
from wse.workload.gemv import dots_cheaper, gemv_ops
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


# --- every weight GEMV (--gemv-form), at any precision ---

@pytest.fixture(scope="module")
def roomy():
    """The small wafer with SRAM for a latent-attention layer on 3 x 5 PEs."""
    from wse import hardware
    return hardware.load_preset("small").with_overrides(["sram.sram_bytes=2097152", "wafer.mesh_height=128"])


def test_a_low_precision_tile_by_output_dequantizes_each_stored_value_once(small):
    """By output: one DOT per (sequence, output) over the input chunk, on blocks of outputs'
    dequantized weights; the SCALEs cover the stored tile (padding included) once, as by input."""
    from wse import isa
    from wse.workload.experts import plan_experts
    spec = load_model("tiny-moe")
    for w in ("fp8", "int8", "int4"):
        forms = {}
        for form in ("axpy", "dot"):
            p = plan_experts(spec, 0, (0, 4), 16, small, DecodeParams(weights=w, batch=2, gemv_form=form,
                                                                       down_gemv=form), Q=16)
            for k, s in p.shapes.items():
                ops = gemv_ops(s, 0, 0, 1000, 2000, 2, 64, 64)
                mt, nt = s.in_chunks[0], s.out_chunks[0]
                kinds = {}
                for o in ops:
                    kinds[o.kind] = kinds.get(o.kind, 0) + o.length
                assert s.dots == (form == "dot")
                assert kinds[isa.KIND_SCALE] == (nt if s.dots else mt) * s.pitch  # each stored byte once
                prod = isa.KIND_DOT if s.dots else isa.KIND_FMAC
                assert kinds[prod] == 2 * mt * nt and set(kinds) == {isa.KIND_SCALE, prod}
                forms[form, k] = s.dequant_flops() > 0
        assert all(forms.values())


@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_gemv_form_picks_each_tile_and_keeps_the_products(weights, roomy):
    """auto stores a tile by output exactly where dots_cheaper says; axpy keeps every tile by input
    (the mapping before); the products' FLOPs and the weight bytes do not depend on the form (the
    dequantize's do: it converts each stored row's padding too), and the layer matches the
    reference stepper, its counted FLOPs the analytic ones."""
    spec = load_model("tiny-mla")
    plans = {f: plan_layer(spec, 1, 3, roomy, DecodeParams(batch=2, context=14, weights=weights, gemv_form=f), Q=5)
             for f in ("axpy", "auto", "dot")}
    gemvs = [k for k in plans["auto"].shapes if k not in ("uk", "uv", "down")]
    assert {"a", "qb", "o", "router", "gate_up"} <= set(gemvs)
    assert not any(plans["axpy"].shapes[k].dots for k in gemvs)
    assert all(plans["dot"].shapes[k].dots for k in gemvs)
    assert all(plans["auto"].shapes[k].dots == dots_cheaper(plans["auto"].shapes[k], roomy) for k in gemvs)
    products = [{k: v for k, v in layer_flops(p)[0].items() if k != "dequant"} for p in plans.values()]
    assert all(f == products[0] for f in products)  # (dequantizing pads each stored row: its FLOPs differ)
    assert len({layer_weight_bytes(p) for p in plans.values()}) == 1
    b = MeshBuilder(3, 5, 4)
    build = decode_layer(plans["dot"], Region(0, 0, 3, 5), b, Lanes(None, {}, None, {}))
    trace = b.build()
    fast = run(trace, roomy)
    assert_same(fast, reference.simulate(trace, roomy), "every tile by output")
    assert int(fast.pe("flops").sum()) == sum(build.flops.values()) == sum(layer_flops(plans["dot"])[0].values())


def test_dots_cheaper_weighs_the_setups(small):
    """Kimi K2's expert gate/up on a 95x130 slot: 76 inputs by 32 outputs a PE (2 x 16 FFN dims):
    32 DOTs of 10 steps beat 76 FMACs of 4 (8-cycle setups); its down (16 by 76) the other way."""
    from wse.workload.gemv import GemvShape
    from wse.workload.mesh import X, Y, split
    gu = GemvShape(7168, 4096, X, split(7168, 95), [2 * f for f in split(2048, 130)], precision="fp8")
    dn = GemvShape(2048, 7168, Y, split(2048, 130), split(7168, 95), precision="fp8")
    assert dots_cheaper(gu, small) and not dots_cheaper(dn, small)


def test_a_bad_gemv_form_is_one_error_line(tmp_path):
    from click.testing import CliRunner
    from wse.cli import cli
    from wse.errors import WseError
    with pytest.raises(WseError, match="--gemv-form 'diagonal' is not one of auto, axpy, dot"):
        DecodeParams(gemv_form="diagonal")
    r = CliRunner().invoke(cli, ["run", "--model", "tiny", "--gemv-form", "diagonal", "-o", str(tmp_path / "x.h5")])
    assert r.exit_code == 2 and "diagonal" in r.output and "Traceback" not in r.output
