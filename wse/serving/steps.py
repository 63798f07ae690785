"""Step times for the serving simulation (docs/serving.md, "Step times").

Wafer system: the decode pass of a micro-batch is simulated cycle by cycle (system/wafers.py
run_decode) at sampled (batch, context) points on one layout, the one planned for the largest
micro-batch at the longest context; each point gives every pipeline stage's hold time in chain
order. Between points the hold times are interpolated (bilinear in batch and context); points
simulated but left out of the fit measure the interpolation error. Prefill: each distinct slot
size's prefill kernels are simulated at sampled prompt lengths (workload/prefill.py) and fitted
per kernel class, a + b S for the kernels linear in the prompt and a + b S^2 for the two
attention GEMMs (exact at the fitted points; with one point, the scaling alone).

GPU nodes: the analytic node model (system/gpu.py) for a decode iteration of n sequences and a
prefill iteration of a set of prompts.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Callable

import numpy as np

from ..errors import WseError
from ..system import gpu as G
from ..system.config import SystemConfig
from ..system.link import Link
from ..system.pool import Fanout
from ..system.wafers import SystemDecode, run_decode
from ..trace import Trace
from ..workload.decode import ELEM, ModelPlan
from ..workload.models import ModelSpec
from ..workload.params import DecodeParams

QUADRATIC = ("scores", "values")  # prefill kernels whose work grows with the prompt squared


@dataclasses.dataclass
class DecodePoint:
    """One simulated decode pass: a micro-batch of `batch` sequences at `context` tokens."""

    batch: int
    context: int
    holds: np.ndarray  # seconds each pipeline stage holds the micro-batch, chain order
    latency_s: float  # one pass through every stage and link
    activity: np.ndarray  # the pass's FLOPs, SRAM bytes, wavelet-hops and link bytes (metrics.ACTIVITY)
    fitted: bool  # used for the interpolation (else a check of it)
    predicted_s: float = math.nan  # the interpolation's latency here (checks only)

    @property
    def delay(self) -> float:
        """Latency not spent holding a stage (transfer latencies of the links)."""
        return self.latency_s - float(self.holds.sum())


def chain_stages(d: SystemDecode) -> tuple[np.ndarray, list[str]]:
    """The pipeline stages of a decode pass in chain order: every region of every wafer (its hold
    time) and between wafers the link (the busiest port the transfers between them use)."""
    holds, labels = [], []
    for s in d.steps:
        holds += [c / d.clock_hz for c in s.region_cycles]
        labels += [r.label for r in s.regions]
        if s.wafer + 1 < d.wafers:
            ports = [p for p in d.ledger.busy if p in (("link", s.wafer, s.wafer + 1), ("up", s.wafer),
                                                      ("down", s.wafer + 1))]
            holds.append(max((d.ledger.busy[p] for p in ports), default=0.0))
            labels.append("link")
    return np.array(holds), labels


def _axis(values: list[int], x: float) -> tuple[int, int, float]:
    """Indices (lo, hi) into sorted `values` and the weight of hi for linear interpolation at x
    (extrapolating from the nearest two outside)."""
    if len(values) == 1:
        return 0, 0, 0.0
    k = min(max(bisect.bisect_right(values, x) - 1, 0), len(values) - 2)
    a, b = values[k], values[k + 1]
    return k, k + 1, (x - a) / (b - a)


class WaferSteps:
    """The wafer pipeline's step model (sim.PipelineSteps) from simulated points."""

    def __init__(self, points: list[DecodePoint], labels: list[str], groups: int, seats: int, kv_tokens: int,
                 max_tokens: int, prefill: "PrefillModel"):
        self.points, self.labels = points, labels
        self.groups, self.seats, self.kv_tokens, self.max_tokens = groups, seats, kv_tokens, max_tokens
        self.prefill_model = prefill
        fit = [p for p in points if p.fitted]
        self.batches = sorted({p.batch for p in fit})
        self.contexts = sorted({p.context for p in fit})
        grid = {(p.batch, p.context): p for p in fit}
        missing = [(b, c) for b in self.batches for c in self.contexts if (b, c) not in grid]
        if missing:
            raise WseError(f"the fitted decode points miss {missing}: they must form a grid")
        self.grid = grid
        self._memo: dict[tuple[int, int], tuple[np.ndarray, float]] = {}
        self._act_memo: dict[tuple[int, int], np.ndarray] = {}
        for p in points:
            if not p.fitted:
                holds, delay = self.decode(p.batch, p.context)
                p.predicted_s = float(holds.sum()) + delay

    def _at(self, n: int, context: float, what: Callable[[DecodePoint], np.ndarray | float]):
        b0, b1, wb = _axis(self.batches, n)
        c0, c1, wc = _axis(self.contexts, context)
        B, C, g = self.batches, self.contexts, self.grid
        lo = (1 - wc) * what(g[(B[b0], C[c0])]) + wc * what(g[(B[b0], C[c1])])
        hi = (1 - wc) * what(g[(B[b1], C[c0])]) + wc * what(g[(B[b1], C[c1])])
        return (1 - wb) * lo + wb * hi

    def decode(self, n: int, context: float) -> tuple[np.ndarray, float]:
        key = (n, int(round(context)))
        got = self._memo.get(key)
        if got is None:
            holds = np.maximum(self._at(n, key[1], lambda p: p.holds), 0.0)
            delay = max(float(self._at(n, key[1], lambda p: p.delay)), 0.0)
            got = self._memo[key] = (holds, delay)
        return got

    def activity(self, n: int, context: float) -> np.ndarray:
        key = (n, int(round(context)))
        got = self._act_memo.get(key)
        if got is None:
            got = self._act_memo[key] = np.maximum(self._at(n, key[1], lambda p: p.activity), 0.0)
        return got

    def prefill_activity(self, prompt: int) -> np.ndarray:
        return np.array([self.prefill_model.flops(prompt), 0.0, 0.0, 0.0])

    def prefill(self, prompt: int) -> tuple[np.ndarray, float]:
        return self.prefill_model.chunk(0, prompt, True)

    def prefill_chunk(self, start: int, end: int, last: bool) -> tuple[np.ndarray, float]:
        return self.prefill_model.chunk(start, end, last)

    def errors(self) -> list[tuple[int, int, float, float]]:
        """(batch, context, simulated s, interpolated s) at every check point."""
        return [(p.batch, p.context, p.latency_s, p.predicted_s) for p in self.points if not p.fitted]


