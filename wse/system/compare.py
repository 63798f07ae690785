"""`wse system`: one model on a wafer system and on GPU nodes, side by side (docs/system.md).

The wafer side is simulated (system/wafers.py); the GPU side is the analytic model of
system/gpu.py run on the same model, batch, context and precision (16-bit weights and KV cache,
what the wafer mapping stores).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from ..errors import WseError
from ..results.analysis import format_region_classes, region_classes
from ..trace import Trace
from ..workload.chunked import PREFILL_KEYS
from ..workload.params import MAX_CONTEXT, DecodeParams
from ..workload.models import load_model
from .config import SystemConfig
from ..workload.precision import weights_of
from .gpu import CurvePoint, GpuResult, curve, gpu_decode, gpu_prefill, load_gpu, weights_for
from .gpu_parallel import best_decode, cheapest, cost_frontier, gpu_label, undercut
from .mla_groups import AUTO, GroupChoice, choose_groups
from .pool import Fanout
from .ttft import check_chunks, prefill_seconds
from .wafer_search import WaferSearch, search as search_wafers
from .wafers import SystemDecode, fewest_wafers, run_decode, wafer_plans

ELEM_BYTES = 2.0  # both sides keep a 16-bit KV cache
CHEAPEST = "cheapest"  # --wafers cheapest (wafer_search.py)


@dataclasses.dataclass
class SystemJob:
    decode: SystemDecode
    gpu: GpuResult
    gpu_ttft_s: float
    ttft_s: float  # wafer system; nan without a prefill
    rows: list[tuple[str, str, Any, Any]]  # (metric, units, wafer system, GPU)
    gpu_curve: list[Any]
    precisions: tuple[str, str] = ("bf16", "bf16")  # (dense, routed experts) weights on both sides
    tpot: "Generation | None" = None  # --generate: the per-token time as the context grows
    groups: GroupChoice | None = None  # --mla-groups auto: what it chose, and why
    gpu_frontier: list[tuple[GpuResult, Any]] = dataclasses.field(default_factory=list)  # cheapest per batch
    search: WaferSearch | None = None  # --wafers cheapest: the counts planned and the one chosen


@dataclasses.dataclass
class Generation:
    """Time per output token over a generation of `tokens` tokens from context `first`: the
    wafer system simulated at `contexts` (first, middle, last), its mean by the trapezoid rule
    over them; the GPU model (analytic) at every context of the generation."""

    tokens: int
    contexts: list[int]
    wafer_s: list[float]  # token latency at each of `contexts`
    gpu_s: list[float]  # GPU step latency at each of `contexts`
    gpu_mean_s: float

    @property
    def wafer_mean_s(self) -> float:
        c, v = self.contexts, self.wafer_s
        if len(c) == 1:
            return v[0]
        return sum((c[k + 1] - c[k]) * (v[k] + v[k + 1]) / 2 for k in range(len(c) - 1)) / (c[-1] - c[0])


def run_options(system: SystemConfig, simulate: Callable[[Trace], object], fanout: Fanout | None = None,
                **options: Any) -> SystemJob:
    """`wse system`'s options checked (check_options) and run (the CLI and each sweep point)."""
    return run_system(system=system, simulate=simulate, fanout=fanout, **check_options(system, **options))


