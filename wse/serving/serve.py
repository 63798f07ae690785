"""`wse serve`: one request stream served by a wafer system and by GPU nodes (docs/serving.md).

The wafer side's step times come from cycle simulations at sampled points (steps.py), the GPU
side's from the analytic node model; both replay the same requests (sim.py) and are charged
alike (metrics.py): rated power and hourly price over the whole run, so utilization is what the
traffic makes it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from ..errors import WseError
from ..system import gpu as G
from ..system.config import SystemConfig
from ..system.gpu_parallel import gpu_label, with_tp
from ..system.pool import Fanout
from ..system.link import Link
from ..system.wafers import SystemDecode, fewest_wafers, wafer_plans
from ..trace import Trace
from ..workload.decode import ModelPlan
from ..workload.models import ModelSpec, load_model
from ..workload.params import MAX_CONTEXT, DecodeParams
from ..workload.precision import weights_of
from .handoff import Pool
from .metrics import Costs, figures
from .sharing import SharingCheck, check_sharing
from .requests import Requests
from .sim import Outcome, serve_pipeline, serve_replicas
from .steps import GpuSteps, WaferSteps, wafer_steps

CONTEXT_QUANTUM = 256  # the planned context is the longest request rounded up to this many tokens
SENSITIVITY = 0.5  # every assumed energy and cost input swept by this fraction either way


@dataclasses.dataclass
class Side:
    """One system serving the requests."""

    name: str
    chips: int
    outcome: Outcome
    costs: Costs
    figures: dict[str, Any]


@dataclasses.dataclass
class ServeJob:
    requests: Requests
    wafer: Side
    gpu: Side
    steps: WaferSteps
    decode: SystemDecode  # the planning point's simulation (wse system's figures)
    gpu_steps: GpuSteps
    slo_ttft_s: float
    slo_tpot_s: float
    curve: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sensitivity: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    break_even_usd_per_system_hour: float = math.nan
    pool: Pool | None = None  # separate prefill wafers (disaggregated prefill)
    sharing: SharingCheck | None = None  # micro-batches sharing a wafer's regions, simulated

    @property
    def wafers(self) -> int:
        """Wafer systems serving: the decode wafers and the prefill wafers."""
        return self.decode.wafers + (self.pool.wafers if self.pool else 0)


def planned_context(req: Requests, context: int | None) -> int:
    """The context the wafers are laid out for: --context, or the longest request rounded up."""
    if context:
        if context < req.longest:
            raise WseError(f"--context {context:,}: a request needs {req.longest:,} tokens (prompt + output)")
        return context
    return min(MAX_CONTEXT, -(-req.longest // CONTEXT_QUANTUM) * CONTEXT_QUANTUM)


def sample_contexts(req: Requests, planned: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Decode contexts to simulate: the shortest a decode pass sees (the shortest prompt) and the
    planned one fitted, half way between as a check of the interpolation."""
    lo = max(1, min(int(req.prompt.min()) + 1, planned))
    if lo >= planned:
        return [planned], []
    mid = (lo + planned) // 2
    return [lo, planned], ([(1, mid)] if lo < mid < planned else [])


