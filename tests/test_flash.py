"""Flash decode attention (blocked, online softmax; workload/attention.py) and fused norms.

The blocked mapping must execute exactly the FLOPs its closed form counts at every block size,
do the same model work and hold the same weights as the classic mapping, match the reference
stepper counter for counter, compose exactly, keep its scratch independent of the context, and
the longest context a slot holds must be found exactly.
"""
import dataclasses

import pytest

from checked import composed_equals_full, run
from engine_compare import assert_same
from wse import hardware
from wse.engine import reference
from wse.workload.attention import block_tokens, blocks, head_rows
from wse.workload.collectives import SEGMENT_PIPELINED_FROM, LineAllReduce, ReduceColors
from wse.workload.decode import layer_plan, plan_model
from wse.workload.layer import decode_layer, layer_flops, layer_weight_bytes
from wse.workload.layer_sizes import largest_context, plan_layer
from wse.workload.mesh import MeshBuilder, Region
from wse.workload.models import load_model
from wse.workload.params import DecodeParams
from wse.workload.plan import FitError
from wse.workload.region import THREADS, Lanes

ATTN = ("norm1", "qkv", "attention", "o", "handoff")


def _layer(spec, cfg, params, P, Q, parts=ATTN):
    plan = plan_layer(spec, 0, P, cfg, params, Q=Q)
    b = MeshBuilder(P, Q, 4)
    build = decode_layer(plan, Region(0, 0, P, Q), b, Lanes(None, {}, None, {}), parts)
    return plan, build, b.build()


@pytest.mark.parametrize("block", [1, 3, 7, 0])
def test_attention_flops_are_conserved_at_every_block_size(block, small):
    """Simulated FLOPs equal the closed form; the model work does not depend on the block."""
    spec = load_model("tiny")
    classic = plan_layer(spec, 0, 4, small, DecodeParams(batch=2, context=30, attention="classic"), Q=8)
    params = DecodeParams(batch=2, context=30, attention_block=block)
    plan, build, trace = _layer(spec, small, params, 4, 8)
    r = run(trace, small)
    executed, model = layer_flops(plan, ATTN)
    assert int(r.pe("flops").sum()) == sum(build.flops.values()) == sum(executed.values())
    c_exec, c_model = layer_flops(classic, ATTN)
    for k in ("scores", "values", "qkv", "o"):
        assert executed[k] == c_exec[k]  # the dot products are the same work, only the softmax moves
    assert model == c_model  # model FLOPs count each operation once, whatever the mapping
    assert layer_weight_bytes(plan) == layer_weight_bytes(classic)


@pytest.mark.parametrize("name", ["tiny", "tiny-oss", "tiny-mla"])
def test_flash_and_classic_do_the_same_model_work(name, small):
    spec = load_model(name)
    plans = {a: plan_layer(spec, 1, 4, small.with_overrides(["sram.sram_bytes=131072"]),
                           DecodeParams(batch=2, context=12, attention=a, norms=n), Q=4)
             for a, n in (("flash", "separate"), ("classic", "separate"))}
    f, c = (layer_flops(plans[a])[0] for a in ("flash", "classic"))
    for k in ("scores", "values", "qkv", "o", "ffn"):
        assert f[k] == c[k]
    assert layer_weight_bytes(plans["flash"]) == layer_weight_bytes(plans["classic"])


@pytest.mark.parametrize("kw", [dict(attention_block=2), dict(attention_block=5, norms="separate"),
                                dict(attention="classic", norms="fused")])
def test_a_flash_layer_matches_the_reference_stepper(kw, small):
    """(Its FFN ends with the fused hand-off's sync: test_handoff.)"""
    spec = load_model("tiny")
    plan, build, trace = _layer(spec, small, DecodeParams(batch=2, context=14, **kw), 4, 8,
                                ATTN[:-1] + ("norm2", "ffn", "handoff"))
    # the flash layers overlap their blocks: the whole overlapped layer, FFN included, is checked here
    assert plan.overlap == (kw.get("attention") != "classic")
    fast = run(trace, small)
    assert_same(fast, reference.simulate(trace, small), f"layer {kw}")
    assert int(fast.pe("flops").sum()) == sum(build.flops.values())


@pytest.mark.parametrize("name,kw", [("tiny", dict(batch=2, context=40, attention_block=4)),
                                     ("tiny", dict(batch=1, context=24, attention="classic", norms="separate")),
                                     ("tiny-oss", dict(batch=2, context=20, attention_block=3)),
                                     ("tiny-mla", dict(batch=1, context=18, attention_block=5))])
def test_flash_steps_compose_exactly(name, kw, small):
    composed_equals_full(plan_model(load_model(name), small, DecodeParams(**kw)), small)