def check_options(system: SystemConfig, *, model: str, wafers: str | int = "preset", batch: int = 1,
                  context: int = 1024, prompt_len: int = 512, expert_skew: float = 0.0, gpu: str = "h100",
                  weights: str | None = None, generate: int = 1, **kw: Any) -> dict[str, Any]:
    """Everything about `wse system`'s options that can be checked without simulating (the model
    loads, numbers in range, the decode parameters and the GPU valid), as run_system's keyword
    arguments: wafers a number, "auto" (the fewest that hold the model), "cheapest" (CHEAPEST) or
    "preset"; prompt_len 0 skips the prefill."""
    if wafers == "preset":
        n = system.wafers
    elif wafers == "auto":
        n = None
    elif wafers == CHEAPEST:
        n = CHEAPEST
        if generate != 1 or str(kw.get("mla_groups", 1)) == "auto":
            raise WseError("--wafers cheapest: not with --generate N > 1 or --mla-groups auto (they choose the "
                           "wafers at another context or by simulation); give --wafers a number there")
    else:
        try:
            n = int(wafers)
        except ValueError:
            raise WseError(f"--wafers {wafers!r}: expected a number, 'auto', 'cheapest' or 'preset'") from None
        if n < 1:
            raise WseError("--wafers must be at least 1")
    if prompt_len < 0:
        raise WseError("--prompt-len must be at least 0")
    steps = kw.get("prefill_steps", 16)
    if steps != 0 and steps < 4:
        raise WseError(f"--prefill-steps {steps}: 0 (every step) or at least 4")
    if kw.get("prefill_chunk", 0) < 0:
        raise WseError(f"--prefill-chunk {kw['prefill_chunk']} must be at least 0 (0: the whole prompt)")
    if kw.get("prefill_keys", "blocked") not in PREFILL_KEYS:
        raise WseError(f"--prefill-keys {kw['prefill_keys']!r} is not one of {', '.join(PREFILL_KEYS)}")
    if kw.get("prefill_samples", 3) < 2:
        raise WseError(f"--prefill-samples {kw['prefill_samples']}: at least 2 (the first and the last chunk)")
    if prompt_len > MAX_CONTEXT:
        raise WseError(f"--prompt-len {prompt_len} exceeds {MAX_CONTEXT:,} tokens")
    if generate < 1:
        raise WseError(f"--generate {generate} must be at least 1")
    load_model(model)
    if "mla_groups" in kw:
        kw["mla_groups"] = _groups(kw["mla_groups"])
    DecodeParams(batch=batch, context=context, expert_skew=expert_skew, weights=weights or None,
                 algo=kw.get("allreduce", "auto"),
                 **{k: (v or 1 if k == "mla_groups" else v) for k, v in kw.items() if k in _PARAM_KEYS})
    if context + generate - 1 > MAX_CONTEXT:
        raise WseError(f"--context {context} + --generate {generate}: the last token's context exceeds "
                       f"{MAX_CONTEXT:,}")
    load_gpu(gpu)
    return dict(model=model, wafers=n, batch=batch, context=context, prompt=prompt_len or None, gpu=gpu,
                expert_skew=expert_skew, weights=weights or None, generate=generate, **kw)


def _groups(value: str | int) -> int:
    """--mla-groups: a number of row groups, or 'auto' (AUTO)."""
    if value == "auto":
        return AUTO
    try:
        groups = int(value)
    except (TypeError, ValueError):
        raise WseError(f"--mla-groups {value!r}: expected a number or 'auto'") from None
    if groups < 1:
        raise WseError(f"--mla-groups {groups} must be at least 1 (or 'auto')")
    return groups


_PARAM_KEYS = ("moe_mapping", "experts_per_region", "slot_shape", "uniform_slots", "attention", "attention_block",
               "flash_blocks", "norms", "dense_ffn", "tables", "handoff", "down_gemv", "gemv_form",
               "mla_groups")