@dataclasses.dataclass
class PrefillModel:
    """Prefill hold times per pipeline stage: each layer region holds its layer's prefill (by its
    slot size), the LM head region the last token's head GEMV, each link the prompt's
    activations; per kernel class fitted over the simulated prompt lengths."""

    stage_slot: list[tuple[int, int] | int]  # per stage: (P, Q) of a layer region, 0 LM head, -1 link, -2 other
    fits: dict[tuple[int, int], dict[str, tuple[float, float]]]  # (P, Q) -> kernel -> (a, b): a + b S (S^2)
    head_cycles: int
    clock_hz: float
    link: Link
    hidden: int
    simulated: list[tuple[tuple[int, int], int, int]]  # ((P, Q), prompt, simulated layer cycles)
    checks: list[tuple[tuple[int, int], int, int, float]] = dataclasses.field(default_factory=list)  # (.., sim, fit)

    spec: ModelSpec | None = None

    def flops(self, prompt: int) -> float:
        """The model's FLOPs for a prompt: every layer's weight products and causal attention,
        and the LM head for the last token (the activity counted for a prefill)."""
        sp = self.spec
        total = 2.0 * sp.vocab_size * sp.hidden_size
        for layer in range(sp.layers):
            total += G.layer_touched(sp, layer, prompt)[1] + sp.causal_pairs(layer, prompt) * G.attention_flops_per_pair(sp)
        return total

    def layer_cycles(self, shape: tuple[int, int], prompt: int, start: int = 0) -> float:
        """One layer's prefill of prompt tokens [start, prompt) after `start` already cached: each
        kernel's intercept plus its slope times the chunk's tokens (linear kernels) or times
        prompt^2 - start^2 (attention GEMMs: chunks of a prompt add up to the whole prompt's)."""
        return sum(a + b * (prompt ** 2 - start ** 2 if k in QUADRATIC else prompt - start)
                   for k, (a, b) in self.fits[shape].items())

    def chunk(self, start: int, end: int, last: bool) -> tuple[np.ndarray, float]:
        """Stage holds (and link latencies) of prefilling prompt tokens [start, end); the LM head
        runs for the chunk that ends the prompt (`last`)."""
        out = np.zeros(len(self.stage_slot))
        delay = 0.0
        for j, kind in enumerate(self.stage_slot):
            if isinstance(kind, tuple):
                out[j] = max(self.layer_cycles(kind, end, start), 0.0) / self.clock_hz
            elif kind == 0 and last:
                out[j] = self.head_cycles / self.clock_hz
            elif kind == -1:
                out[j] = self.link.busy_seconds((end - start) * self.hidden * ELEM)
                delay += self.link.latency_s
        return out, delay


