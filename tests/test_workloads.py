"""Workload traces: kernels and model steps conserve FLOPs, weight bytes and wavelets, and a
composed model step equals the full simulation exactly."""
import numpy as np
import pytest

from checked import run
from engine_compare import assert_same
from wse import hardware
from wse.engine import reference
from wse.errors import WseError
from wse.engine.run import simulate
from wse.workload import gemv as gemv_mod
from wse.workload.collectives import default_groups
from wse.workload.compose import compose
from wse.workload.stages import full_trace
from wse.workload.decode import plan_model
from wse.workload.gemm import ALGOS, standalone as gemm
from wse.workload.kernels import allreduce, attention
from wse.workload.params import DecodeParams
from wse.workload.models import load_model
from wse.workload.plan import FitError
from wse.trace_check import validate


def test_group_count_is_the_divisor_nearest_sqrt():
    assert [default_groups(n) for n in (256, 360, 720, 146, 7, 1, 2)] == [16, 18, 24, 12, 3, 1, 1]


@pytest.mark.parametrize("algo", ["two-level", "chain"])
@pytest.mark.parametrize("m, n, px, py", [(256, 256, 16, 16), (300, 200, 12, 10), (64, 96, 1, 8)])
def test_gemv_conserves_flops_and_bytes(algo, m, n, px, py, small):
    tr, facts = gemv_mod.standalone(m, n, px, py, small, algo=algo, batch=2)
    r = run(tr, small)
    assert r.pe("flops").sum() == facts["model_flops"] + facts["reduce_flops"]
    assert facts["model_flops"] == 2 * m * n * 2
    assert facts["weight_bytes"] == 2 * m * n
    assert facts["allocated_weight_bytes"] >= facts["weight_bytes"]


def test_two_level_reduce_beats_the_chain_on_long_columns(small):
    big = small.with_overrides(["wafer.mesh_height=128"])
    cyc = {a: run(gemv_mod.standalone(4096, 512, 4, 128, big, algo=a)[0], big).total_cycles
           for a in ("two-level", "chain")}
    assert cyc["two-level"] < cyc["chain"]


@pytest.mark.parametrize("axis", ["x", "y"])
def test_allreduce_flops(axis, small):
    tr, facts = allreduce((12, 7), 33, axis, small)
    r = run(tr, small)
    assert r.pe("flops").sum() == facts["allreduce_flops"] == (7 if axis == "x" else 12) * ((12 if axis == "x" else 7) - 1) * 33


def test_allreduce_matches_the_reference_stepper(tiny):
    tr, _ = allreduce((6, 5), 9, "y", tiny, groups=2)
    validate(tr, tiny)
    assert_same(simulate(tr, tiny), reference.simulate(tr, tiny), "allreduce")