def run_system(model: str, system: SystemConfig, simulate: Callable[[Trace], object], *,
               wafers: int | str | None = None,
               batch: int = 1, context: int = 1024, prompt: int | None = 512, gpu: str = "h100",
               expert_skew: float = 0.0, moe_mapping: str = "auto", experts_per_region: int = 0,
               slot_shape: str = "tall", uniform_slots: bool = False, weights: str | None = None,
               attention: str = "flash", attention_block: int = 0, flash_blocks: str = "auto",
               norms: str = "fused", generate: int = 1,
               fanout: Fanout | None = None, prefill_steps: int = 16, dense_ffn: str = "auto",
               tables: str = "auto", prefill_chunk: int = 0, prefill_samples: int = 3,
               allreduce: str = "auto", handoff: str = "fused", down_gemv: str = "auto",
               prefill_keys: str = "blocked", mla_groups: int = 1, gemv_form: str = "axpy") -> SystemJob:
    """Simulate the wafer system, evaluate the GPU model, and tabulate both (fanout: where the
    stage simulations run and the cache they share, pool.Fanout). generate > 1: the wafers
    hold the KV cache of the generation's last token, and the step is also simulated there and
    half way (Generation). mla_groups AUTO: chosen by simulation (mla_groups.choose_groups, at
    the last token's context). wafers CHEAPEST: the fewest simulated, then counts up from it
    estimated until the cheapest per token is one simulated whole (wafer_search.py)."""
    spec = load_model(model)
    params = DecodeParams(batch=batch, context=context, expert_skew=expert_skew, moe_mapping=moe_mapping,
                          experts_per_region=experts_per_region, slot_shape=slot_shape, uniform_slots=uniform_slots,
                          weights=weights, attention=attention, attention_block=attention_block,
                          flash_blocks=flash_blocks, norms=norms, dense_ffn=dense_ffn, tables=tables, algo=allreduce,
                          handoff=handoff, down_gemv=down_gemv, mla_groups=max(mla_groups, 1),
                          gemv_form=gemv_form)
    choice = search = None
    if wafers == CHEAPEST:
        search = search_wafers(spec, system, params, run_decode(spec, system, params, None, simulate, fanout),
                               simulate, fanout, run=lambda n: run_decode(spec, system, params, n, simulate, fanout))
        wafers = search.chosen
    if mla_groups == AUTO:  # (chosen at the last token's context, where the wafers hold the KV cache)
        choice = choose_groups(spec, system, dataclasses.replace(params, context=context + generate - 1), wafers,
                               simulate, fanout)
        params, wafers = dataclasses.replace(params, mla_groups=choice.groups), wafers or choice.wafers
    gw = weights_for(spec, weights_of(spec, weights))  # the GPU nodes store the weights alike
    if generate < 1:
        raise WseError(f"--generate {generate} must be at least 1")
    last = context + generate - 1
    ends = {}
    if generate > 1:  # the last token's KV cache decides the wafers
        for c in (last, context + (generate - 1) // 2):
            if c not in ends and c != context:
                ends[c] = run_decode(spec, system, dataclasses.replace(params, context=c), wafers, simulate, fanout)
                wafers = ends[c].wafers
    plans = wafer_plans(spec, system, params, wafers or fewest_wafers(spec, system, params))
    if prompt:  # (a chunk the slots cannot take fails here, before anything is simulated)
        check_chunks(plans, prompt, prefill_chunk)
    dec = search.decodes.get(len(plans)) if search is not None else None
    dec = dec or run_decode(spec, system, params, len(plans), simulate, fanout, plans)
    ttft = math.nan
    if prompt:
        ttft = prefill_seconds(spec, system, plans, prompt, simulate, fanout, prefill_steps, prefill_chunk,
                               prefill_samples, prefill_keys)
    g, g_cfg = best_decode(spec, load_gpu(gpu), batch=batch, context=context, weight_bytes=gw, kv_bytes=ELEM_BYTES,
                           utilization=system.utilization)
    g_ttft = gpu_prefill(spec, g_cfg, prompt, batch=batch, nodes=g.nodes, weight_bytes=gw,
                         kv_bytes=ELEM_BYTES).ttft_s if prompt else math.nan
    g_curve = curve(spec, g_cfg, context, nodes=g.nodes, weight_bytes=gw, kv_bytes=ELEM_BYTES,
                    utilization=system.utilization)
    tpot = None
    if generate > 1:
        ends[context] = dec
        cs = sorted(ends)
        g_at = {c: gpu_decode(spec, g_cfg, batch=batch, context=c, weight_bytes=gw, kv_bytes=ELEM_BYTES,
                              nodes=g.nodes, utilization=system.utilization).step_latency_s
                for c in range(context, last + 1)}
        tpot = Generation(generate, cs, [ends[c].latency_s for c in cs], [g_at[c] for c in cs],
                          sum(g_at.values()) / len(g_at))
    one, most = dec.curve[0], dec.curve[-1]
    g_most = gpu_best(g, g_curve)
    frontier = cost_frontier(spec, load_gpu(gpu), context=context, weight_bytes=gw, kv_bytes=ELEM_BYTES,
                             utilization=system.utilization)
    low, low_cfg = cheapest(frontier)
    wafer_name = f"{system.name}: {dec.wafers} x {system.wafer}"
    gpu_name = gpu_label(g_cfg, g.nodes)
    rows = [
        ("system", "", wafer_name, gpu_name),
        ("chips", "", dec.wafers, g.gpus),
        ("tokens/s per user", "tokens/s", one.tokens_per_s_per_user, g.tokens_per_s_per_user),
        ("aggregate tokens/s", "tokens/s", one.tokens_per_s, g.aggregate_tokens_per_s),
        ("TTFT", "s", ttft, g_ttft),
        ("J/token", "J", one.j_per_token, g.j_per_token),
        ("$/Mtok", "USD", one.usd_per_mtok, g.usd_per_mtok),
        ("aggregate tokens/s, best on curve", "tokens/s", most.tokens_per_s, g_most.aggregate_tokens_per_s),
        ("  at micro-batches in flight / batch", "", most.in_flight, g_most.batch),
        ("cheapest point", "", f"{most.in_flight} in flight", f"batch {low.batch}, {gpu_label(low_cfg, low.nodes)}"),
        ("  tokens/s per user there", "tokens/s", most.tokens_per_s_per_user, low.tokens_per_s_per_user),
        ("  aggregate tokens/s there", "tokens/s", most.tokens_per_s, low.aggregate_tokens_per_s),
        ("  J/token there", "J", most.j_per_token, low.j_per_token),
        ("  $/Mtok there", "USD", most.usd_per_mtok, low.usd_per_mtok),
        ("bound", "", _wafer_bound(dec), g.bound),
    ]
    if tpot:
        ms = [f"{v * 1e3:.3g}" for v in tpot.wafer_s]
        rows += [(f"TPOT at context {' / '.join(f'{c:,}' for c in tpot.contexts)}", "ms", " / ".join(ms),
                  " / ".join(f"{v * 1e3:.3g}" for v in tpot.gpu_s)),
                 (f"TPOT, mean over {generate:,} tokens", "ms", tpot.wafer_mean_s * 1e3, tpot.gpu_mean_s * 1e3)]
    return SystemJob(dec, g, g_ttft, ttft, rows, g_curve, weights_of(spec, weights), tpot, choice, frontier, search)


def gpu_best(g: GpuResult, points: list[CurvePoint]) -> CurvePoint:
    """The GPU nodes' point of most aggregate tokens/s on their curve (on fixed nodes also the
    least energy and cost per token), or the run's own batch if the curve kept none."""
    if points:
        return max(points, key=lambda p: p.aggregate_tokens_per_s)
    return CurvePoint(g.batch, g.tokens_per_s_per_user, g.aggregate_tokens_per_s, g.j_per_token, g.usd_per_mtok)


def crossover_line(job: SystemJob) -> str:
    """Where the GPU nodes' cost frontier undercuts the wafers' cheapest point, in tokens/s per user."""
    most = job.decode.curve[-1]
    fastest = max(r.tokens_per_s_per_user for r, _ in job.gpu_frontier)
    head = (f"cost crossover: the wafers' cheapest point (${most.usd_per_mtok:,.3g}/Mtok at "
            f"{most.tokens_per_s_per_user:,.0f} tokens/s per user) against the GPU nodes sized for each batch (up to "
            f"{fastest:,.0f} tokens/s per user): ")
    under = undercut(job.gpu_frontier, most.usd_per_mtok)
    if under is None:
        return head + "no GPU point is cheaper per token"
    r, c = under
    rate = r.tokens_per_s_per_user
    tail = ("so at every rate the wafers serve" if rate >= most.tokens_per_s_per_user
            else "above it the wafers are cheaper")
    return head + (f"the GPU nodes are cheaper up to {rate:,.0f} tokens/s per user (batch {r.batch} on "
                   f"{gpu_label(c, r.nodes)}: ${r.usd_per_mtok:,.3g}/Mtok); {tail}")


def _wafer_bound(dec: SystemDecode) -> str:
    link_share = dec.link_seconds * (dec.wafers - 1) / dec.latency_s if dec.latency_s else 0.0
    return f"regions {100 * (1 - link_share):.0f}%, links {100 * link_share:.0f}% of latency"


def format_rows(job: SystemJob) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isnan(v):
                return "n/a"
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)
    w0 = max(len(r[0]) + len(r[1]) + 3 for r in job.rows)
    w1 = max(len(cell(r[2])) for r in job.rows)
    lines = [f"{'':{w0}}  {'wafer system':>{w1}}  GPU nodes"]
    for name, units, a, b in job.rows:
        label = f"{name} ({units})" if units else name
        lines.append(f"{label:{w0}}  {cell(a):>{w1}}  {cell(b)}")
    d = job.decode
    lines.append("")
    for s in d.steps:
        lines.append(f"wafer {s.wafer}: layers {s.layers.start}-{s.layers.stop - 1}"
                     f"{' + embedding' if s.embed else ''}{' + LM head' if s.head else ''}, {s.slot}x{s.slot_rows} slots"
                     f"{f', {s.expert_regions} expert region' + 's' * (s.expert_regions > 1) if s.expert_regions else ''}, "
                     f"{s.cycles:,} cycles/token, weights + KV fill {s.packing:.0%} of its usable SRAM")
    lines.append(f"pipeline depth: {d.max_in_flight} micro-batches in flight, bounded by {d.depth_bound}")
    if job.gpu_frontier:
        lines.append(crossover_line(job))
    if job.groups and job.groups.layer >= 0:
        lines.append(job.groups.describe())
    if job.search:
        lines.append(job.search.describe())
    if d.wafers > 1:
        lines.append(f"links: up to {max(d.link_bytes):,} B per token each, {d.link_seconds * 1e6:.2f} us per "
                     f"transfer on average")
    lines += format_region_classes(region_classes([r.label for s in d.steps for r in s.regions],
                                                  [c for s in d.steps for c in s.region_cycles],
                                                  sum(s.cycles for s in d.steps)))
    return "\n".join(lines)