def fit_kernels(samples: dict[int, dict[str, int]]) -> dict[str, tuple[float, float]]:
    """Per kernel, (a, b) with cycles = a + b x S (S^2 for QUADRATIC) through the samples
    (prompt -> kernel -> cycles): least squares over two or more prompts, a pure scaling
    (a = 0) through a single one."""
    prompts = sorted(samples)
    out = {}
    for k in samples[prompts[0]]:
        xs = np.array([float(s) ** (2 if k in QUADRATIC else 1) for s in prompts])
        ys = np.array([float(samples[s][k]) for s in prompts])
        if len(prompts) == 1:
            out[k] = (0.0, ys[0] / xs[0])
        else:
            b, a = np.polyfit(xs, ys, 1)
            out[k] = (float(a), float(b))
    return out


def wafer_steps(spec: ModelSpec, system: SystemConfig, params: DecodeParams, plans: list[ModelPlan],
                contexts: list[int], checks: list[tuple[int, int]], prompts: list[int],
                prompt_checks: list[int], simulate: Callable[[Trace], object], fanout: Fanout,
                note: Callable[[str], None] = lambda s: None, prefill_steps: int = 0,
                prefill_plans: list[ModelPlan] | None = None) -> tuple[WaferSteps, SystemDecode]:
    """Simulate the decode points (batches 1 and params.batch at each of `contexts`, plus the
    `checks` (batch, context) left out of the fit) on the decode wafers' `plans` (wafer_plans for
    params), and the prefill kernels at `prompts` (+ `prompt_checks`) on the decode wafers or,
    given `prefill_plans`, on those (separate prefill wafers: the prefill model's stages are
    theirs). Returns the step model and the planning point's system decode (its curve and depth are
    `wse system`'s)."""
    check_prefill(spec, system.wafer_config, prefill_plans or plans, prompts + prompt_checks)  # before simulating
    base = run_decode(spec, system, params, len(plans), simulate, fanout)
    labels = chain_stages(base)[1]
    points: list[DecodePoint] = []
    want = [(b, c, True) for b in sorted({1, params.batch}) for c in sorted(set(contexts))]
    want += [(b, c, False) for b, c in checks if (b, c, True) not in want]
    for b, c, fitted in want:
        if (b, c) == (params.batch, params.context):
            d = base
        else:
            note(f"decode point: batch {b}, context {c:,}")
            d = run_decode(spec, system, dataclasses.replace(params, batch=b, context=c), None, simulate, fanout,
                           plans=plans)
        holds, lab = chain_stages(d)
        if lab != labels:
            raise WseError(f"decode point batch {b}, context {c}: the pipeline stages differ from the planned "
                           "layout's")
        act = np.array([sum(s.flops for s in d.steps), sum(s.sram_bytes for s in d.steps),
                        sum(s.wavelet_hops for s in d.steps), sum(d.ledger.sent)], dtype=float)
        points.append(DecodePoint(b, c, holds, d.latency_s, act, fitted))
    prefill = _prefill_model(spec, system, prefill_plans or plans, None if prefill_plans else labels, prompts,
                             prompt_checks, simulate, fanout, note, prefill_steps)
    kv_copies = 1 + min(s.extra_in_flight for s in base.steps)
    steps = WaferSteps(points, labels, base.max_in_flight, params.batch,
                       kv_copies * params.batch * params.context, params.context, prefill)
    return steps, base


def check_prefill(spec: ModelSpec, cfg, plans: list[ModelPlan], prompts: list[int]) -> None:
    """Every prefill kernel fits its slot's SRAM at every sampled prompt (the GEMMs built for two
    steps, which allocates what the whole kernel needs; a weight-stationary GEMM holds at least
    a one-token block): a WseError naming the kernel otherwise."""
    from ..workload.prefill import is_gemm, kernel_names, kernel_trace, mapping, stationary_block
    for P, Q in sorted({(p.P, p.Q) for p in plans}):
        for S in sorted(set(prompts)):
            for name in kernel_names(spec):
                if is_gemm(name) and mapping("meshgemm", P, Q, name) == "stationary":
                    stationary_block(spec, cfg, P, Q, max(S, P, Q), name)
                elif is_gemm(name):
                    kernel_trace(spec, cfg, P, max(S, P, Q), name, steps=2, Q=Q)


