"""Chunked prefill (workload/chunked.py): the chunks, the sampled and interpolated key kernels,
the pipeline through the layers, and the kernels of a chunk attending more keys than it holds."""
import pytest
from click.testing import CliRunner

from wse.cli import cli
from wse.errors import WseError
from wse.hardware import load_preset
from wse.workload import prefill as pf
from wse.workload.chunked import (Chunk, SharedKernels, chunk_cycles, chunk_cycles_blocked, chunks, interpolate,
                                  pipeline, sample_indices)
from wse.workload.models import load_model


def test_chunks_cover_the_prompt_and_attend_every_token_before_their_end():
    assert chunks(256, 64, 32, 64) == [Chunk(64, 64), Chunk(64, 128), Chunk(64, 192), Chunk(64, 256)]
    # a short last chunk runs as the slot's longer side, attending the prompt's real keys
    assert chunks(200, 64, 32, 64)[-1] == Chunk(64, 200)
    assert chunks(100, 128, 32, 64) == [Chunk(100, 100)]
    with pytest.raises(WseError, match="--prefill-chunk 32 is shorter than the 32x64 slot's longer side 64"):
        chunks(256, 32, 32, 64)
    with pytest.raises(WseError, match="exceeds 131,072"):
        chunks(131_073, 4096, 32, 64)


def test_samples_include_both_ends_and_interpolation_is_exact_at_them():
    assert sample_indices(4, 3) == [0, 2, 3] and sample_indices(3, 3) == [0, 1, 2] and sample_indices(64, 2) == [0, 63]
    assert sample_indices(9, 3) == [0, 4, 8]
    with pytest.raises(WseError, match="at least 2"):
        sample_indices(5, 1)
    xs, ys = [64, 320, 512], [100.0, 300.0, 340.0]
    assert [interpolate(xs, ys, x) for x in xs] == ys
    assert interpolate(xs, ys, 192) == 200.0 and interpolate(xs, ys, 416) == 320.0
    with pytest.raises(ValueError):
        interpolate(xs, ys, 600)


def test_the_pipeline_of_chunks_through_layers():
    assert pipeline([[5] * 16] * 4) == (16 + 4 - 1) * 5  # 16 chunks through 4 equal stages: 19 chunk times
    assert pipeline([[7, 9, 11]]) == 27  # one stage: the chunks one after another
    # growing chunks: every chunk through the first stage, then the last chunk down the rest
    t = [3, 5, 8]
    assert pipeline([t, t, t]) == sum(t) + 2 * t[-1]
    # a slow middle stage (a link) bounds the rate
    assert pipeline([[1, 1, 1], [10, 10, 10], [1, 1, 1]]) == 1 + 30 + 1
    # the recurrence against every path's sum: F = max over monotone paths of the cycles on them
    import itertools
    st = [[2, 7, 1], [4, 1, 6], [3, 3, 2]]

    def paths(c, s):
        if c == 0 and s == 0:
            yield st[0][0]
            return
        if c:
            yield from (v + st[s][c] for v in paths(c - 1, s))
        if s:
            yield from (v + st[s][c] for v in paths(c, s - 1))
    assert pipeline(st) == max(paths(2, 2))
    assert pipeline([]) == 0 and list(itertools.islice(paths(0, 0), 1)) == [2]


def test_key_kernels_are_simulated_at_the_samples_and_interpolated_between():
    calls = []

    def run(tokens, keys):  # linear in the keys: interpolation is exact
        calls.append((tokens, keys))
        return {"qkv": 100, "scores": 2 * keys + 7, "values": 3 * keys, "elementwise": keys + 50 * tokens,
                "o": 40, "transfer": 9, "lm_head": 1234}
    parts = chunks(512, 64, 32, 64)
    cc = chunk_cycles(parts, run, 3)
    assert calls == [(64, 64), (64, 320), (64, 512)] and cc.simulated == [0, 4, 7] and cc.head == 1234
    assert cc.layer == [100 + 6 * c.keys + 7 + 50 * 64 + 40 + 9 for c in parts]
    # a short last chunk is simulated on its own
    calls.clear()
    parts = chunks(300, 128, 32, 64)  # 128, 128, 44 (run as 64)
    cc = chunk_cycles(parts, run, 2)
    assert calls == [(128, 128), (128, 256), (64, 300)] and len(cc.layer) == 3