def tables(job: SystemJob) -> dict[str, dict[str, np.ndarray]]:
    """Columnar tables for the run file: the side-by-side table, the wafers, their regions, both
    curves."""
    d = job.decode
    low = [r for r, _ in job.gpu_frontier]  # the GPU nodes' cheapest point of each batch

    def text(v: Any) -> str:
        return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
    return {
        "system": {"metric": np.array([r[0] for r in job.rows], dtype=object),
                   "units": np.array([r[1] for r in job.rows], dtype=object),
                   "wafer_system": np.array([text(r[2]) for r in job.rows], dtype=object),
                   "gpu": np.array([text(r[3]) for r in job.rows], dtype=object)},
        "wafers": {"wafer": np.array([s.wafer for s in d.steps], dtype=np.int64),
                   "first_layer": np.array([s.layers.start for s in d.steps], dtype=np.int64),
                   "layers": np.array([len(s.layers) for s in d.steps], dtype=np.int64),
                   "slot_columns": np.array([s.slot for s in d.steps], dtype=np.int64),
                   "slot_rows": np.array([s.slot_rows for s in d.steps], dtype=np.int64),
                   "expert_regions": np.array([s.expert_regions for s in d.steps], dtype=np.int64),
                   "cycles": np.array([s.cycles for s in d.steps], dtype=np.int64),
                   "resident_bytes": np.array([s.resident_bytes for s in d.steps], dtype=np.int64),
                   "packing": np.array([s.packing for s in d.steps], dtype=np.float64),
                   "flops": np.array([s.flops for s in d.steps], dtype=np.int64),
                   "sram_bytes": np.array([s.sram_bytes for s in d.steps], dtype=np.int64),
                   "wavelet_hops": np.array([s.wavelet_hops for s in d.steps], dtype=np.int64),
                   "link_bytes_out": np.array(d.link_bytes + [0], dtype=np.int64)},
        "regions": {"wafer": np.array([s.wafer for s in d.steps for _ in s.regions], dtype=np.int64),
                    "position": np.array([i for s in d.steps for i in range(len(s.regions))], dtype=np.int64),
                    "kind": np.array([r.kind for s in d.steps for r in s.regions], dtype=object),
                    "layer": np.array([r.layer for s in d.steps for r in s.regions], dtype=np.int64),
                    "first_expert": np.array([r.experts[0] for s in d.steps for r in s.regions], dtype=np.int64),
                    "experts": np.array([r.experts[1] - r.experts[0] for s in d.steps for r in s.regions],
                                        dtype=np.int64),
                    "experts_run": np.array([r.experts_run for s in d.steps for r in s.regions], dtype=np.int64),
                    "cycles": np.array([c for s in d.steps for c in s.region_cycles], dtype=np.int64),
                    "class": np.array([r.label for s in d.steps for r in s.regions], dtype=object)},
        "pipeline": {"max_in_flight": np.array([d.max_in_flight], dtype=np.int64),
                     "bound": np.array([d.depth_bound], dtype=object),
                     "crossover": np.array([crossover_line(job) if job.gpu_frontier else ""], dtype=object),
                     "wafer_search": np.array([job.search.describe() if job.search else ""], dtype=object)},
        "curve_wafer": {"in_flight": np.array([p.in_flight for p in d.curve], dtype=np.int64),
                        "tokens_per_s_per_user": np.array([p.tokens_per_s_per_user for p in d.curve]),
                        "tokens_per_s": np.array([p.tokens_per_s for p in d.curve]),
                        "j_per_token": np.array([p.j_per_token for p in d.curve]),
                        "usd_per_mtok": np.array([p.usd_per_mtok for p in d.curve])},
        "curve_gpu": {"batch": np.array([p.batch for p in job.gpu_curve], dtype=np.int64),
                      "tokens_per_s_per_user": np.array([p.tokens_per_s_per_user for p in job.gpu_curve]),
                      "tokens_per_s": np.array([p.aggregate_tokens_per_s for p in job.gpu_curve]),
                      "j_per_token": np.array([p.j_per_token for p in job.gpu_curve]),
                      "usd_per_mtok": np.array([p.usd_per_mtok for p in job.gpu_curve])},
        "curve_gpu_cheapest": {"batch": np.array([r.batch for r in low], dtype=np.int64),
                               "gpus": np.array([r.gpus for r in low], dtype=np.int64),
                               "config": np.array([gpu_label(c, r.nodes) for r, c in job.gpu_frontier], dtype=object),
                               "tokens_per_s_per_user": np.array([r.tokens_per_s_per_user for r in low]),
                               "tokens_per_s": np.array([r.aggregate_tokens_per_s for r in low]),
                               "j_per_token": np.array([r.j_per_token for r in low]),
                               "usd_per_mtok": np.array([r.usd_per_mtok for r in low])},
        **({"wafer_search": job.search.table()} if job.search else {}),
    }


