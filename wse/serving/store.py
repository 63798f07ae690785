"""A serving run's file and text (docs/results-schema.md, "Serving runs"): the side-by-side table,
every request on both sides, the sampled step points with their interpolation error, the rate
curve and the cost sensitivity, in a schema-1 run file whose counters are the largest stage
simulation's."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..hardware import WaferConfig
from ..results.store import RunInfo, write_run
from .serve import ServeJob

ROWS = (  # (figure, units, label)
    ("ttft_p50_s", "s", "TTFT p50"), ("ttft_p90_s", "s", "TTFT p90"), ("ttft_p99_s", "s", "TTFT p99"),
    ("tpot_p50_s", "s", "TPOT p50"), ("tpot_p90_s", "s", "TPOT p90"), ("tpot_p99_s", "s", "TPOT p99"),
    ("e2e_p50_s", "s", "end-to-end p50"), ("e2e_p99_s", "s", "end-to-end p99"),
    ("tokens_per_s", "tokens/s", "output tokens/s"), ("goodput_tokens_per_s", "tokens/s", "goodput"),
    ("slo_attainment", "", "SLO attainment"), ("completed", "", "requests completed"),
    ("rejected", "", "requests rejected"), ("busy_fraction", "", "busiest stage / iterations busy"),
    ("j_per_token", "J", "J per output token"), ("usd_per_mtok", "USD", "$ per M output tokens"),
    ("span_s", "s", "span (first arrival to last token)"),
)


def side_table(job: ServeJob) -> dict[str, np.ndarray]:
    w, g = job.wafer.figures, job.gpu.figures
    return {"metric": np.array([k for k, _, _ in ROWS], dtype=object),
            "units": np.array([u for _, u, _ in ROWS], dtype=object),
            "wafer_system": np.array([float(w[k]) for k, _, _ in ROWS]),
            "gpu": np.array([float(g[k]) for k, _, _ in ROWS])}


def tables(job: ServeJob) -> dict[str, dict[str, np.ndarray]]:
    r = job.requests
    out: dict[str, dict[str, np.ndarray]] = {"serve": side_table(job)}
    req = {"arrival_s": r.arrival_s, "prompt_tokens": r.prompt, "output_tokens": r.output}
    for tag, side in (("wafer", job.wafer), ("gpu", job.gpu)):
        o = side.outcome
        req.update({f"{tag}_admitted_s": o.admitted_s, f"{tag}_first_token_s": o.first_token_s,
                    f"{tag}_finish_s": o.finish_s, f"{tag}_tokens": o.tokens,
                    f"{tag}_rejected": o.rejected.astype(np.int8)})
    o = job.wafer.outcome
    req["wafer_kv_ready_s"] = o.kv_ready_s if o.kv_ready_s is not None else np.full(len(r), np.nan)
    out["requests"] = req
    pts = job.steps.points
    out["decode_points"] = {"batch": np.array([p.batch for p in pts], dtype=np.int64),
                            "context": np.array([p.context for p in pts], dtype=np.int64),
                            "fitted": np.array([p.fitted for p in pts], dtype=np.int8),
                            "simulated_s": np.array([p.latency_s for p in pts]),
                            "interpolated_s": np.array([p.predicted_s for p in pts])}
    pm = job.steps.prefill_model
    checked = {(shape, S): fit for shape, S, _, fit in pm.checks}
    out["prefill_points"] = {"slot": np.array([sh[0] for sh, _, _ in pm.simulated], dtype=np.int64),
                             "slot_rows": np.array([sh[1] for sh, _, _ in pm.simulated], dtype=np.int64),
                             "prompt": np.array([S for _, S, _ in pm.simulated], dtype=np.int64),
                             "simulated_cycles": np.array([c for _, _, c in pm.simulated], dtype=np.int64),
                             "fitted": np.array([(sh, S) not in checked for sh, S, _ in pm.simulated], dtype=np.int8),
                             "interpolated_cycles": np.array([checked.get((sh, S), math.nan)
                                                              for sh, S, _ in pm.simulated])}
    if job.curve:
        keys = ("tokens_per_s", "goodput_tokens_per_s", "slo_attainment", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
                "tpot_p99_s", "j_per_token", "usd_per_mtok", "requests")
        out["serve_curve"] = {"rate_multiple": np.array([c["rate_multiple"] for c in job.curve]),
                              "side": np.array([c["side"] for c in job.curve], dtype=object),
                              **{k: np.array([float(c[k]) for c in job.curve]) for k in keys}}
    if job.sensitivity:
        s = job.sensitivity
        out["sensitivity"] = {"input": np.array([x["input"] for x in s], dtype=object),
                              "side": np.array([x["side"] for x in s], dtype=object),
                              **{k: np.array([x[k] for x in s]) for k in
                                 ("j_per_token", "j_per_token_low", "j_per_token_high", "usd_per_mtok",
                                  "usd_per_mtok_low", "usd_per_mtok_high")}}
    return out


def summary(job: ServeJob) -> dict[str, tuple[Any, str, str]]:
    """/summary scalars: both sides' headline figures and the run's settings."""
    out: dict[str, tuple[Any, str, str]] = {
        "wafers": (job.wafers, "wafers", "wafer systems serving (decode and prefill)"),
        "prefill_wafers": (job.pool.wafers if job.pool else 0, "wafers",
                           "separate prefill wafers (0: prefill interleaved on the decode wafers)"),
        "kv_handoff_bytes": (job.wafer.outcome.handoff_bytes, "bytes", "KV cache sent from the prefill wafers"),
        **sharing_summary(job),
        "gpus": (job.gpu.chips, "GPUs", "GPUs of the baseline nodes"),
        "slo_ttft_s": (job.slo_ttft_s, "s", "time-to-first-token target"),
        "slo_tpot_s": (job.slo_tpot_s, "s", "time-per-output-token target"),
        "micro_batches": (job.steps.groups, "micro-batches", "micro-batches circulating on the wafers"),
        "micro_batch_sequences": (job.steps.seats, "sequences", "sequences per micro-batch at most"),
        "wafer_kv_tokens": (job.steps.kv_tokens, "tokens", "KV-cache tokens the wafers hold"),
        "gpu_kv_tokens": (job.gpu_steps.kv_tokens, "tokens", "KV-cache tokens the GPU nodes hold"),
        "break_even_usd_per_system_hour": (job.break_even_usd_per_system_hour, "USD",
                                           "wafer system price per hour at which both sides' $/Mtok match"),
    }
    for tag, side in (("wafer", job.wafer), ("gpu", job.gpu)):
        for k, units, label in ROWS:
            out[f"{tag}_{k}"] = (float(side.figures[k]), units, f"{side.name}: {label}")
    return out


def sharing_summary(job: ServeJob) -> dict[str, tuple[Any, str, str]]:
    """/summary scalars of --sharing-check (none without it)."""
    c = job.sharing
    if c is None:
        return {}
    return {"sharing_wafer": (c.wafer, "", "wafer simulated with micro-batches back to back"),
            "sharing_micro_batches": (c.micro_batches, "micro-batches", "micro-batches passing it back to back"),
            "sharing_single_cycles": (c.single_cycles, "cycles", "one micro-batch through it, simulated"),
            "sharing_simulated_cycles": (c.simulated_cycles, "cycles", "all of them through it, simulated"),
            "sharing_tandem_cycles": (c.tandem_cycles, "cycles", "all of them through it, the tandem's figure"),
            "sharing_busiest_hold_cycles": (c.busiest_hold_cycles, "cycles", "its busiest region's hold time")}


def write_serve(path: str, job: ServeJob, cfg: WaferConfig, threads: int, wall_s: float, model: str,
                system: str) -> None:
    rep = job.decode.representative
    info = RunInfo(trace_path=f"wse serve --model {model} --system {system} ({job.requests.source}; counters of "
                              "the largest stage)", trace_hash="",
                   trace_mesh=(rep.pe_counters.shape[1], rep.pe_counters.shape[0]), threads=threads,
                   wall_seconds=wall_s)
    write_run(path, rep, cfg, info, extra=summary(job), tables=tables(job))


def _cell(v: float, units: str) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if units == "s":
        return f"{v * 1e3:,.3g} ms" if v < 1 else f"{v:,.3g} s"
    return f"{v:,.4g}"


def format_serve(job: ServeJob) -> str:
    w, g = job.wafer, job.gpu
    rows = [("", w.name, g.name)]
    for k, units, label in ROWS:
        fmt = (lambda v: f"{v:.1%}") if k in ("slo_attainment", "busy_fraction") else (lambda v, u=units: _cell(v, u))
        rows.append((label + (f" ({units})" if units not in ("", "s") else ""), fmt(w.figures[k]), fmt(g.figures[k])))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{job.requests.source}: {len(job.requests):,} requests; SLOs TTFT {job.slo_ttft_s:g} s, "
             f"TPOT {job.slo_tpot_s:g} s"]
    lines += [f"{a:{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    s = job.steps
    lines.append(f"wafers: {s.groups} micro-batches of up to {s.seats} sequences, {s.kv_tokens:,} KV tokens; "
                 f"GPU nodes: {job.gpu_steps.kv_tokens:,} KV tokens")
    o = w.outcome
    if job.pool is not None and o.kv_ready_s is not None:
        gap = o.kv_ready_s - o.first_token_s
        gap = gap[np.isfinite(gap)]
        lines.append(f"prefill on {job.pool.wafers} separate wafer(s); KV hand-off {o.handoff_bytes / 1e9:,.3g} GB"
                     + (f", first token to KV on the decode wafers p50 {_cell(float(np.median(gap)), 's')}, "
                        f"max {_cell(float(gap.max()), 's')}" if len(gap) else ""))
    errs = [(b, c, abs(p / m - 1)) for b, c, m, p in s.errors()]
    lines.append(f"decode step points simulated: {len(s.points)}" + (
        "; interpolation error " + ", ".join(f"{e:.2%} at batch {b}, context {c:,}" for b, c, e in errs)
        if errs else "; no check point (interpolation error not measured)"))
    c = job.sharing
    if c is not None:
        lines.append(f"micro-batches sharing the regions: {c.micro_batches} through wafer {c.wafer} back to back "
                     f"simulated {c.simulated_cycles:,} cycles, tandem {c.tandem_cycles:,} ({c.error:+.2%}); "
                     f"period {c.period_cycles:,.0f} cycles simulated, {c.busiest_hold_cycles:,} the busiest hold")
    pm = s.prefill_model
    lines.append(f"prefill points simulated: {len(pm.simulated)}" + (
        "; fit error " + ", ".join(f"{abs(f / c - 1):.2%} at prompt {S:,}" for _, S, c, f in pm.checks)
        if pm.checks else "; no check point (fit error not measured)"))
    if math.isfinite(job.break_even_usd_per_system_hour):
        lines.append(f"break-even: the wafer side matches the GPU nodes' $/Mtok at "
                     f"${job.break_even_usd_per_system_hour:,.1f} per system-hour")
    return "\n".join(lines)