def test_head_rows_cover_every_dimension_once():
    spec = load_model("llama3.1-70b")
    for Q in (1, 3, 8, 13, 195, 586, 1024):
        hr = head_rows(spec, Q)
        assert len(hr.k_r) == Q and sum(hr.k_r) == spec.kv_size and sum(hr.q_r) == spec.q_size
        assert sum(hr.o_r) == spec.attn_out_size
        assert (min(hr.k_r) >= 1) == (Q <= spec.kv_size // 2)  # whole rotary pairs: rows beyond them hold none
        held = {}  # (KV head, dim) -> rows holding it: every one exactly once, with its rotary partner
        half = spec.head_dim // 2
        for j in range(Q):
            assert hr.kh_r[j] % 2 == 0 and hr.k_r[j] == len(hr.kv_r[j]) * hr.kh_r[j]
            for h in hr.kv_r[j]:
                for p in range(hr.p0_r[j], hr.p0_r[j] + hr.kh_r[j] // 2):
                    for d in (p, p + half):
                        held.setdefault((h, d), []).append(j)
        assert sorted(held) == [(h, d) for h in range(spec.kv_heads) for d in range(spec.head_dim)]
        assert all(len(v) == 1 for v in held.values())
        if Q > spec.kv_heads:  # each block of rows holds one KV head's dims
            assert hr.segments == spec.kv_heads and set(hr.hb_r) == {spec.heads // spec.kv_heads}


def test_segment_all_reduce_routes_stay_inside_each_group():
    """Each group's root broadcasts over its own positions only, on colors the chains leave free."""
    from wse.workload.mesh import HI, LO, RAMP
    red = LineAllReduce(45, ReduceColors.from_base(0), groups=5, segments=True)
    plain = LineAllReduce(45, ReduceColors.from_base(0), groups=5).routes()
    routes = red.routes()  # (asserts no position takes a color twice)
    extra: dict[int, list] = {}
    for c, per in routes.items():
        for p, r in per.items():
            if p not in plain.get(c, {}):
                extra.setdefault(p, []).append(r)
    for a, b, r in red.bounds:
        assert sorted(extra[r]) == sorted([(RAMP, (LO,)), (RAMP, (HI,))])
        for p in range(a, b):
            if p < r:
                assert extra[p] == [(HI, (RAMP, LO) if p > a else (RAMP,))]
            elif p > r:
                assert extra[p] == [(LO, (RAMP, HI) if p < b - 1 else (RAMP,))]


def _segment_line(n: int, groups: int, calls: list[int], pipelined: bool):
    """A line of n PEs running segment all-reduces (m > 0) and whole-line ones (-m) in turn."""
    from wse.workload.mesh import X, Y, RegionProgram, tagged
    from wse.workload.region import THREADS, merge
    R = Region(0, 0, n, 1)
    b = MeshBuilder(n, 1, THREADS, kernel="segments")
    red = LineAllReduce(n, ReduceColors.from_base(0), groups=groups, segments=True, pipelined_segments=pipelined)
    for color, per in red.routes().items():
        b.line_routes(R, X, color, per)
    prog = RegionProgram(R, THREADS)
    prog.add_roles(X, [(red.segment_role(i), red.role(i)) for i in range(n)])
    prog.add_roles(Y, [0])
    t = b.tag("allreduce", -1, "allreduce")
    tmp = 64 + 2 * max(map(abs, calls))

    def ops(xr, yr, sp):
        out: dict = {}
        for m in calls:
            merge(out, red.segment_ops(xr[0][0], m, 64, tmp) if m > 0 else red.role_ops(xr[0][1], -m, 64, tmp))
        return tagged(out, t)
    prog.add(ops)
    prog.program_ids(b)
    flops = red.segment_combine_flops(lambda g: sum(m for m in calls if m > 0)) + red.combine_flops(
        -sum(m for m in calls if m < 0))
    return b.build(), flops


@pytest.mark.parametrize("n, groups, calls", [(24, 1, [1024]), (25, 1, [1024]), (45, 5, [300, 2, 300]),
                                              (16, 3, [33, 64, 2, 256]), (45, 5, [300, -300, 300, -2, 2, 300]),
                                              (13, 4, [300, -64, 256, -1])])
def test_pipelined_segment_roots_match_the_reference_and_save_cycles(n, groups, calls, small):
    """Segment all-reduces of several chunks with a pipelined root (the auto all-reduce's), in
    turn with short ones and whole-line all-reduces on the same colors: the reference stepper
    agrees counter for counter, the adds are the plain segment all-reduce's, and the line
    finishes sooner. (Found: a plain root's thread 1, free to start, took the upper side of the
    pipelined call before it, which its thread 0 takes; the pipelined root now holds thread 1
    until thread 0 has taken it, SEM_FLAT_CLEAR.)"""
    cycles = {}
    for pipelined in (False, True):
        tr, flops = _segment_line(n, groups, calls, pipelined)
        fast = run(tr, small)
        assert_same(fast, reference.simulate(tr, small), f"segments {calls} pipelined={pipelined}")
        assert fast.pe("flops").sum() == flops
        cycles[pipelined] = fast.total_cycles
    assert cycles[True] < cycles[False]


def test_long_blocks_take_the_pipelined_segment_root(small, monkeypatch):
    """A tiny layer whose blocks hold 80 scores a row (two chunks): under the auto all-reduce its
    segment all-reduces pipeline their roots — fewer cycles than auto with plain segment roots,
    the same FLOPs, the reference stepper agreeing — and the step composes exactly. (One
    sequence on a 4x8 region, and an 8x8 step, keep the reference stepper's runs short: the
    reference's cost grows with the batch and the region.)"""
    import wse.workload.collectives as collectives
    spec = load_model("tiny")
    params = DecodeParams(batch=1, context=160)  # 40 tokens a column on 4: 2 heads x 40 = 80 scores a row
    out = {}
    for pipelined in (False, True):
        monkeypatch.setattr(collectives, "SEGMENT_PIPELINED_FROM", SEGMENT_PIPELINED_FROM if pipelined else 10**9)
        plan, build, trace = _layer(spec, small, params, 4, 8, ATTN[:-1] + ("norm2", "ffn", "handoff"))
        assert plan.segments and plan.rows.hb_r[0] * max(plan.T_c) * params.batch >= SEGMENT_PIPELINED_FROM
        fast = run(trace, small)
        assert_same(fast, reference.simulate(trace, small), f"layer, pipelined={pipelined}")
        out[pipelined] = (fast.total_cycles, int(fast.pe("flops").sum()), trace.content_hash())
        assert out[pipelined][1] == sum(build.flops.values())
    assert out[True][0] < out[False][0] and out[True][1] == out[False][1] and out[True][2] != out[False][2]
    step = plan_model(spec, small, DecodeParams(batch=1, context=320), P=8)  # 40 tokens a column: 80 scores a row
    lp = layer_plan(step, 0)
    assert lp.segments and step.P == 8 and lp.rows.hb_r[0] * max(lp.T_c) * step.params.batch >= SEGMENT_PIPELINED_FROM
    composed_equals_full(step, small)


@pytest.mark.parametrize("name, P, Q, kw", [("tiny", 4, 8, dict(batch=2, context=20, attention_block=2)),
                                           ("tiny-mla", 4, 8, dict(context=20, attention_block=2))])
def test_overlapped_flash_blocks_match_the_reference_and_save_cycles(name, P, Q, kw, small):
    """Each block's score reduction on a thread of its own (T_SCORES), overlapping the previous
    block's softmax: serial and overlapped blocks both match the reference stepper counter for
    counter and execute the closed form's FLOPs, the same in both; the overlapped layer (one
    more thread, two score buffers) finishes sooner. Head by head (tiny, GQA row blocks) and
    over the heads (latent attention: the whole column reduces). Three blocks a column (2, 2, 1:
    both score buffers, one taken again, and a short last block); the attention part of a layer
    up to its hand-off (the o projection's column all-reduce follows the blocks' reductions on
    the same colors), without the FFN, which keeps the reference stepper's runs short (a whole
    overlapped layer, FFN included, against the reference: test_a_flash_layer_matches_the_reference_stepper)."""
    spec = load_model(name)
    out = {}
    for mode in ("serial", "overlapped"):
        params = DecodeParams(flash_blocks=mode, **kw)
        plan, build, trace = _layer(spec, small, params, P, Q)
        assert plan.overlap == (mode == "overlapped") and len(blocks_of(plan)) >= 3
        assert ("sc2" in plan.buf) == plan.overlap and trace.threads == THREADS + plan.overlap
        fast = run(trace, small)
        assert_same(fast, reference.simulate(trace, small), f"{name} {mode}")
        out[mode] = (fast.total_cycles, int(fast.pe("flops").sum()))
        assert out[mode][1] == sum(build.flops.values())
    assert out["overlapped"][1] == out["serial"][1]
    assert out["overlapped"][0] < out["serial"][0]


def test_auto_flash_blocks_overlap_where_the_second_score_buffer_fits():
    """--flash-blocks auto (the default) overlaps the blocks up to the longest context whose second
    score buffer fits the slot, and from the next token on keeps them serial, so the longest
    context a slot holds is the serial mapping's; on a wafer without a sixth microthread, too."""
    spec, cfg = load_model("llama3.1-8b"), hardware.load_preset("wse3")
    most = {f: largest_context(spec, 0, 127, cfg, DecodeParams(flash_blocks=f), Q=195)
            for f in ("auto", "overlapped", "serial")}
    assert most["overlapped"] < most["serial"] == most["auto"]
    for c, overlap in ((most["overlapped"], True), (most["overlapped"] + 1, False)):
        assert plan_layer(spec, 0, 127, cfg, DecodeParams(context=c), Q=195).overlap == overlap
    with pytest.raises(FitError):
        plan_layer(spec, 0, 127, cfg, DecodeParams(context=most["overlapped"] + 1, flash_blocks="overlapped"), Q=195)
    five = hardware.load_preset("small").with_overrides(["compute.microthreads=5"])  # (no sixth thread)
    assert not plan_layer(load_model("tiny"), 0, 4, five, DecodeParams(context=40), Q=8).overlap


def blocks_of(plan) -> list[int]:
    """The flash blocks of the plan's fullest column."""
    return blocks(max(plan.T_c), block_tokens(plan.params, max(plan.heads_r)))


def test_flash_scratch_does_not_grow_with_the_context():
    spec, cfg = load_model("llama3.1-8b"), hardware.load_preset("wse3")
    scratch = {}
    for ctx in (32768, 65536):  # (from a block of tokens per column on, the scratch is one block)
        for a in ("flash", "classic"):
            try:
                mem = plan_layer(spec, 0, 127, cfg, DecodeParams(context=ctx, attention=a), Q=195).mem
                scratch[a, ctx] = mem.bytes_by_kind()["scratch"]
            except FitError:
                scratch[a, ctx] = None
    assert scratch["flash", 32768] == scratch["flash", 65536] < 8192
    assert scratch["classic", 32768] is None  # the scores of the whole context no longer fit


def test_the_largest_context_is_found_exactly():
    spec, cfg = load_model("llama3.1-8b"), hardware.load_preset("wse3")
    params = DecodeParams()
    for att, P, Q in (("flash", 127, 195), ("classic", 127, 195), ("flash", 120, 160)):
        p = dataclasses.replace(params, attention=att)
        n = largest_context(spec, 0, P, cfg, p, Q)
        assert 1 < n < 131_072
        plan_layer(spec, 0, P, cfg, dataclasses.replace(p, context=n), Q=Q)
        with pytest.raises(FitError, match="bytes missing per PE"):
            plan_layer(spec, 0, P, cfg, dataclasses.replace(p, context=n + 1), Q=Q)
    assert largest_context(spec, 0, 127, cfg, params, 195) > 5 * largest_context(
        spec, 0, 127, cfg, dataclasses.replace(params, attention="classic"), 195)


def test_a_generation_reports_tpot_as_the_context_grows(tmp_path):
    """--generate N: simulated at the first, middle and last context on the wafers the last
    one needs; the mean is the trapezoid over them; the run file keeps the three figures."""
    import h5py
    from click.testing import CliRunner
    from wse.cli import cli
    out = tmp_path / "gen.h5"
    r = CliRunner().invoke(cli, ["system", "--model", "tiny", "--system", "cs3", "--set", 'system.wafer="small"',
                                 "--context", "64", "--generate", "301", "--prompt-len", "0", "-o", str(out),
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        s = {k: f["summary"][k][()] for k in ("tpot_first_s", "tpot_mean_s", "tpot_last_s", "token_latency_s")}
        packing = f["wafers"]["packing"][:]
    assert s["tpot_first_s"] == s["token_latency_s"] < s["tpot_mean_s"] < s["tpot_last_s"]
    assert 0 < packing[0] < 1
    bad = CliRunner().invoke(cli, ["system", "--model", "tiny", "--system", "cs3", "--set", 'system.wafer="small"',
                                   "--context", "131000", "--generate", "100", "-o", str(tmp_path / "x.h5")])
    assert bad.exit_code == 2 and "131,072" in bad.output and "Traceback" not in bad.output


def test_the_attention_kernel_takes_either_mapping(small):
    from wse.workload.kernels import attention
    facts = {}
    for m in ("flash", "classic"):
        trace, f = attention(8, 8, 2, 16, 64, 2, small, mapping=m, block=3 if m == "flash" else 0)
        assert int(run(trace, small).pe("flops").sum()) == f["executed_flops"]
        facts[m] = f
    assert facts["flash"]["model_flops"] == facts["classic"]["model_flops"]
    assert facts["flash"]["executed_flops"] != facts["classic"]["executed_flops"]