def test_attention_kernel_flops(small):
    tr, facts = attention(8, 8, 2, 16, 40, 2, small)
    r = run(tr, small)
    assert r.pe("flops").sum() == facts["executed_flops"]
    assert facts["model_flops"] == 2 * 2 * 128 * 40 * 2 + 13 * 8 * 40 * 2  # scores + values, softmax
    assert facts["kv_cache_bytes"] == 2 * 2 * 16 * 40 * 2 * 2


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("P", [1, 3, 8])
def test_gemm_conserves_flops(algo, P, small):
    tr, facts = gemm(40, 50, 30, P, small, algo)
    r = run(tr, small)
    assert r.pe("flops").sum() == facts["executed_flops"]
    assert facts["model_flops"] == 2 * 40 * 50 * 30
    assert facts["executed_flops"] == 2 * 40 * (-(-50 // P) * P) * 30
    # unicast shifts and relays: every wavelet sent is received exactly once
    assert r.pe("wavelets_sent").sum() == r.pe("wavelets_received").sum()


@pytest.mark.parametrize("P, Q, panels", [(3, 5, None), (5, 3, None), (4, 7, 14), (8, 3, 11)])
def test_summa_on_a_rectangular_region_conserves_flops_and_wavelets(P, Q, panels, small):
    tr, facts = gemm(40, 50, 30, P, small, "summa", Q=Q, panels=panels)
    nb = panels or max(P, Q)
    r = run(tr, small)
    assert r.complete and tr.mesh_width == P and tr.mesh_height == Q
    assert r.pe("flops").sum() == facts["executed_flops"] == 2 * 40 * (-(-50 // nb) * nb) * 30
    # step s: column s mod P broadcasts M x Kt of A along the rows, row s mod Q Kt x N of B down
    # the columns (each column's B tile as stored: Kt rows of the widest chunk's 8-byte pitch);
    # every other PE of the line receives it once
    kt = -(-50 // nb)
    pitch = -(-(-(-30 // P)) * 2 // 8) * 8 // 2
    assert r.pe("wavelets_received").sum() == nb * (40 * kt * (P - 1) + kt * P * pitch * (Q - 1))


def test_summa_rectangular_matches_the_reference_stepper(tiny):
    tr, _ = gemm(6, 7, 5, 3, tiny, "summa", Q=4, panels=6)
    validate(tr, tiny)
    assert_same(simulate(tr, tiny), reference.simulate(tr, tiny), "summa 3x4")


def test_summa_takes_more_panels_when_its_buffers_do_not_fit(small):
    from wse.workload.gemm import summa_panels
    big_k = (small.sram_bytes - small.sram_reserved_bytes) // 2  # one panel of B would fill the SRAM
    nb = summa_panels(8, big_k, 4, 4, 8, small)
    assert nb > 8 and nb % 8 == 0
    tr, facts = gemm(8, big_k, 4, 4, small, "summa", Q=8, steps=2)
    assert facts["sram_bytes_per_pe"] <= small.sram_bytes - small.sram_reserved_bytes


def test_cannon_needs_a_square_region(small):
    with pytest.raises(WseError, match="square"):
        gemm(40, 50, 30, 3, small, "meshgemm", Q=5)


@pytest.mark.parametrize("algo", ["meshgemm", "cannon"])
def test_gemm_alignment_costs_time_not_flops(algo, small):
    plain_tr, facts = gemm(64, 64, 64, 8, small, algo)
    aligned_tr, facts2 = gemm(64, 64, 64, 8, small, algo, True, True)
    plain, aligned = run(plain_tr, small), run(aligned_tr, small)
    assert aligned.total_cycles > plain.total_cycles
    assert aligned.pe("flops").sum() == plain.pe("flops").sum() == facts["executed_flops"] == facts2["executed_flops"]


def test_gemm_kernel_matches_the_reference_stepper(tiny):
    tr, _ = gemm(6, 6, 6, 3, tiny, "meshgemm", True, True)
    validate(tr, tiny)
    assert_same(simulate(tr, tiny), reference.simulate(tr, tiny), "meshgemm")


@pytest.mark.parametrize("model, batch", [("tiny", 1), ("tiny-moe", 2)])
def test_composed_decode_equals_the_full_simulation(model, batch, small):
    plan = plan_model(load_model(model), small, DecodeParams(batch=batch, context=12), P=16)
    trace, builds = full_trace(plan)
    full = run(trace, small)
    composed = compose(plan, lambda t: run(t, small))
    assert composed.total_cycles == full.total_cycles
    assert composed.simulations <= 2 * len(plan.slots)
    # conservation over the whole step
    assert full.pe("flops").sum() == sum(sum(b.flops.values()) for b in builds)
    spec = plan.spec
    assert sum(b.weight_bytes for b in builds) == 2 * spec.total_params()
    assert full.pe("wavelets_sent").sum() > 0


def test_a_batch_gathered_from_two_embedding_columns_composes_exactly(small):
    """The gather into the embedding's lane column runs before its hand-off barrier, so stage A0
    holds it and the composed step still equals the full one."""
    from wse.workload.mesh import split
    spec = load_model("tiny")
    width = plan_model(spec, small, DecodeParams(context=12), P=16).slots[0].region.width
    plan = plan_model(spec, small, DecodeParams(batch=3, context=12, token=split(1024, width)[0] - 2), P=16)
    assert plan.token_col == 1
    full = run(full_trace(plan)[0], small)
    assert compose(plan, lambda t: run(t, small)).total_cycles == full.total_cycles


def test_identical_layers_are_simulated_once(small):
    spec = load_model("tiny")
    many = small.with_overrides(["wafer.mesh_width=160", "wafer.mesh_height=64"])
    plan = plan_model(spec, many, DecodeParams(context=8), P=16)
    assert plan.n_layers == 2
    calls = []
    compose(plan, lambda t: calls.append(t) or run(t, many))
    # region 0 alone, then per transition a barrier trace and a stage trace, deduplicated
    assert len(calls) < 2 * len(plan.slots)


def test_a_model_that_does_not_fit_says_how_much_is_missing():
    with pytest.raises(FitError, match=r"does not fit on one wse3 wafer.*B missing.*at least \d+ wafers"):
        plan_model(load_model("llama3.1-70b"), hardware.load_preset("wse3"), DecodeParams())


def test_llama_8b_places_on_one_wse3():
    plan = plan_model(load_model("llama3.1-8b"), hardware.load_preset("wse3"), DecodeParams(context=1024))
    kinds = [s.kind for s in plan.slots]
    assert kinds.count("layer") == 32 and kinds[0] == "embedding" and kinds[-1] == "lm_head"
    assert 100 <= plan.P <= 200


@pytest.mark.parametrize("model", ["tiny", "tiny-moe", "tiny-mla"])
def test_prefill_conserves_flops(model, small):
    from wse.workload.prefill import prefill
    spec = load_model(model)
    pr = prefill(spec, small, 8, 16, 8, spec.layers, lambda t: run(t, small))
    simulated = sum(int(r.pe("flops").sum()) for k, r in pr.results.items() if k != "lm_head") * spec.layers \
        + int(pr.results["lm_head"].pe("flops").sum())
    assert simulated == pr.executed_flops
    assert pr.ttft_cycles == spec.layers * pr.layer_cycles + pr.kernels["lm_head"]
    assert np.all(np.array(list(pr.kernels.values())) > 0)


@pytest.mark.parametrize("name, layer, P, Q, kw", [
    ("tiny-mla", 1, 8, 16, dict(batch=2)),  # every PE its own program: row offsets, column runs
    ("tiny-oss", 0, 8, 16, dict(weights="bf16", attention="classic")),
    ("moe16", 1, 8, 16, dict(batch=3, weights="fp8")),
])
def test_shared_parts_build_the_same_programs(name, layer, P, Q, kw, monkeypatch):
    """Region builders share each program part among the PEs that agree on what it reads
    (region.PartCache) and remember GEMV tiles' ops (gemv._GEMV_OPS): the trace is the one built
    without either."""
    from wse import hardware
    from wse.workload import gemv
    from wse.workload.layer import decode_layer
    from wse.workload.layer_sizes import plan_layer
    from wse.workload.mesh import MeshBuilder, Region
    from wse.workload.models import load_model
    from wse.workload.region import THREADS, Lanes, PartCache
    cfg = hardware.load_preset("small").with_overrides(["sram.sram_bytes=2097152", "wafer.mesh_height=128"])
    plan = plan_layer(load_model(name), layer, P, cfg, DecodeParams(context=64, **kw), Q=Q)

    def built():
        b = MeshBuilder(P, Q, THREADS)
        decode_layer(plan, Region(0, 0, P, Q), b, Lanes(None, {}, None, {}))
        tr = b.build()
        tr.tensors = None
        return tr.content_hash()
    shared = built()
    monkeypatch.setattr(PartCache, "enabled", False)
    monkeypatch.setattr(gemv, "_GEMV_OPS_MAX", 0)
    assert built() == shared