def test_blocked_keys_run_the_first_chunks_kernels_and_one_block_per_chunk_before():
    calls = []

    def run(tokens, keys):
        calls.append(("run", tokens, keys))
        return {"qkv": 100, "scores": 2 * keys, "values": 3 * keys, "elementwise": keys + 50 * tokens, "o": 40,
                "transfer": 9, "lm_head": 1234}

    def block(tokens, keys):
        calls.append(("block", tokens, keys))
        return {"scores": 2 * keys + tokens, "values": 3 * keys, "softmax_block": 11 + keys}
    parts = chunks(300, 128, 32, 64)  # 128, 128, 44 (run as 64), attending 128, 256, 300 keys
    cc = chunk_cycles_blocked(parts, run, block)
    assert calls == [("run", 128, 128), ("block", 128, 128), ("run", 64, 64), ("block", 64, 128)]
    first = 100 + 5 * 128 + 128 + 50 * 128 + 40 + 9
    short = 100 + 5 * 64 + 64 + 50 * 64 + 40 + 9
    assert cc.layer == [first, first + (5 * 128 + 128 + 11 + 128), short + 2 * (5 * 128 + 64 + 11 + 128)]
    assert cc.simulated == [0, 2] and cc.head == 1234 and cc.kernels[2]["block softmax_block"] == 139
    # no chunk before: the first chunk's kernels alone, nothing else simulated
    calls.clear()
    assert chunk_cycles_blocked(chunks(100, 128, 32, 64), run, block).layer == [100 + 5 * 100 + 100 + 5000 + 49]
    assert calls == [("run", 100, 100)]


@pytest.mark.parametrize("name, P, Q, S, keys", [("tiny", 4, 8, 16, 16), ("tiny", 3, 5, 13, 29),
                                                 ("tiny-mla", 5, 7, 20, 20)])
def test_the_softmax_block_folds_a_key_block_into_the_running_softmax(name, P, Q, S, keys):
    """Values against the numpy reference (the running sums positive, as they are), FLOPs in
    closed form: uneven token rows, key columns and output columns (heads cut across columns)."""
    import numpy as np
    from wse.engine.functional import sram_extent
    from wse.engine.run import simulate
    from wse.results import functional as RF
    from wse.trace_check import validate
    from wse.workload.prefill_blocks import softmax_block
    cfg = load_preset("small")
    tr, facts = softmax_block(load_model(name), P, S, cfg, Q=Q, keys=keys, record=True)
    validate(tr, cfg)
    fn = RF.FunctionalRun(seed=1)
    x = RF.random_inputs(tr, 1)
    x["l"] = np.abs(x["l"]) + 0.5
    fn.inputs = x
    res = simulate(tr, cfg, functional=True, sram=RF.fill(tr, x, sram_extent(tr)))
    rows, _, _ = fn.finish(tr, res)
    assert {r.name for r in rows} == {"probs", "m_new", "l_new", "o_new"} and not res.raced
    assert all(r.error < 0.01 and r.copies_disagree == 0 for r in rows), rows
    assert int(res.pe("flops").sum()) == facts["executed_flops"]
    assert pf.kernel_trace(load_model(name), cfg, P, S, "softmax_block", Q=Q, keys=keys)[1] == facts


def test_shared_kernels_run_the_key_free_kernels_once_per_chunk_size():
    asked = []

    def make(tokens, keys):
        def kernels(names):
            asked.append((tokens, keys, tuple(names)))
            for n in names:
                yield n, (tokens, keys if n in pf.KEY_KERNELS else None), {}, None
        return kernels
    shared = SharedKernels(make)
    names = ["qkv", "scores", "values", "o", "elementwise", "lm_head"]
    first = list(shared(64, 64)(names))
    second = list(shared(64, 128)(names))
    assert asked[1] == (64, 128, ("scores", "values", "elementwise"))
    assert [r[0] for r in second] == names and second[0] == first[0] and second[1][1] == (64, 128)


