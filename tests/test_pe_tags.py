"""Per-PE tag figures of a run (engine.run.tag_pe_counts, pe_regions) against a plain walk over
every PE's programs, on random traces with shared programs, untagged ops and idle PEs."""
from __future__ import annotations

import numpy as np
import pytest

from wse import isa
from wse.engine.run import pe_regions, tag_pe_counts
from wse.trace import Op, Trace, TraceBuilder


def _walk(trace: Trace) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The reference: each PE's set of tags, op by op."""
    counts = np.zeros(len(trace.tags), dtype=np.int64)
    names: list[str] = []
    label = np.zeros(trace.n_pes, dtype=np.int64)
    rows = trace.pe_program.reshape(trace.n_pes, trace.threads)
    for p in range(trace.n_pes):
        tags = {int(trace.ops["tag"][i]) for pid in rows[p] if pid >= 0
                for i in range(int(trace.prog_start[pid]), int(trace.prog_start[pid] + trace.prog_len[pid]))}
        for tg in tags:
            counts[tg] += 1
        layers = sorted(trace.tags[t].layer for t in tags if trace.tags[t].layer >= 0)
        named = sorted(trace.tags[t].name for t in tags if t != 0)
        name = f"layer {layers[0]}" if layers else (named[0] if named else "idle")
        if name not in names:
            names.append(name)
        label[p] = names.index(name)
    return counts, names, label


def _random_trace(seed: int) -> Trace:
    rng = np.random.default_rng(seed)
    W, H, T = int(rng.integers(1, 9)), int(rng.integers(1, 9)), int(rng.integers(1, 4))
    b = TraceBuilder(W, H, threads=T)
    # tags that share a name (another kind) or are named like a layer's region
    names = [f"op{int(rng.integers(0, 4))}" for _ in range(5)] + ["layer 1", "idle"]
    tags = [0] + [b.tag(str(rng.choice(names)), int(rng.integers(-1, 4)), str(rng.choice(["k", "j"])))
                  for _ in range(8)]
    programs = []
    for _ in range(int(rng.integers(1, 6))):
        n = int(rng.integers(1, 5))
        programs.append([Op(isa.OP_COMPUTE, isa.KIND_FMAC, length=int(rng.integers(1, 4)),
                            tag=int(rng.choice(tags))) for _ in range(n)])
    for y in range(H):
        for x in range(W):
            for t in range(T):
                if rng.random() < 0.6:
                    b.assign(x, y, t, programs[int(rng.integers(0, len(programs)))])
    return b.build()


@pytest.mark.parametrize("seed", range(80))
def test_tag_figures_match_a_walk_over_every_pe(seed):
    trace = _random_trace(seed)
    counts, names, label = _walk(trace)
    assert np.array_equal(tag_pe_counts(trace), counts)
    got_names, got_label = pe_regions(trace)
    assert len(set(got_names)) == len(got_names) and sorted(got_names) == sorted(names)  # (numbered in any order)
    assert [got_names[i] for i in got_label] == [names[i] for i in label]