def run_serve(model: str, system: SystemConfig, simulate: Callable[[Trace], object], req: Requests, *,
              fanout: Fanout, wafers: int | None, batch: int = 1, context: int | None = None,
              gpu: str = "h100", nodes: int | None = None, gpu_tp: int = 0, weights: str | None = None,
              slo_ttft_s: float = 1.0, slo_tpot_s: float = 0.05, prefill_prompts: list[int] | None = None,
              prefill_checks: list[int] | None = None, gpu_max_seqs: int = 256, gpu_max_prefill_tokens: int = 8192,
              curve: list[float] | None = None, regenerate: Callable[[float], Requests] | None = None,
              sensitivity: bool = False, note: Callable[[str], None] = lambda s: None, prefill_steps: int = 0,
              prefill_chunk: int = 0, prefill_wafers: int | str = 0, sharing_check: int = 0,
              **decode_options: Any) -> ServeJob:
    """Plan and simulate the wafer system's step times, replay the requests on both sides, and
    (optionally) the same at other rates (`curve`: multiples of the rate, `regenerate(rate)`
    the requests at that rate) and the energy and cost sensitivity. prefill_wafers: 0 prefill
    interleaved on the decode wafers; N (or "auto", the fewest that hold the model) separate
    prefill wafers, the KV handed to the decode wafers over the links (handoff.py). sharing_check
    m: also simulate m micro-batches through the busiest wafer back to back (sharing.py)."""
    spec = load_model(model)
    planned = planned_context(req, context)
    params = DecodeParams(batch=batch, context=planned, weights=weights, **decode_options)
    plans = wafer_plans(spec, system, params, wafers or fewest_wafers(spec, system, params))
    pool_plans = prefill_plans(spec, system, params, prefill_wafers)
    fit, checks = sample_contexts(req, planned)
    median = max(1, int(round(float(np.median(req.prompt)))))
    # chunks cost each kernel's intercept: fit it from the chunk size and the median prompt
    prompts = prefill_prompts or sorted({median, prefill_chunk} - {0})
    steps, base = wafer_steps(spec, system, params, plans, fit, checks, prompts, prefill_checks or [],
                              simulate, fanout, note, prefill_steps, pool_plans)
    sharing = None
    if sharing_check:
        note(f"micro-batches sharing the regions: {sharing_check} through one wafer")
        sharing = check_sharing(plans, [s.region_cycles for s in base.steps], simulate, sharing_check)
    pool = Pool.build(spec, pool_plans, plans, steps.prefill_model, Link(system.link_bytes_per_s,
                      system.link_latency_s), system.links_per_wafer) if pool_plans else None
    gw = G.weights_for(spec, weights_of(spec, weights))
    node = G.load_gpu(gpu)
    g_cfg = with_tp(node, gpu_tp or node.gpus_per_node)
    seats = steps.groups * steps.seats
    if nodes is None:  # TP groups holding the weights and the KV of as many sequences as the wafers
        groups = G.min_nodes(spec, g_cfg, seats * planned, gw, 2.0, planned)
        replicas = 1
    else:  # as many replicas as hold the weights and the longest request, the groups shared out
        groups = nodes * node.gpus_per_node // g_cfg.gpus_per_node
        one = G.min_nodes(spec, g_cfg, planned, gw, 2.0, planned)
        if groups < one:
            raise WseError(f"--nodes {nodes}: {spec.name} needs {one} TP{g_cfg.gpus_per_node} group(s) of "
                           f"{g_cfg.name}, {nodes} node(s) make {groups}")
        replicas = groups // one
    gs = GpuSteps(spec, g_cfg, groups // replicas, gw, gpu_max_seqs, gpu_max_prefill_tokens, replicas=replicas)
    groups = gs.nodes * replicas
    n_wafers = base.wafers + (pool.wafers if pool else 0)
    w_costs = wafer_costs(system, n_wafers)
    g_costs = gpu_costs(g_cfg, groups)
    w_name = f"{system.name}: {base.wafers} x {system.wafer}" + (f" + {pool.wafers} prefill" if pool else "")
    job = ServeJob(req, _side(w_name, n_wafers, req, steps, w_costs, slo_ttft_s, slo_tpot_s, True, prefill_chunk,
                              pool),
                   _side(gpu_label(g_cfg, groups) + (f" ({replicas} replicas)" if replicas > 1 else ""),
                         groups * g_cfg.gpus_per_node, req, gs, g_costs, slo_ttft_s,
                         slo_tpot_s, False, prefill_chunk),
                   steps, base, gs, slo_ttft_s, slo_tpot_s, pool=pool, sharing=sharing)
    for k in curve or []:
        r = regenerate(k) if regenerate else req
        for side, st, costs, pipe in (("wafer", steps, w_costs, True), ("gpu", gs, g_costs, False)):
            s = _side(side, 0, r, st, costs, slo_ttft_s, slo_tpot_s, pipe, prefill_chunk, pool)
            job.curve.append({"rate_multiple": k, "side": side, **s.figures})
    if sensitivity:
        job.sensitivity = sweep_costs(job, system, g_cfg)
    job.break_even_usd_per_system_hour = break_even(job, system)
    return job


def prefill_plans(spec: ModelSpec, system: SystemConfig, params: DecodeParams, wafers: int | str
                  ) -> list[ModelPlan] | None:
    """The separate prefill wafers' plans (None for prefill on the decode wafers): the model laid
    out for one prompt at the planned context, on `wafers` wafers or ("auto") the fewest."""
    if wafers in (0, "0", None):
        return None
    one = dataclasses.replace(params, batch=1)
    if wafers == "auto":
        n = fewest_wafers(spec, system, one)
    else:
        try:
            n = int(wafers)
        except ValueError:
            raise WseError(f"--prefill-wafers {wafers!r}: a number or 'auto'") from None
        if n < 0:
            raise WseError(f"--prefill-wafers {n}: at least 0 (0: prefill on the decode wafers)")
        if n == 0:
            return None
    try:
        return wafer_plans(spec, system, one, n)
    except WseError as e:
        raise WseError(f"--prefill-wafers {n}: {e}") from None


def _side(name: str, chips: int, req: Requests, steps, costs: Costs, slo_ttft: float, slo_tpot: float,
          pipeline: bool, chunk: int = 0, pool: Pool | None = None) -> Side:
    out = serve_pipeline(req, steps, chunk, pool) if pipeline else serve_replicas(req, steps, chunk)
    return Side(name, chips, out, costs, figures(req, out, costs, slo_ttft, slo_tpot))


def wafer_costs(system: SystemConfig, wafers: int, scale: dict[str, float] | None = None) -> Costs:
    """The wafer systems' rated power (static + overhead, per system), hourly price and activity
    energies; `scale` multiplies named inputs (sensitivity)."""
    k = (scale or {}).get
    v = {name: getattr(system, name) * k(name, 1.0) for name in WAFER_INPUTS}
    return Costs(wafers * (v["static_w_per_wafer"] + v["overhead_w_per_system"]), wafers * v["usd_per_system_hour"],
                 (v["pj_per_fmac"] / 2, v["pj_per_sram_byte"], v["pj_per_wavelet_hop"], v["pj_per_link_byte"]))


def gpu_costs(g: G.GpuConfig, nodes: int, scale: dict[str, float] | None = None) -> Costs:
    """The GPU nodes' rated power (GPUs + node overhead) and hourly price."""
    k = (scale or {}).get
    power = nodes * (g.gpus_per_node * g.power_w * k("power_w", 1.0) + g.node_overhead_power_w
                     * k("node_overhead_power_w", 1.0))
    return Costs(power, nodes * g.gpus_per_node * g.cost_per_gpu_hour_usd * k("cost_per_gpu_hour_usd", 1.0))


WAFER_INPUTS = ("static_w_per_wafer", "overhead_w_per_system", "usd_per_system_hour", "pj_per_fmac",
                "pj_per_sram_byte", "pj_per_wavelet_hop", "pj_per_link_byte")
GPU_INPUTS = ("power_w", "node_overhead_power_w", "cost_per_gpu_hour_usd")


def sweep_costs(job: ServeJob, system: SystemConfig, g: G.GpuConfig) -> list[dict[str, Any]]:
    """Every assumed energy and cost input at (1 - SENSITIVITY) and (1 + SENSITIVITY) of its value,
    one at a time: both sides' J/token and $/Mtok (the served requests are the same: these inputs
    do not change a step time)."""
    from .metrics import energy_cost
    rows = []
    for side, inputs in (("wafer", WAFER_INPUTS), ("gpu", GPU_INPUTS)):
        for name in inputs:
            row: dict[str, Any] = {"input": f"{'system' if side == 'wafer' else 'gpu'}.{name}", "side": side}
            for tag, f in (("low", 1 - SENSITIVITY), ("high", 1 + SENSITIVITY)):
                if side == "wafer":
                    s, c = job.wafer, wafer_costs(system, job.wafers, {name: f})
                else:
                    s, c = job.gpu, gpu_costs(g, job.gpu_steps.nodes, {name: f})
                e = energy_cost(s.outcome, c, s.figures["output_tokens"])
                row[f"j_per_token_{tag}"], row[f"usd_per_mtok_{tag}"] = e["j_per_token"], e["usd_per_mtok"]
            row["j_per_token"], row["usd_per_mtok"] = s.figures["j_per_token"], s.figures["usd_per_mtok"]
            rows.append(row)
    return rows


def break_even(job: ServeJob, system: SystemConfig) -> float:
    """The price of one wafer system per hour at which the wafer side's $/Mtok equals the GPU
    nodes' at this operating point ($/Mtok is linear in it)."""
    w, g = job.wafer.figures, job.gpu.figures
    if not (w["usd_per_mtok"] > 0 and math.isfinite(g["usd_per_mtok"])):
        return math.nan
    return system.usd_per_system_hour * g["usd_per_mtok"] / w["usd_per_mtok"]


def check_slos(slo_ttft_s: float, slo_tpot_s: float) -> None:
    for name, v in (("--slo-ttft", slo_ttft_s), ("--slo-tpot", slo_tpot_s)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise WseError(f"{name} {v}: must be a positive number of seconds")