def _prefill_model(spec: ModelSpec, system: SystemConfig, plans: list[ModelPlan], labels: list[str] | None,
                   prompts: list[int], checks: list[int], simulate, fanout: Fanout, note,
                   prefix: int = 0) -> PrefillModel:
    from ..system.pool import prefill_kernels
    from ..workload.precision import weights_of
    from ..workload.prefill import prefill
    cfg = system.wafer_config
    stage_slot: list[tuple[int, int] | int] = []
    for w, plan in enumerate(plans):
        for slot in plan.slots:
            stage_slot.append((plan.P, plan.Q) if slot.kind == "layer" else 0 if slot.kind == "lm_head" else -2)
        if w + 1 < len(plans):
            stage_slot.append(-1)
    if labels is not None and len(stage_slot) != len(labels):
        raise WseError("the prefill stages do not match the decode pipeline's")
    lm_width, lm_rows = plans[-1].slots[-1].region.width, plans[-1].slots[-1].region.height  # (the LM head's)
    samples: dict[tuple[int, int], dict[int, dict[str, int]]] = {}
    head = 0
    sims: list[tuple[tuple[int, int], int, int]] = []
    for P, Q in sorted({(p.P, p.Q) for p in plans}):
        samples[(P, Q)] = {}
        for S in sorted(set(prompts) | set(checks)):
            S_run = max(S, P, Q)  # every row (and key column) of the region needs a token
            note(f"prefill kernels: {P}x{Q} slots, prompt {S_run:,}")
            kernels = prefill_kernels(spec, cfg, P, S_run, lm_width, simulate,
                                      f"{spec.name} prefill on {P}x{Q}", fanout, prefix=prefix, Q=Q, lm_rows=lm_rows,
                                      precisions=weights_of(spec, plans[0].params.weights))
            pr = prefill(spec, cfg, P, S_run, lm_width, 1, simulate, kernels=kernels, Q=Q, lm_rows=lm_rows)
            samples[(P, Q)][S_run] = {k: v for k, v in pr.kernels.items() if k != "lm_head"}
            head = pr.kernels["lm_head"]
            sims.append(((P, Q), S_run, pr.layer_cycles))
    fits = {}
    for (P, Q), by_s in samples.items():
        fits[(P, Q)] = fit_kernels({S: v for S, v in by_s.items() if S in {max(x, P, Q) for x in prompts}})
    model = PrefillModel(stage_slot, fits, head, cfg.clock_hz, Link(system.link_bytes_per_s * system.links_per_wafer,
                                                                    system.link_latency_s),
                         spec.hidden_size, sims, spec=spec)
    for (P, Q), S, cyc in sims:
        if S not in {max(x, P, Q) for x in prompts}:
            model.checks.append(((P, Q), S, cyc, model.layer_cycles((P, Q), S)))
    return model


@dataclasses.dataclass
class GpuSteps:
    """GPU nodes' iteration times (sim.IterationSteps) from the analytic model, for one replica
    of the model on `nodes` TP groups (pipeline stages; `replicas` of them serve side by side);
    decode times memoized per (sequences, context rounded up to `context_step`)."""

    spec: ModelSpec
    gpu: G.GpuConfig
    nodes: int
    weights: G.Weights
    max_seqs: int
    max_prefill_tokens: int
    kv_bytes: float = 2.0
    context_step: int = 16
    replicas: int = 1  # model replicas (data parallel), each on `nodes` TP groups

    def __post_init__(self) -> None:
        self._memo: dict[tuple[int, int], float] = {}
        self.kv_tokens = kv_capacity(self.spec, self.gpu, self.nodes, self.weights, self.kv_bytes)

    def decode(self, n: int, context: float) -> float:
        c = max(1, math.ceil(context / self.context_step)) * self.context_step
        key = (n, c)
        t = self._memo.get(key)
        if t is None:
            t = self._memo[key] = G.gpu_decode(self.spec, self.gpu, batch=n, context=c, weight_bytes=self.weights,
                                               kv_bytes=self.kv_bytes, nodes=self.nodes,
                                               check_fit=False).step_latency_s
        return t

    def prefill(self, prompts: list[int]) -> float:
        return G.prefill_iteration(self.spec, self.gpu, prompts, self.nodes, self.weights, self.kv_bytes)

    def mixed(self, n: int, context: float, pieces: list[tuple[int, int, bool]]) -> float:
        return G.mixed_iteration(self.spec, self.gpu, self.nodes, self.weights, self.kv_bytes, n, context, pieces)


def kv_capacity(spec: ModelSpec, gpu: G.GpuConfig, nodes: int, weights: G.Weights, kv_bytes: float = 2.0) -> int:
    """KV-cache tokens the nodes' usable HBM holds beside the weights (the model's fits, searched)."""
    if not G.fits(spec, gpu, nodes, 0, weights, kv_bytes):
        raise WseError(f"{spec.name}'s weights do not fit on {nodes} {gpu.name} node(s)")
    lo, hi = 0, 1
    while G.fits(spec, gpu, nodes, hi, weights, kv_bytes):
        lo, hi = hi, hi * 2
        if hi > 1 << 40:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if G.fits(spec, gpu, nodes, mid, weights, kv_bytes) else (lo, mid)
    return lo
