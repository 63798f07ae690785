"""Time to first token on a wafer system (docs/system.md, "TTFT"): each wafer's layer regions
prefill the prompt with simulated kernels (workload/prefill.py), whole or in chunks pipelined
through the layers (workload/chunked.py), then the LM head; the activations cross each link."""
from __future__ import annotations

from typing import Callable

from ..trace import Trace
from ..workload.decode import ELEM, ModelPlan
from ..workload.models import ModelSpec
from ..workload.precision import weights_of
from .config import SystemConfig
from .link import Link
from .pool import Fanout


def check_chunks(plans: list[ModelPlan], prompt: int, chunk: int) -> None:
    """The prompt's chunks run on every wafer's slots (chunked.chunks' error if a chunk is shorter
    than a slot's longer side): checked on the plans before the decode step is simulated, so a
    bad --prefill-chunk costs no simulation."""
    if chunk and chunk < prompt:
        from ..workload.chunked import chunks
        for plan in plans:
            chunks(prompt, chunk, plan.P, plan.Q)


def prefill_seconds(spec: ModelSpec, system: SystemConfig, plans: list[ModelPlan], prompt: int,
                    simulate: Callable[[Trace], object], fanout: Fanout | None = None, prefix: int = 0,
                    chunk: int = 0, samples: int = 3, key_mode: str = "blocked") -> float:
    """Time to first token: each wafer's layers prefill on its own P x Q slots (simulated kernels,
    workload/prefill.py; from the cache or on the fanout's workers), then the LM head; the prompt's
    activations (prompt x hidden x 2 bytes) cross each link. A prompt shorter than a slot's longer
    side is prefilled as one of that length (every row and key column holds a token). prefix > 0: GEMM kernels from their
    first prefix / 2 and prefix steps (pool.prefill_kernels). chunk > 0 (and below the prompt):
    prefilled in chunks of that many tokens pipelined through the layers (prefill_chunked), a chunk's
    keys in blocks with an online softmax (key_mode "blocked") or all at once ("whole")."""
    if chunk and chunk < prompt:
        return prefill_chunked(spec, system, plans, prompt, simulate, fanout, prefix, chunk, samples, key_mode)
    from ..workload.prefill import prefill
    from .pool import prefill_kernels
    cfg = system.wafer_config
    precisions = weights_of(spec, plans[0].params.weights)
    layer_cycles: dict[tuple[int, int], int] = {}
    head_cycles = 0
    head = plans[-1].slots[-1].region  # (the LM head's, on the last wafer, for every shape's kernels)
    lm_width, lm_rows = head.width, head.height
    for i, plan in enumerate(plans):
        last = i == len(plans) - 1
        shape = (plan.P, plan.Q)
        if shape not in layer_cycles or last:
            S = max(prompt, plan.P, plan.Q)  # a shorter prompt still occupies every row (and key column)
            kernels = prefill_kernels(spec, cfg, plan.P, S, lm_width, simulate,
                                      f"{spec.name} prefill on {plan.P}x{plan.Q}", fanout, prefix=prefix, Q=plan.Q,
                                      lm_rows=lm_rows, precisions=precisions)
            pr = prefill(spec, cfg, plan.P, S, lm_width, 1, simulate, kernels=kernels, Q=plan.Q, lm_rows=lm_rows)
            layer_cycles[shape] = pr.layer_cycles
            if last:
                head_cycles = pr.ttft_cycles - pr.layer_cycles
    cycles = sum(sum(s.kind == "layer" for s in plan.slots) * layer_cycles[(plan.P, plan.Q)] for plan in plans) \
        + head_cycles
    link = Link(system.link_bytes_per_s, system.link_latency_s)
    return cycles / cfg.clock_hz + (len(plans) - 1) * link.seconds(prompt * spec.hidden_size * ELEM)


def prefill_chunked(spec: ModelSpec, system: SystemConfig, plans: list[ModelPlan], prompt: int,
                    simulate: Callable[[Trace], object], fanout: Fanout | None, prefix: int, chunk: int,
                    samples: int, key_mode: str = "blocked") -> float:
    """Time to first token of a prompt prefilled in chunks (workload/chunked.py): per slot shape,
    each chunk's layer cycles (key_mode "blocked": the first chunk's kernels and one key block's per
    chunk before it, chunk_cycles_blocked; "whole": the key kernels simulated at `samples` chunks,
    interpolated between, chunk_cycles);
    every layer region and every link between wafers is a pipeline stage the chunks pass in turn
    (a link's stage: its latency plus the chunk's activations at its bandwidth); then the LM head."""
    from ..errors import WseError
    from ..workload.chunked import PREFILL_KEYS, SharedKernels, chunk_cycles, chunk_cycles_blocked, chunks, pipeline
    from ..workload.prefill import block_cycles, prefill
    if key_mode not in PREFILL_KEYS:
        raise WseError(f"--prefill-keys {key_mode!r} is not one of {', '.join(PREFILL_KEYS)}")
    from .pool import prefill_kernels
    cfg = system.wafer_config
    precisions = weights_of(spec, plans[0].params.weights)
    head = plans[-1].slots[-1].region
    lm_width, lm_rows = head.width, head.height
    link = Link(system.link_bytes_per_s, system.link_latency_s)
    per_shape: dict[tuple[int, int], list[int]] = {}
    stages: list[list[int]] = []
    head_cycles = 0
    for i, plan in enumerate(plans):
        shape = (plan.P, plan.Q)
        parts = chunks(prompt, chunk, plan.P, plan.Q)
        if shape not in per_shape:  # (every shape's LM head kernel is the last wafer's head region's)
            shared = SharedKernels(lambda tokens, keys, plan=plan: prefill_kernels(
                spec, cfg, plan.P, tokens, lm_width, simulate, f"{spec.name} prefill on {plan.P}x{plan.Q}", fanout,
                prefix=prefix, Q=plan.Q, lm_rows=lm_rows, keys=keys, precisions=precisions))

            def run(tokens: int, keys: int, plan=plan, shared=shared) -> dict[str, int]:
                return prefill(spec, cfg, plan.P, tokens, lm_width, 1, simulate, kernels=shared(tokens, keys),
                               Q=plan.Q, lm_rows=lm_rows, keys=keys).kernels

            def block(tokens: int, keys: int, shared=shared) -> dict[str, int]:
                return block_cycles(shared(tokens, keys))
            cc = chunk_cycles_blocked(parts, run, block) if key_mode == "blocked" else \
                chunk_cycles(parts, run, samples)
            per_shape[shape], head_cycles = cc.layer, cc.head
        if i:
            stages.append([round(link.seconds(c.tokens * spec.hidden_size * ELEM) * cfg.clock_hz) for c in parts])
        stages += [per_shape[shape]] * sum(s.kind == "layer" for s in plan.slots)
    return (pipeline(stages) + head_cycles) / cfg.clock_hz
