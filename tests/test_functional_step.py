"""Functional runs of a whole decode step and of a wafer's share of one: the greedy token id,
a batch gathered from several embedding columns, models split over wafers (whole layers, or cut
at routed experts), shared experts at their own precision, models outside the zoo."""
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from test_functional_layer import _run
from wse import hardware, isa
from wse.cli import cli
from wse.engine.run import simulate
from wse.errors import WseError
from wse.results import functional as RF
from wse.trace_check import validate


def test_a_model_outside_the_zoo_is_checked_from_its_file(tmp_path):
    """(Found: the references loaded the model by its name, so `wse check --model my.toml` failed
    with 'unknown model' once the run was done; traces now record the file: meta model_file.)"""
    text = (Path(__file__).parents[1] / "traces" / "models" / "tiny.toml").read_text()
    path = tmp_path / "mine.toml"
    path.write_text(text.replace('name = "tiny"', 'name = "not-in-the-zoo"'))
    for extra in ([], ["--full"]):
        r = CliRunner().invoke(cli, ["check", "--model", str(path), "--wafer", "small", "--context", "64"] + extra)
        assert r.exit_code == 0 and "WRONG" not in r.output, r.output


def test_shared_experts_at_another_precision_than_the_routed_ones_compute(tmp_path):
    """Expert regions hold the routed experts at int4, the layer region its shared expert at
    bf16: the shared expert's weights are tensors of their own (shared.w_gate, ...), the routed
    experts' [experts, ...] int4 codes with their scales."""
    from wse.workload.jobs import _model_plan
    from wse.workload.step_tensors import step_trace
    text = (Path(__file__).parents[1] / "traces" / "models" / "tiny-moe.toml").read_text()
    text = text.replace('name = "tiny-moe"', 'name = "int4-experts"').replace(
        'weight_dtypes = ["bf16", "fp8", "int8", "int4"]', "") + 'expert_weight_dtype = "int4"\n'
    path = tmp_path / "int4-experts.toml"
    path.write_text(text)
    cfg = hardware.load_preset("small")
    tr = step_trace(_model_plan(str(path), cfg, "decode", context=64, batch=2, moe_mapping="regions",
                                experts_per_region=1))
    t = {x.name: x for x in tr.tensors.tensors}
    assert t["layer1.shared.w_gate"].dtype == isa.DTYPE_FP16 and t["layer1.shared.w_gate"].shape[0] == 1
    assert t["layer1.w_gate"].dtype == isa.DTYPE_INT4 and t["layer1.w_gate"].shape[0] == 4
    rows, res = _run(tr, cfg)
    assert all(r.ok and r.copies_disagree == 0 for r in rows) and not res.raced, rows


@pytest.mark.parametrize("before", [1, 2])
def test_a_batch_whose_tokens_span_embedding_columns_is_gathered_into_the_lane_column(before):
    """Sequence b looks up token + b; with the batch's rows in two table columns the western one
    hands its rows east to the last, which sends the lanes (`before`: rows in the first column)."""
    from wse.workload.jobs import _model_plan
    from wse.workload.mesh import split
    from wse.workload.step_tensors import step_trace
    from wse.workload.tables import token_columns
    cfg = hardware.load_preset("small").with_overrides(
        ["sram.sram_bytes=1048576", "wafer.mesh_width=16", "wafer.mesh_height=16"])
    width = next(s.region.width for s in _model_plan("tiny", cfg, "decode", context=16).slots
                 if s.kind == "embedding")
    token = split(1024, width)[0] - before
    plan = _model_plan("tiny", cfg, "decode", context=16, batch=3, moe_mapping="local", token=token)
    assert [c for c, _, _ in token_columns(plan.spec, width, token, 3)] == [0, 1] and plan.token_col == 1
    tr = step_trace(plan)
    rows, res = _run(tr, cfg)
    assert all(r.ok and r.copies_disagree == 0 for r in rows) and not res.raced, rows
    from wse.workload.tables import GATHER
    assert ((tr.ops["opcode"] == isa.OP_RECV) & (tr.ops["color_in"] == GATHER[0])).any()  # (the gather ran)


def test_token_columns_cut_the_batch_by_the_columns_vocab_slices():
    from wse.workload.models import load_model
    from wse.workload.tables import token_columns
    spec = load_model("tiny")  # 1,024 tokens over 8 columns: 128 each
    assert token_columns(spec, 8, 126, 300) == [(0, 0, 2), (1, 2, 130), (2, 130, 258), (3, 258, 300)]
    assert token_columns(spec, 8, 5, 3) == [(0, 0, 3)]
    with pytest.raises(WseError, match="--token 1022 with --batch 3"):
        token_columns(spec, 8, 1022, 3)


@pytest.mark.parametrize("name, kw", [("tiny", {}), pytest.param("tiny-moe", dict(moe_mapping="local"),
                                                                  marks=pytest.mark.slow)])
def test_each_wafers_share_of_a_split_model_computes_its_layers(name, kw):
    """`wse check --full --wafers 2`: wafer 0 (embedding, layer 0) ends with its last layer's
    output in place; wafer 1 takes that layer's h as input and ends with the LM head."""
    from wse.workload.jobs import step_check_traces
    cfg = hardware.load_preset("small")
    shares = step_check_traces(name, cfg, 2, context=64, batch=2, **kw)
    assert len(shares) == 2
    for k, (where, tr) in enumerate(shares):
        rows, res = _run(tr, cfg)
        names = {r.name for r in rows}
        assert all(r.ok and r.copies_disagree == 0 for r in rows) and not res.raced, (where, rows)
        assert ("logits" in names) == (k == 1) and f"layer{k}.out" in names
        assert any(t.name == f"layer{k}.h" and t.role == "input" for t in tr.tensors.tensors) == (k == 1)