def test_a_chunks_attention_kernels_span_its_keys():
    spec, cfg = load_model("tiny"), load_preset("wse3")
    q, o = spec.q_size, spec.attn_out_size
    for name, flops in (("scores", 2 * 64 * q * 192), ("values", 2 * 64 * 192 * o)):
        _, facts = pf.kernel_trace(spec, cfg, 16, 64, name, Q=16, keys=192)
        assert facts["model_flops"] == flops
    whole = pf.kernel_trace(spec, cfg, 16, 64, "elementwise", Q=16)[1]
    chunk = pf.kernel_trace(spec, cfg, 16, 64, "elementwise", Q=16, keys=192)[1]
    from wse.workload.region import EXP_FLOPS
    per_score = 1 + 1 + EXP_FLOPS + 1 + 1  # scale, max, exp, sum, divide
    assert chunk["model_flops"] - whole["model_flops"] == per_score * 64 * 128 * spec.heads
    # the key-free kernels do not change; keys below the chunk's own tokens are an error
    assert pf.kernel_trace(spec, cfg, 16, 64, "o", Q=16, keys=192)[1] == pf.kernel_trace(spec, cfg, 16, 64, "o", Q=16)[1]
    with pytest.raises(WseError, match=r"--prefill-chunk 64 at 131,072 keys: the prefill scores kernel does not fit"):
        pf.kernel_trace(spec, cfg, 16, 64, "scores", Q=16, keys=131_072)
    with pytest.raises(WseError, match="prefill keys 32"):
        pf.kernel_trace(spec, cfg, 16, 64, "scores", Q=16, keys=32)


