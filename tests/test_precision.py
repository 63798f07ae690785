"""Low-precision weights (docs/workloads.md, "Weight precision"): weights stored in 8 or 4 bits
are dequantized block by block before the FMACs that use them; the FLOPs and bytes are
conserved, the composed step stays exact, and bad precisions are refused."""
import pytest
from click.testing import CliRunner

from checked import composed_equals_full, model_bytes, run
from engine_compare import assert_same
from wse import isa
from wse.cli import cli
from wse.engine import reference
from wse.errors import WseError
from wse.system import gpu as g
from wse.workload import gemv as gemv_mod
from wse.workload.decode import bytes_needed, plan_model
from wse.workload.models import load_model
from wse.workload.params import DecodeParams
from wse.workload.precision import INT4_GROUP, row_bytes, value_bytes, weights_of


@pytest.mark.parametrize("weights", ["bf16", "fp8", "int8", "int4"])
@pytest.mark.parametrize("m, n, px, py", [(256, 256, 16, 16), (300, 200, 12, 10)])
def test_a_low_precision_gemv_conserves_flops_and_bytes(weights, m, n, px, py, small):
    tr, facts = gemv_mod.standalone(m, n, px, py, small, batch=2, weights=weights)
    r = run(tr, small)
    assert r.pe("flops").sum() == facts["model_flops"] + facts["reduce_flops"] + facts["dequant_flops"]
    assert facts["model_flops"] == 2 * m * n * 2
    assert facts["weight_bytes"] == m * n * value_bytes(weights)
    if weights == "bf16":
        assert facts["dequant_flops"] == 0
    elif weights != "int4" and (m % py, n % px) == (0, 0) and (n // px) % 8 == 0:  # no padding
        assert facts["dequant_flops"] == m * n  # each stored value once
    else:  # padded rows (and int4's scales, stored with their rows) are decoded too
        assert facts["dequant_flops"] >= m * n
    assert facts["allocated_weight_bytes"] >= facts["weight_bytes"]


def test_dequantize_forms_match_the_reference_stepper(tiny):
    for weights in ("fp8", "int4"):
        tr, _ = gemv_mod.standalone(24, 40, 4, 3, tiny, weights=weights)
        assert_same(run(tr, tiny), reference.simulate(tr, tiny), f"gemv {weights}")


def test_fewer_bits_cost_cycles_where_the_dequantize_is_slower_than_the_fmacs(small):
    cycles = {w: run(gemv_mod.standalone(512, 512, 8, 8, small, weights=w)[0], small).total_cycles
              for w in ("bf16", "fp8", "int4")}
    assert cycles["bf16"] < cycles["fp8"] < cycles["int4"]  # batch 1: the dequantize is not hidden


def test_stored_rows_and_values():
    assert row_bytes("bf16", 10) == 20 and row_bytes("fp8", 10) == 10
    assert row_bytes("int4", 64) == 32 + 2 and row_bytes("int4", 33) == 17 + 2
    assert value_bytes("int4") == 0.5 + 1 / INT4_GROUP
    assert isa.DTYPE_VALUES[isa.DTYPE_INT4] == 2 and isa.DTYPE_SRC_BYTES[isa.DTYPE_FP8] == 1


@pytest.mark.parametrize("weights", ["fp8", "int8", "int4"])
@pytest.mark.parametrize("kw", [dict(batch=2, context=16),
                                dict(batch=2, context=16, moe_mapping="regions", experts_per_region=4)])
def test_a_low_precision_moe_step_composes_exactly(weights, kw, small):
    plan = plan_model(load_model("tiny-moe"), small, DecodeParams(weights=weights, **kw))
    builds = composed_equals_full(plan, small)  # cycles, FLOPs (dequantize included) and bytes
    assert sum(b.flops.get("dequant", 0) for b in builds) > 0
    assert model_bytes(plan) < 2 * plan.spec.total_params()


def test_tiles_by_output_compose_exactly(small):
    """--gemv-form auto: low-precision tiles by output where fewer cycles (tiny-moe's expert and
    layer regions take them), composed equal to full, FLOPs with their dequantize."""
    plan = plan_model(load_model("tiny-moe"), small, DecodeParams(weights="int4", batch=2, context=16,
                                                                  moe_mapping="regions", experts_per_region=4,
                                                                  gemv_form="auto"))
    builds = composed_equals_full(plan, small)
    assert sum(b.flops.get("dequant", 0) for b in builds) > 0
    from wse.workload.experts import plan_experts
    region = plan_experts(plan.spec, 0, (0, 4), plan.P, small, plan.params, Q=plan.Q)
    assert region.shapes["gate_up"].dots  # (8 gate/up outputs by 13 hidden inputs a PE, on 21x32)


def test_the_published_checkpoint_is_the_default():
    ds, kimi, l8b = load_model("deepseek-v3"), load_model("kimi-k2"), load_model("llama3.1-8b")
    assert weights_of(ds, None) == ("fp8", "fp8") and weights_of(kimi, None) == ("fp8", "fp8")
    assert weights_of(kimi, "bf16") == ("bf16", "bf16") and weights_of(l8b, None) == ("bf16", "bf16")
    assert weights_of(load_model("gpt-oss-120b"), None) == ("bf16", "int4")
    with pytest.raises(WseError, match="published in bf16"):
        weights_of(l8b, "int4")
    with pytest.raises(WseError, match="not one of"):
        weights_of(ds, "fp4")
    ctx = dict(context=1024)
    assert bytes_needed(ds, DecodeParams(**ctx), ds.layers) < 0.55 * bytes_needed(ds, DecodeParams(weights="bf16",
                                                                                                   **ctx), ds.layers)


def test_gpu_weights_follow_the_checkpoint():
    ds, l8b = load_model("deepseek-v3"), load_model("llama3.1-8b")
    h100 = g.load_gpu("h100")
    fp8 = g.weights_for(ds, ("fp8", "fp8"))
    assert fp8.fp8 and g.weights_for(ds, ("fp8", "int4")).fp8 is False  # int4 is weight-only
    assert h100.matmul_flops_per_s(fp8) == h100.fp8_flops_per_s > h100.bf16_flops_per_s
    assert h100.matmul_flops_per_s(g.weights_for(l8b, ("bf16", "bf16"))) == h100.bf16_flops_per_s


@pytest.mark.parametrize("args, match", [
    (["--weights", "fp4"], "--weights 'fp4' is not one of"),
    (["--weights", "int4"], "llama3.1-8b is published in bf16 only"),
])
def test_bad_precisions_are_one_error_line(args, match, tmp_path):
    r = CliRunner().invoke(cli, ["run", "--model", "llama3.1-8b", "--layers", "1", "--wafer", "tiny", *args,
                                 "-o", str(tmp_path / "r.h5")])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.output
    assert not (tmp_path / "r.h5").exists()


def test_prefill_weights_follow_the_decode_precisions():
    """Prefill stores a weight GEMM's weights as the decode step does: the FFN GEMMs at the
    routed experts' precision in a MoE model, the other weight GEMMs at the dense one, the
    attention GEMMs, the elementwise kernel and the LM head at 16 bits."""
    from wse.workload.prefill import kernel_names, kernel_weights
    moe, dense = load_model("kimi-k2"), load_model("llama3.1-8b")
    got = {n: kernel_weights(moe, n, ("fp8", "int4")) for n in kernel_names(moe) + ["lm_head"]}
    assert got == {"q_kv_a": "fp8", "q_b": "fp8", "kv_b": "fp8", "scores": "bf16", "values": "bf16", "o": "fp8",
                   "gate_up": "int4", "down": "int4", "elementwise": "bf16", "lm_head": "bf16"}
    assert {kernel_weights(dense, n, ("int8", "int8")) for n in ("qkv", "o", "gate_up", "down")} == {"int8"}


@pytest.mark.parametrize("weights", ["fp8", "int4"])
def test_a_low_precision_prefill_kernel_conserves_flops(weights, small):
    """A weight-stationary prefill GEMM at low precision: its executed FLOPs (products, the
    reduction, each block's dequantize) are what the engine counts, and its tile takes the
    precision's bytes; on a square slot it runs weight-stationary (MeshGEMM moves 16-bit tiles)."""
    from wse.workload.prefill import kernel_trace, mapping, pieces
    spec = load_model("tiny")
    assert mapping("meshgemm", 16, 16, "gate_up", weights) == "stationary"
    assert mapping("meshgemm", 16, 16, "scores", weights) == "meshgemm"
    parts = pieces(spec, small, 16, 64, "gate_up", "meshgemm", 24, weights=weights)
    assert len(parts) == 1 and parts[0][1]["batch"] == 64  # (one block: its facts are the kernel's)
    lo = kernel_trace(spec, small, 16, 64, "gate_up", Q=24, weights=weights, **parts[0][1])
    hi = kernel_trace(spec, small, 16, 64, "gate_up", Q=24, **parts[0][1])
    r = run(lo[0], small)
    assert int(r.pe("flops").sum()) == lo[1]["executed_flops"] > hi[1]["executed_flops"] == hi[1]["model_flops"] + \
        23 * 2 * spec.ffn_size * 64
    assert lo[1]["model_flops"] == hi[1]["model_flops"]


def test_low_precision_prefill_fits_where_16_bits_do_not():
    """Kimi K2's dense-layer gate/up GEMM on its fewest-wafer 95x130 slot holds its fp8 tile
    (blocks of a few tokens) but not a 16-bit one: TTFT at the decode's precision places where
    prefill at 16 bits did not."""
    from wse import hardware
    from wse.workload.prefill import stationary_block
    spec, cfg = load_model("kimi-k2"), hardware.load_preset("wse3")
    assert stationary_block(spec, cfg, 95, 130, 256, "gate_up", "fp8") > 0
    with pytest.raises(WseError, match="bytes missing per PE"):
        stationary_block(spec, cfg, 95, 130, 256, "gate_up", "bf16")


def test_time_to_first_token_stores_the_run_precision(monkeypatch):
    """`wse system --weights`: the prefill kernels' pieces carry the precision (their cache keys
    too), so fp8 weights prefill with their dequantize and a different TTFT than bf16. (A 16x16
    wafer: 8x8 slots and a 16-token prompt keep the simulated kernels small.)"""
    from checked import run as checked_run
    from wse.system import pool
    from wse.system.compare import run_system
    from wse.system.config import load_system
    system = load_system("cs3", ['system.wafer="small"', "system.wafers=1", "wafer.mesh_width=16",
                                 "wafer.mesh_height=16"])
    cfg = system.wafer_config
    seen = []
    real = pool._prefill_here

    def here(spec, cfg, P, prompt, name, algo, lm_width, simulate, where, Q=None, kw=None, lm_rows=None):
        seen.append((name, (kw or {}).get("weights", "bf16")))
        return real(spec, cfg, P, prompt, name, algo, lm_width, simulate, where, Q, kw, lm_rows)
    monkeypatch.setattr(pool, "_prefill_here", here)
    ttft, stored = {}, {}
    for w in ("bf16", "fp8"):
        seen.clear()
        ttft[w] = run_system("tiny", system, lambda t: checked_run(t, cfg), wafers=1, context=16, prompt=16,
                             weights=w).ttft_s
        stored[w] = {n for n, s in seen if s == w}
    assert ttft["fp8"] != ttft["bf16"]
    assert stored["fp8"] == {"qkv", "o", "gate_up", "down"} and "scores" in stored["bf16"]