def figures(job: SystemJob) -> dict[str, tuple[Any, str, str]]:
    """/summary scalars of a system run."""
    d, one, most = job.decode, job.decode.curve[0], job.decode.curve[-1]
    low = cheapest(job.gpu_frontier)[0] if job.gpu_frontier else job.gpu
    under = (undercut(job.gpu_frontier, most.usd_per_mtok) or (None,))[0]
    return {
        "wafers": (d.wafers, "wafers", "wafer systems in the chain"),
        "token_latency_s": (d.latency_s, "s", "one token through every wafer and link"),
        "tokens_per_s_per_user": (one.tokens_per_s_per_user, "tokens/s", "one micro-batch in flight"),
        "tokens_per_s": (one.tokens_per_s, "tokens/s", "aggregate, one micro-batch in flight"),
        "tokens_per_s_full": (most.tokens_per_s, "tokens/s", f"aggregate, {most.in_flight} micro-batches in flight"),
        "max_in_flight": (d.max_in_flight, "micro-batches", f"pipeline depth, bounded by {d.depth_bound}"),
        "ttft_s": (job.ttft_s, "s", "time to first token of the prompt"),
        **({"tpot_first_s": (job.tpot.wafer_s[0], "s", f"token latency at context {job.tpot.contexts[0]}"),
            "tpot_last_s": (job.tpot.wafer_s[-1], "s", f"token latency at context {job.tpot.contexts[-1]}"),
            "tpot_mean_s": (job.tpot.wafer_mean_s, "s", f"mean over {job.tpot.tokens} generated tokens "
                            f"(trapezoid over contexts {job.tpot.contexts})"),
            "gpu_tpot_mean_s": (job.tpot.gpu_mean_s, "s", "GPU nodes, mean over every context of the generation")}
           if job.tpot else {}),
        "energy_per_token_j": (one.j_per_token, "J", "energy per token, one micro-batch in flight"),
        "cost_per_mtok_usd": (one.usd_per_mtok, "USD", "cost per million tokens, one micro-batch in flight"),
        "tokens_per_s_per_user_full": (most.tokens_per_s_per_user, "tokens/s",
                                       f"per user, {most.in_flight} micro-batches in flight"),
        "energy_per_token_full_j": (most.j_per_token, "J", f"energy per token, {most.in_flight} micro-batches in "
                                    "flight"),
        "cost_per_mtok_full_usd": (most.usd_per_mtok, "USD", f"cost per million tokens, {most.in_flight} "
                                   "micro-batches in flight"),
        "gpu_tokens_per_s_per_user": (job.gpu.tokens_per_s_per_user, "tokens/s", f"{job.gpu.gpu} nodes (analytic)"),
        "gpu_tokens_per_s": (job.gpu.aggregate_tokens_per_s, "tokens/s", "GPU aggregate at this batch"),
        "gpu_energy_per_token_j": (job.gpu.j_per_token, "J", "GPU energy per token"),
        "gpu_cost_per_mtok_usd": (job.gpu.usd_per_mtok, "USD", "GPU cost per million tokens"),
        "crossover_tokens_per_s_per_user": (under.tokens_per_s_per_user if under else 0.0, "tokens/s",
                                            "the highest rate per user at which a GPU point (the cheapest parallelism "
                                            "for its batch) costs less per token than the wafers' cheapest point"),
        "gpu_cheapest_batch": (low.batch, "sequences", f"GPU nodes' cheapest point: batch, on {low.gpus} GPUs"),
        "gpu_tokens_per_s_per_user_cheapest": (low.tokens_per_s_per_user, "tokens/s", "GPU, cheapest point"),
        "gpu_tokens_per_s_cheapest": (low.aggregate_tokens_per_s, "tokens/s", "GPU aggregate, cheapest point"),
        "gpu_energy_per_token_cheapest_j": (low.j_per_token, "J", "GPU energy per token, cheapest point"),
        "gpu_cost_per_mtok_cheapest_usd": (low.usd_per_mtok, "USD", "GPU cost per million tokens, cheapest point"),
        "gpus": (job.gpu.gpus, "GPUs", "GPUs in the baseline"),
        **({"mla_groups": (job.groups.groups, "groups", "latent attention's row groups --mla-groups auto chose "
                           f"(layer region cycles {job.groups.cycles} by groups)")} if job.groups else {}),
        **({"fewest_wafers": (job.search.fewest, "wafers", "the fewest that hold the model (--wafers cheapest "
                              "simulated them first)")} if job.search else {}),
    }
