"""Chunked prefill: a long prompt prefilled C tokens at a time (docs/workloads.md, "Chunked prefill").

An S-token prompt prefilled whole holds S x S scores, which stops at a few thousand tokens per
region. In chunks, chunk c (C tokens) runs the layer's kernels for its own C tokens, its queries
attending every token up to its own last, (c + 1) C keys: the KV cache of the chunks before it
lies in the layer region's SRAM already (the decode cache), so the scores are C x (c + 1) C. The
projection and FFN GEMMs are the same for every full chunk and are simulated once; the kernels
whose work grows with the keys (KEY_KERNELS: the attention GEMMs and the softmax) are simulated
at `samples` chunks spread evenly from the first to the last and interpolated linearly in the
keys in between (exact at the simulated chunks; the error at a held-out chunk is measured in
docs/workloads.md). A short last chunk is simulated on its own. With the keys in blocks
(`--prefill-keys blocked`, the default) a chunk attends the chunks so far one block of keys at a
time with an online softmax (prefill_blocks.py), so every kernel is simulated at C keys at most
and nothing is interpolated (chunk_cycles_blocked).

Layer regions are separate hardware, so chunks pipeline through them: chunk c enters layer l
when layer l has finished chunk c - 1 and layer l - 1 has passed it on,
F[c][l] = max(F[c - 1][l], F[c][l - 1]) + t_l(c), and the first token comes after the last
chunk leaves the last layer and the LM head runs.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from ..errors import WseError
from .params import MAX_CONTEXT
from .prefill import KEY_KERNELS, KEYED_KERNELS

SAMPLES = 3  # [U] default chunks at which the key-dependent kernels are simulated
PREFILL_KEYS = ("blocked", "whole")  # --prefill-keys: a chunk's keys in blocks (online softmax) or all at once


@dataclasses.dataclass(frozen=True)
class Chunk:
    tokens: int  # the chunk's tokens as run (a short last chunk padded to the slot's longer side)
    keys: int  # tokens its queries attend: the prompt up to the chunk's last


def chunks(prompt: int, chunk: int, P: int, Q: int) -> list[Chunk]:
    """The prompt's chunks of `chunk` tokens on a P x Q region (every row and key column needs a
    token, so a chunk has at least max(P, Q); a shorter last one runs as that many)."""
    if chunk < max(P, Q):
        raise WseError(f"--prefill-chunk {chunk} is shorter than the {P}x{Q} slot's longer side {max(P, Q)}: "
                       "every row (and every key column) needs a token")
    if prompt > MAX_CONTEXT:
        raise WseError(f"--prompt-len {prompt} exceeds {MAX_CONTEXT:,} tokens")
    out, done = [], 0
    while done < prompt:
        n = min(chunk, prompt - done)
        done += n
        out.append(Chunk(max(n, P, Q), max(done, P, Q)))
    return out


def sample_indices(n: int, samples: int) -> list[int]:
    """`samples` chunk indices spread evenly over 0 .. n - 1, both ends included (all if n <= samples)."""
    if samples < 2:
        raise WseError(f"--prefill-samples {samples}: at least 2 (the first and the last chunk)")
    if n <= samples:
        return list(range(n))
    return sorted({round(i * (n - 1) / (samples - 1)) for i in range(samples)})


def interpolate(xs: Sequence[int], ys: Sequence[float], x: int) -> float:
    """Piecewise-linear y(x) through the points (xs increasing), exact at them."""
    for k in range(len(xs) - 1):
        if xs[k] <= x <= xs[k + 1]:
            return ys[k] + (ys[k + 1] - ys[k]) * (x - xs[k]) / (xs[k + 1] - xs[k])
    raise ValueError(f"{x} outside {xs[0]}..{xs[-1]}")


@dataclasses.dataclass(frozen=True)
class ChunkCycles:
    """One layer's cycles per chunk (kernels and the transfer to the next region), the LM head's
    cycles, and which chunks were simulated (the others interpolated)."""

    layer: list[int]
    head: int
    simulated: list[int]
    kernels: dict[int, dict[str, int]]  # simulated chunk -> its kernels' cycles


def chunk_cycles(parts: list[Chunk], run: Callable[[int, int], dict[str, int]], samples: int = SAMPLES
                 ) -> ChunkCycles:
    """Per chunk, one layer's cycles: run(tokens, keys) gives a chunk's kernel cycles (prefill's
    `kernels` dict: each kernel, the transfer and the LM head); full chunks share the key-free
    kernels and interpolate the key kernels between the sampled ones; a short last chunk runs
    on its own."""
    full = [k for k, c in enumerate(parts) if c.tokens == parts[0].tokens]
    sims = [full[i] for i in sample_indices(len(full), samples)] + [k for k in range(len(parts)) if k not in full]
    got = {k: run(parts[k].tokens, parts[k].keys) for k in sims}
    xs = [parts[k].keys for k in sims if k in full]
    layer = []
    for k, c in enumerate(parts):
        if k in got:
            kern = got[k]
        else:
            base = got[full[0]]
            kern = dict(base)
            for name in KEY_KERNELS:
                kern[name] = round(interpolate(xs, [got[j][name] for j in sims if j in full], c.keys))
        layer.append(sum(v for n, v in kern.items() if n != "lm_head"))
    return ChunkCycles(layer, got[sims[0]]["lm_head"], sims, got)


def chunk_cycles_blocked(parts: list[Chunk], run: Callable[[int, int], dict[str, int]],
                         block: Callable[[int, int], dict[str, int]]) -> ChunkCycles:
    """Per chunk, one layer's cycles with its keys in blocks of the full chunk's C tokens: chunk c
    (c chunks before it) runs the first chunk's kernels, run(t, t) for its t tokens (its own keys
    the first block, its softmax normalized over them), then for each chunk before it one block:
    block(t, C), the scores and values GEMMs over C keys and the online softmax between them
    (prefill_blocks.py). Every kernel is simulated once per chunk size; none is interpolated."""
    C = parts[0].tokens
    got: dict[int, dict[str, int]] = {}
    blk: dict[int, dict[str, int]] = {}
    sims, layer = [], []
    for c, part in enumerate(parts):
        t = part.tokens
        if t not in got:
            got[t] = run(t, t)
            sims.append(c)
        if c and t not in blk:
            blk[t] = block(t, C)
        layer.append(sum(v for n, v in got[t].items() if n != "lm_head") + c * sum(blk.get(t, {}).values()))
    kernels = {c: dict(got[parts[c].tokens], **{f"block {n}": v for n, v in blk.get(parts[c].tokens, {}).items()})
               for c in sims}
    return ChunkCycles(layer, got[C]["lm_head"], sims, kernels)


class SharedKernels:
    """Wraps a `kernels` maker (tokens, keys) -> prefill `kernels` function so the kernels that do
    not depend on the keys run once per chunk size, whatever the keys (in-process runs have no
    stage cache to share them)."""

    def __init__(self, make: Callable[[int, int], Callable]):
        self.make = make
        self.memo: dict[tuple[int, str], tuple] = {}

    def __call__(self, tokens: int, keys: int) -> Callable:
        inner = self.make(tokens, keys)

        def kernels(names: list[str]):
            todo = [n for n in names if n in KEYED_KERNELS or (tokens, n) not in self.memo]
            got = {item[0]: item for item in inner(todo)} if todo else {}
            for n, item in got.items():
                if n not in KEYED_KERNELS:
                    self.memo[(tokens, n)] = item
            for n in names:
                yield got[n] if n in KEYED_KERNELS else self.memo[(tokens, n)]
        return kernels


def pipeline(stages: Sequence[Sequence[int]]) -> int:
    """When the last chunk leaves the last stage: stages[s][c] cycles of chunk c in stage s, each
    stage taking the chunks in order, F[c][s] = max(F[c - 1][s], F[c][s - 1]) + stages[s][c]."""
    if not stages:
        return 0
    n = len(stages[0])
    prev = [0] * len(stages)  # F[c - 1][s]
    for c in range(n):
        t = 0
        for s, st in enumerate(stages):
            t = max(t, prev[s]) + st[c]
            prev[s] = t
    return prev[-1]
