"""What `wse trace gen` and `wse run` do with --op and --model: traces, simulations, metrics.

A job builds its trace(s), simulates them (one trace, or the distinct stages of a composed
model step) and returns a JobResult: the engine counters to store, the figures to print
(cycles, time, tokens/s, utilization, dominant stall) and the analytic facts that the
conservation tests compare against (FLOPs, resident weight bytes).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from .. import isa
from ..engine.result import EngineResult
from ..errors import WseError
from ..hardware import WaferConfig
from ..trace import Trace
from ..trace_check import validate

Simulate = Callable[[Trace], EngineResult]


@dataclasses.dataclass
class JobResult:
    """A finished job: the counters of its representative simulation plus job-level figures."""

    engine: EngineResult  # counters written to /pe and /link (the full trace, or the layer stage)
    trace: Trace  # the trace those counters belong to
    figures: dict[str, tuple[Any, str, str]]  # name -> (value, units, description), for /summary
    stages: dict[str, np.ndarray] | None = None  # columnar table of composed stages
    notes: list[str] = dataclasses.field(default_factory=list)


def parse_region(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise WseError(f"--region {text!r}: expected WxH, e.g. 360x360") from None
    if w < 1 or h < 1:
        raise WseError(f"--region {text!r}: sizes must be positive")
    return w, h


def _dominant_stall(res: EngineResult) -> str:
    names = ("stall_sram_cycles", "stall_recv_cycles", "stall_send_cycles", "stall_sync_cycles")
    totals = {n: int(res.pe(n).sum()) for n in names}
    name = max(totals, key=lambda n: totals[n])
    return name.replace("stall_", "").replace("_cycles", "") if totals[name] else "none"


def _peak_flops_per_cycle(cfg: WaferConfig) -> int:
    return 2 * min(cfg.simd_width(isa.KIND_FMAC, isa.DTYPE_FP16), cfg.sram_port_bytes // 2)


# ---- kernels -------------------------------------------------------------------------------


def kernel_trace(op: str, cfg: WaferConfig, **kw) -> tuple[Trace, dict[str, int]]:
    """Trace and analytic facts of a kernel (--op gemv | allreduce | attention | gemm)."""
    region = kw.get("region")
    if op == "gemv":
        from .gemv import standalone
        if region is None:
            raise WseError("--op gemv needs --region WxH")
        need(kw, "m", "n")
        return standalone(kw["m"], kw["n"], region[0], region[1], cfg, algo=kw.get("algo") or "two-level",
                          groups=kw.get("groups"), batch=kw.get("batch") or 1, weights=kw.get("weights") or "bf16")
    if op == "allreduce":
        from .kernels import allreduce
        if region is None:
            raise WseError("--op allreduce needs --region WxH")
        need(kw, "elements")
        return allreduce(region, kw["elements"], kw.get("axis") or "y", cfg, kw.get("algo") or "two-level",
                         kw.get("groups"))
    if op == "attention":
        from .kernels import attention
        if region is None or region[0] != region[1]:
            raise WseError("--op attention needs a square --region PxP")
        need(kw, "heads", "head_dim", "context")
        return attention(region[0], kw["heads"], kw.get("kv_heads") or kw["heads"], kw["head_dim"],
                         kw["context"], kw.get("batch") or 1, cfg, kw.get("algo") or "two-level", kw.get("groups"),
                         kw.get("attention") or "flash", kw.get("attention_block") or 0)
    if op == "gemm":
        from .gemm import standalone as gemm
        if region is None:
            raise WseError("--op gemm needs --region PxQ (square for meshgemm and cannon)")
        need(kw, "m", "n", "k")
        return gemm(kw["m"], kw["k"], kw["n"], region[0], cfg, kw.get("algo") or "meshgemm", Q=region[1])
    raise WseError(f"unknown --op {op!r} (gemv, gemm, attention, allreduce)")


def need(kw: dict, *names: str) -> None:
    for n in names:
        if not kw.get(n):
            raise WseError(f"this op needs --{n.replace('_', '-')}")


def run_kernel(op: str, cfg: WaferConfig, simulate: Simulate, **kw) -> JobResult:
    trace, facts = kernel_trace(op, cfg, **kw)
    validate(trace, cfg, where=f"--op {op}")
    res = simulate(trace)
    figs = _common_figures(res, cfg, trace.n_pes, res.total_cycles)
    for name, value in facts.items():
        units = "flop" if "flops" in name else "bytes" if "bytes" in name else ""
        figs[f"analytic_{name}"] = (value, units, f"closed form: {name.replace('_', ' ')}")
    flops = facts.get("model_flops", 0)
    if res.total_cycles:
        figs["model_flop_efficiency"] = (flops / (trace.n_pes * res.total_cycles * _peak_flops_per_cycle(cfg)),
                                         "fraction", "model FLOPs over the fp16 FMAC peak of the region")
    return JobResult(res, trace, figs)


def _common_figures(res: EngineResult, cfg: WaferConfig, pes: int, cycles: int) -> dict[str, tuple[Any, str, str]]:
    return {
        "job_cycles": (cycles, "cycles", "cycles of the job"),
        "job_seconds": (cycles / cfg.clock_hz, "s", "job cycles at the configured clock"),
        "dominant_stall": (_dominant_stall(res), "", "largest stall class over the simulated PEs"),
    }


# ---- models --------------------------------------------------------------------------------


def model_trace(name: str, cfg: WaferConfig, phase: str = "decode", **kw) -> tuple[Trace, Any]:
    """The full trace of a model step (--model): every region and lane in one trace."""
    from .stages import full_trace
    plan = _model_plan(name, cfg, phase, **kw)
    trace, _ = full_trace(plan)
    return trace, plan


def _model_plan(name: str, cfg: WaferConfig, phase: str, **kw):
    from .decode import plan_model
    from .params import ALLREDUCE, DecodeParams
    from .models import load_model
    spec = load_model(name)
    region = kw.get("region")
    if region is not None and region[0] > region[1]:
        raise WseError("--region PxQ for a model needs Q >= P (at least as many rows as columns)")
    algo = kw.get("algo") or "auto"
    if algo not in ALLREDUCE:
        raise WseError(f"--algo {algo!r}: decode uses the all-reduce algorithms {', '.join(ALLREDUCE)}")
    params = DecodeParams(batch=kw.get("batch") or 1, context=kw.get("context") or 128,
                          token=kw.get("token") or 1, algo=algo, groups=kw.get("groups"),
                          expert_skew=kw.get("expert_skew") or 0.0, moe_mapping=kw.get("moe_mapping") or "auto",
                          experts_per_region=kw.get("experts_per_region") or 0,
                          slot_shape=kw.get("slot_shape") or "tall", weights=kw.get("weights"),
                          attention=kw.get("attention") or "flash", attention_block=kw.get("attention_block") or 0,
                          flash_blocks=kw.get("flash_blocks") or "auto",
                          norms=kw.get("norms") or "fused", dense_ffn=kw.get("dense_ffn") or "auto",
                          tables=kw.get("tables") or "auto", handoff=kw.get("handoff") or "fused",
                          down_gemv=kw.get("down_gemv") or "auto", mla_groups=kw.get("mla_groups") or 1,
                          gemv_form=kw.get("gemv_form") or "axpy")
    if params.batch < 1 or params.context < 1:
        raise WseError("--batch and --context must be positive")
    return plan_model(spec, cfg, params, kw.get("layers"), region[0] if region else None,
                      Q=region[1] if region else None)


def layer_check_traces(name: str, cfg: WaferConfig, **kw) -> list[tuple[str, Trace]]:
    """Per decode layer (the first --layers; default all), a trace of the layer alone on its
    region (--region PxQ, default the model's slot on the wafer) with its /tensors, for `wse
    check --model`: (label, trace). WseError naming the first layer whose values cannot be checked."""
    from .layer_tensors import layer_trace
    plan = _model_plan(name, cfg, "decode", **{k: v for k, v in kw.items() if k != "layers"})
    if plan.expert_regions:
        raise WseError(f"{name}: its routed experts are placed in expert regions here; a layer is checked with them, "
                       "in the whole step: give --full (or --moe-mapping local)")
    n = min(kw.get("layers") or plan.spec.layers, plan.spec.layers)
    return [(f"--model {name} layer {layer} on {plan.P}x{plan.Q}",
             layer_trace(plan.spec, layer, plan.P, plan.Q, cfg, plan.params)) for layer in range(n)]


def step_check_traces(name: str, cfg: WaferConfig, wafers: int | None = None, **kw) -> list[tuple[str, Trace]]:
    """The whole decode step of a model (its --layers on the wafer) in one trace with its
    /tensors, for `wse check --model --full`: [(label, trace)]; with `wafers`, the model split
    over that many wafers of this configuration as `wse system` splits it (wafers.plans_on:
    whole layers, or with --moe-mapping regions at routed experts, balanced by bytes or filled
    with whole expert regions; with --region every share on that slot size, balanced by bytes)
    — one trace per wafer's share."""
    from .step_tensors import step_trace
    if wafers is None:
        plan = _model_plan(name, cfg, "decode", **kw)
        return [(f"--model {name} decode step ({plan.n_layers} layers, {plan.P}x{plan.Q} slots)", step_trace(plan))]
    from ..system.wafers import plans_on, share_plan, wafer_shares
    if kw.get("layers"):
        raise WseError("--wafers splits the whole model: leave out --layers")
    if wafers < 1:
        raise WseError("--wafers must be at least 1")
    base = _model_plan(name, cfg, "decode", **dict(kw, layers=1))  # (the options checked once)
    spec, params = base.spec, base.params
    units = bool(spec.moe) and params.moe_mapping == "regions"  # cut at routed experts, as `wse system` does
    P, Q = kw.get("region") or (None, None)
    if P is None:
        plans = plans_on(spec, cfg, params, wafers, units)
    else:
        shares = wafer_shares(spec, params, wafers, units)
        plans = [share_plan(spec, cfg, params, shares, w, units, P, Q) for w in range(wafers)]
    out = []
    for w, plan in enumerate(plans):
        what = f"units {plan.units[0]}..{plan.units[1] - 1}, " if units else ""
        out.append((f"--model {name} wafer {w} of {wafers} (layers {plan.first_layer}.."
                    f"{plan.first_layer + plan.n_layers - 1}, {what}{plan.P}x{plan.Q} slots)", step_trace(plan)))
    return out


def prefill_check_traces(name: str, cfg: WaferConfig, **kw) -> list[tuple[str, Trace]]:
    """The kernels of one prefill layer of a model on its slot, each with its /tensors, for `wse
    check --model M --phase prefill`: (label, trace); a weight-stationary kernel is one token block."""
    from .prefill import kernel_traces
    plan = _model_plan(name, cfg, "prefill", **{k: v for k, v in kw.items() if k != "algo"})
    prompt = kw.get("prompt_len") or 512
    return [(f"--model {name} prefill {kernel} (prompt {prompt}) on {plan.P}x{plan.Q}", tr)
            for kernel, (tr, _) in kernel_traces(plan.spec, cfg, plan.P, prompt, kw.get("algo") or "meshgemm",
                                                 Q=plan.Q, record=True).items()]


def prefill_traces(name: str, cfg: WaferConfig, output: str, **kw) -> list[tuple[str, Trace]]:
    """Write the kernel traces of one prefill layer next to `output` (<stem>-<kernel>.h5); a
    weight-stationary kernel's trace is one token block (prefill.kernel_trace)."""
    from pathlib import Path
    from .prefill import kernel_traces
    plan = _model_plan(name, cfg, "prefill", **{k: v for k, v in kw.items() if k != "algo"})
    out = Path(output)
    written = []
    for kernel, (tr, _) in kernel_traces(plan.spec, cfg, plan.P, kw.get("prompt_len") or 512,
                                         kw.get("algo") or "meshgemm", Q=plan.Q).items():
        validate(tr, cfg, where=f"--model {name} prefill {kernel}")
        path = out.with_name(f"{out.stem}-{kernel}{out.suffix or '.h5'}")
        tr.save(path)
        written.append((str(path), tr))
    return written


def run_prefill(name: str, cfg: WaferConfig, simulate: Simulate, **kw) -> JobResult:
    """Time to first token of a prompt: prefill kernels per layer, composed (prefill.py)."""
    from .prefill import prefill
    algo = kw.get("algo") or "meshgemm"
    plan = _model_plan(name, cfg, "prefill", **{k: v for k, v in kw.items() if k != "algo"})
    prompt = kw.get("prompt_len") or 512

    def checked(t: Trace) -> EngineResult:
        validate(t, cfg, where=f"--model {name} prefill")
        return simulate(t)
    lm_width = plan.slots[-1].region.width
    pr = prefill(plan.spec, cfg, plan.P, prompt, lm_width, plan.n_layers, checked, algo, Q=plan.Q)
    # counters: the longest kernel simulated whole (a weight-stationary or prefix-extrapolated
    # kernel is the sum of its pieces)
    rep_name = max((k for k in pr.traces if k != "lm_head"), key=lambda k: pr.kernels[k])
    rep = pr.results[rep_name]
    pes = plan.P * plan.Q
    figs = _common_figures(rep, cfg, pes, pr.ttft_cycles)
    figs.update({
        "ttft_cycles": (pr.ttft_cycles, "cycles", "time to first token: every layer's prefill, then the LM head"),
        "ttft_seconds": (pr.ttft_cycles / cfg.clock_hz, "s", "TTFT at the configured clock"),
        "prefill_layer_cycles": (pr.layer_cycles, "cycles", "one layer's prefill kernels and transfer"),
        "prompt_len": (prompt, "tokens", "prompt length"),
        "slot_size": (plan.P, "PEs", "columns of the prefill region"),
        "slot_rows": (plan.Q, "PEs", "rows of the prefill region"),
        "executed_flops": (pr.executed_flops, "flop", "FLOPs executed by the prefill (padding and all-reduce adds included)"),
        "model_flops": (pr.model_flops, "flop", "FLOPs of the prefill, each operation once"),
        "compute_utilization": (pr.executed_flops / (plan.n_layers * pes * pr.layer_cycles * _peak_flops_per_cycle(cfg))
                                if pr.layer_cycles else 0.0, "fraction", "executed FLOPs of the layers over the fp16 "
                                                                          "peak of their regions"),
    })
    keys = list(pr.kernels)
    table = {"stage": np.array(keys, dtype=object), "cycles": np.array([pr.kernels[k] for k in keys], dtype=np.int64)}
    return JobResult(rep, pr.traces[rep_name], figs, table, [f"counters: the {rep_name} kernel"])


def run_model(name: str, cfg: WaferConfig, simulate: Simulate, phase: str = "decode", full: bool = False,
              **kw) -> JobResult:
    """Simulate one decode step of a model (composed stages, or --full) and derive the figures."""
    from .compose import compose
    from .stages import full_trace, stage_S
    if phase == "prefill":
        if full:
            raise WseError("--full applies to decode; prefill is composed from its kernels")
        return run_prefill(name, cfg, simulate, **kw)
    plan = _model_plan(name, cfg, phase, **kw)
    params = plan.params
    trace, builds = full_trace(plan)
    layer_builds = [b for b in builds if b.kind == "layer"]
    if full:
        validate(trace, cfg, where=f"--model {name}")
        res = simulate(trace)
        if not res.complete:
            return JobResult(res, trace, {"job_cycles": (res.total_cycles, "cycles", "cycles until the stop")})
        token_cycles, rep, rep_trace, stage_table = res.total_cycles, res, trace, None
        layer_cycles = None
    else:
        def checked(t: Trace) -> EngineResult:
            validate(t, cfg, where=f"--model {name} stage", fit=False)
            return simulate(t)
        d = compose(plan, checked)
        token_cycles = d.total_cycles
        # anchor to anchor between the last regions of consecutive layers (expert regions included),
        # the first layer counted from the anchor of the region before it (the embedding)
        ends = [k for k in d.anchored[:-1] if plan.slots[k].kind in ("layer", "ffn", "experts")
                and (k + 1 == len(plan.slots) or plan.slots[k + 1].index != plan.slots[k].index)]
        first = next((k for k, s in enumerate(plan.slots) if s.kind == "layer"), 0)
        before = [first - 1] if ends and first - 1 in d.at else []
        diffs = np.diff([d.at[k] for k in before + ends])
        layer_cycles = float(np.mean(diffs)) if len(diffs) else None
        # the representative counters: the stage that runs a whole layer
        k = next((i for i in range(len(plan.slots) - 1)
                  if plan.slots[i].kind == "layer" and plan.slots[i + 1].kind == "layer"), 0)
        st = stage_S(plan, k)
        rep, rep_trace = d.results[st.key], st.trace
        keys = list(d.stage_cycles)
        stage_table = {"stage": np.array(["/".join(map(str, k_)) for k_ in keys], dtype=object),
                       "cycles": np.array([d.stage_cycles[k_] for k_ in keys], dtype=np.int64)}
    clock = cfg.clock_hz
    seconds = token_cycles / clock
    executed = sum(sum(b.flops.values()) for b in builds)
    model_flops = sum(b.model_flops for b in builds)
    pes = sum(b.region.width * b.region.height for b in builds)
    peak = _peak_flops_per_cycle(cfg)
    figs = _common_figures(rep, cfg, rep_trace.n_pes, token_cycles)
    figs.update({
        "token_cycles": (token_cycles, "cycles", "cycles of one decode step (embedding to argmax)"),
        "layer_cycles": (layer_cycles if layer_cycles is not None else token_cycles / max(1, plan.n_layers),
                         "cycles", "cycles per layer (anchor to anchor between layers)" if layer_cycles
                         is not None else "token cycles over layers (full run)"),
        "tokens_per_s_per_sequence": (1 / seconds if seconds else 0.0, "tokens/s", "decode rate of one sequence"),
        "tokens_per_s": (params.batch / seconds if seconds else 0.0, "tokens/s",
                         "decode rate of the batch (all sequences)"),
        "batch": (params.batch, "sequences", "sequences decoded together"),
        "context": (params.context, "tokens", "cached tokens attended to"),
        "slot_size": (plan.P, "PEs", "columns of a layer region"),
        "slot_rows": (plan.Q, "PEs", "rows of a layer region"),
        "pes_used": (pes, "PEs", "PEs in the model's regions"),
        "layers_mapped": (plan.n_layers, "layers", "layers on the wafer"),
        "executed_flops": (executed, "flop", "FLOPs executed per step (replicated elementwise work and "
                                             "all-reduce adds included)"),
        "model_flops": (model_flops, "flop", "FLOPs of the step, each operation once"),
        "compute_utilization": (executed / (pes * token_cycles * peak) if token_cycles else 0.0, "fraction",
                                "executed FLOPs over the fp16 FMAC peak of the model's PEs"),
        "resident_weight_bytes": (sum(b.weight_bytes for b in builds), "bytes", "weights resident on the wafer"),
        "allocated_weight_bytes": (sum(b.memory.bytes_by_kind().get("weights", 0) * b.region.width * b.region.height
                                       for b in builds), "bytes", "weight buffers allocated (tiles padded to "
                                                                  "the largest chunk)"),
        "kv_cache_bytes": (sum(b.kv_bytes for b in layer_builds), "bytes", "KV cache resident"),
        "sram_bytes_per_pe": (max(b.memory.top for b in builds), "bytes", "largest per-PE SRAM use of any region"),
    })
    return JobResult(rep, rep_trace, figs, stage_table)