@pytest.mark.parametrize("wafers", [3, pytest.param(4, marks=pytest.mark.slow)])  # (3: a lead, a trail, both)
def test_shares_cut_at_routed_experts_compute_across_the_wafer_boundary(wafers):
    """Cut at routed experts (as `wse system` cuts MoE models with expert regions): a share ending
    inside a layer's experts hands on the combine so far (`combine_out`); one beginning there
    takes the dispatch and that combine from a stand-in for the layer region before, and its
    collector's output is checked. A stand-in sending the FFN input where the combine belongs
    is caught."""
    from wse.workload.jobs import step_check_traces
    from wse.workload.plan import COMBINE
    from wse.workload.stages import standin_buffers
    cfg = hardware.load_preset("small")
    shares = step_check_traces("tiny-moe", cfg, wafers, context=64, batch=2, moe_mapping="regions",
                               experts_per_region=1)

    def wide(tr):  # (the stand-in lies a slot west of the wafer, as `wse check` runs it)
        return cfg.with_overrides([f"wafer.mesh_width={max(tr.mesh_width, 64)}"])
    names = set()
    for where, tr in shares:
        rows, res = _run(tr, wide(tr))
        names |= {r.name for r in rows}
        assert all(r.ok and r.copies_disagree == 0 for r in rows) and not res.raced, (where, rows)
    assert any(n.endswith(".combine_out") for n in names) and {"layer0.out", "layer1.out"} <= names
    where, tr = next((w, t) for w, t in shares if "lead_layer" in t.meta)
    o, buf = tr.ops, standin_buffers(_plan_of(tr, cfg))
    comb = np.flatnonzero((o["opcode"] == isa.OP_SEND) & (o["color_out"] == COMBINE[0]) & (o["src0"] == buf["h"]))
    assert len(comb)
    o["src0"][comb] = buf["xn"]
    rows = {r.name: r for r in _run(tr, wide(tr))[0]}
    assert not rows[f"layer{tr.meta['lead_layer']}.out"].ok


def _plan_of(tr, cfg):
    """A stand-in's buffers depend only on the model, its slot width and the batch."""
    from wse.workload.jobs import _model_plan
    import dataclasses
    plan = _model_plan("tiny-moe", cfg, "decode", context=64, batch=int(tr.meta["batch"]))
    return dataclasses.replace(plan, P=int(tr.meta["P"]))


def test_the_greedy_token_takes_the_first_of_tied_logits_and_a_wrong_one_is_caught():
    """Every logit tied (zero LM-head weights): the token is id 0, found in the first column and
    kept over every later column's by the row's MAX of -ids. The check takes an index by the
    score it picks: one below the best by a third of the largest score is that error; an index
    outside the scores is inf."""
    from wse.workload.jobs import _model_plan
    from wse.workload.step_tensors import step_trace
    cfg = hardware.load_preset("small").with_overrides(
        ["sram.sram_bytes=1048576", "wafer.mesh_width=16", "wafer.mesh_height=16"])
    tr = step_trace(_model_plan("tiny", cfg, "decode", context=16, batch=2, moe_mapping="local"))
    validate(tr, cfg)
    fn = RF.FunctionalRun(seed=1)
    kw = fn.prepare(tr, "test")
    fn.inputs["lm_head"][:] = 0.0
    kw["sram"] = RF.fill(tr, fn.inputs, kw["sram"].shape[1])
    res = simulate(tr, cfg, **kw)
    rows = {r.name: r for r in fn.finish(tr, res)[0]}
    out = {o.name: o.values for o in RF.read_outputs(tr, res.sram)}
    assert rows["token"].ok and np.array_equal(out["token"], [0, 0])
    picked = out["token"] + 1
    scores = np.tile(np.arange(4.0), (2, 1))
    assert RF.check([RF.Output("token", picked, 0)], {"token@scores": scores})[0].error == pytest.approx(2 / 3)
    assert RF.check([RF.Output("token", picked + 9, 0)], {"token@scores": scores})[0].error == float("inf")


def test_check_model_full_wafers_checks_every_share():
    r = CliRunner().invoke(cli, ["check", "--model", "tiny-moe", "--full", "--wafers", "3", "--moe-mapping", "regions",
                                 "--experts-per-region", "1", "--wafer", "small", "--context", "64"])
    assert r.exit_code == 0 and r.output.count("wafer ") == 3 and "combine_out" in r.output, r.output
    # the shares `wse system` would simulate on these wafers (wafers.plans_on)
    import re
    from wse.system.wafers import plans_on
    from wse.workload.models import load_model
    from wse.workload.params import DecodeParams
    params = DecodeParams(context=64, moe_mapping="regions", experts_per_region=1)
    plans = plans_on(load_model("tiny-moe"), hardware.load_preset("small"), params, 3, True)
    shown = [tuple(int(v) for v in m) for m in re.findall(r"units (\d+)\.\.(\d+)", r.output)]
    assert shown == [(a, b - 1) for a, b in (p.units for p in plans)]