def test_chunked_ttft_is_the_pipeline_of_each_chunks_simulated_layer():
    """End to end on tiny over two wafers of different slot sizes (one layer each): with every
    chunk sampled, the system's TTFT is the pipeline of the chunks' layer cycles (each from its
    own kernels on its wafer's slot), the link between the wafers and the LM head. (Slots of 6x6
    and 7x7 with 7-token chunks keep the simulated kernels small.)"""
    from wse.engine.run import simulate
    from wse.system.config import load_system
    from wse.system.link import Link
    from wse.system.ttft import prefill_chunked, prefill_seconds
    from wse.system.wafers import wafer_plans
    from wse.workload.params import DecodeParams
    system = load_system("cs3", ['system.wafer="small"', "system.wafers=2", "wafer.mesh_width=12",
                                 "wafer.mesh_height=14"])
    cfg = system.wafer_config
    spec = load_model("tiny")
    plans = wafer_plans(spec, system, DecodeParams(batch=1, context=64, slot_shape="square"), 2)
    assert [(p.P, p.Q) for p in plans] == [(6, 6), (7, 7)]
    memo = {}

    def sim(t):  # each distinct kernel once: the check below runs the same kernels again
        key = t.content_hash()
        if key not in memo:
            memo[key] = simulate(t, cfg, validated=True)
        return memo[key]
    ttft = prefill_seconds(spec, system, plans, 21, sim, chunk=7, samples=3, key_mode="whole")
    n_sims = len(memo)
    head = plans[-1].slots[-1].region
    layer = {}
    for plan in plans:
        layer[plan.P] = []
        for c in chunks(21, 7, plan.P, plan.Q):
            pr = pf.prefill(spec, cfg, plan.P, c.tokens, head.width, 1, sim, Q=plan.Q, lm_rows=head.height,
                            keys=c.keys)
            layer[plan.P].append(pr.layer_cycles)
    link = Link(system.link_bytes_per_s, system.link_latency_s)
    hop = round(link.seconds(7 * spec.hidden_size * 2) * cfg.clock_hz)
    expect = pipeline([layer[6], [hop] * 3, layer[7]]) + pr.kernels["lm_head"]
    assert ttft * cfg.clock_hz == pytest.approx(expect, abs=1e-6)
    assert layer[7][0] < layer[7][1] < layer[7][2]  # the attention kernels grow with the keys
    assert len(memo) == n_sims  # the chunked run simulated every kernel the check needs, each once
    # one chunk of the whole prompt is the unchunked prefill (the link to the cycle); a one-chunk prompt,
    # so both run the first chunk's kernels, simulated above
    one = prefill_chunked(spec, system, plans, 7, sim, None, 0, 7, 3, "whole")
    assert one * cfg.clock_hz == pytest.approx(prefill_seconds(spec, system, plans, 7, sim) * cfg.clock_hz, abs=1)
    assert len(memo) == n_sims
    # the keys in blocks: each chunk is the first chunk's layer plus one key block per chunk before it, with a
    # short last chunk of its own (24 = 7 + 7 + 7 + 3, run as 6 tokens on the 6x6 slot, as 7 on the 7x7);
    # one chunk of the whole prompt is again the unchunked
    blocked = prefill_seconds(spec, system, plans, 24, sim, chunk=7)
    n_sims = len(memo)
    stages = []
    for plan in plans:
        parts = chunks(24, 7, plan.P, plan.Q)
        assert [c.tokens for c in parts] == [7, 7, 7, max(plan.P, 3)]
        rows, per_size = [], {}  # (the kernels depend on the chunk's tokens alone: each size's built once)
        for c, part in enumerate(parts):
            if part.tokens not in per_size:
                kw = dict(Q=plan.Q, lm_rows=head.height)
                base = pf.prefill(spec, cfg, plan.P, part.tokens, head.width, 1, sim, **kw)
                blk = {n: sim(pf.kernel_trace(spec, cfg, plan.P, part.tokens, n, "meshgemm", Q=plan.Q,
                                              keys=7 if part.tokens != 7 else None)[0]).total_cycles
                       for n in pf.BLOCK_KERNELS}
                per_size[part.tokens] = base, blk
            base, blk = per_size[part.tokens]
            rows.append(base.layer_cycles + c * sum(blk.values()))
        stages += [[round(link.seconds(c.tokens * spec.hidden_size * 2) * cfg.clock_hz) for c in parts]] if stages \
            else []
        stages.append(rows)
    assert blocked * cfg.clock_hz == pytest.approx(pipeline(stages) + base.kernels["lm_head"], abs=1e-6)
    assert len(memo) == n_sims  # the run simulated every kernel the check needs
    assert prefill_chunked(spec, system, plans, 7, sim, None, 0, 7, 3) * cfg.clock_hz == \
        pytest.approx(prefill_seconds(spec, system, plans, 7, sim) * cfg.clock_hz, abs=1)


def test_a_chunk_the_slots_cannot_take_fails_before_anything_is_simulated():
    """(A DeepSeek-V3 run simulated its whole decode step, ~2 hours on the VM, before --prefill-chunk
    64 was found shorter than its 127x130 slots.)"""
    from wse.system.compare import run_system
    from wse.system.config import load_system

    def never(trace):
        raise AssertionError("simulated before the chunk was checked")
    system = load_system("cs3", ['system.wafer="small"'])
    with pytest.raises(WseError, match="--prefill-chunk 8 is shorter than the"):
        run_system("tiny", system, never, prompt=64, prefill_chunk=8)


@pytest.mark.parametrize("args, message", [
    (["--prefill-chunk", "-1"], "--prefill-chunk -1 must be at least 0"),
    (["--prefill-samples", "1"], "--prefill-samples 1: at least 2"),
    (["--prefill-keys", "some"], "'some' is not one of 'blocked', 'whole'"),
    (["--prompt-len", "200000"], "--prompt-len 200000 exceeds 131,072 tokens"),
])
def test_bad_chunk_options_are_one_error_line(args, message):
    r = CliRunner().invoke(cli, ["system", "--model", "tiny", "--system", "cs3", "--set", 'system.wafer="small"',
                                 "-o", "/tmp/never.h5"] + args)
    assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, r.output
