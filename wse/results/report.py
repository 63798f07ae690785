"""Human-readable run summaries (the text `wse run` prints)."""
from __future__ import annotations

from typing import Any

from ..hardware import WaferConfig


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _time(s: float) -> str:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if s >= scale:
            return f"{s / scale:.4g} {unit}"
    return f"{s / 1e-9:.4g} ns"


def format_summary(summary: dict[str, Any], cfg: WaferConfig, attrs: dict[str, Any]) -> str:
    """A few lines: status, cycles and time, utilization, traffic, wall time."""
    cycles = int(summary["total_cycles"])
    pes = int(summary["simulated_pes"])
    lines = [
        f"trace    {attrs['trace_path']}  ({attrs['trace_mesh_width']}x{attrs['trace_mesh_height']} PEs)",
        f"wafer    {cfg.name}  ({cfg.mesh_width}x{cfg.mesh_height} PEs, {_si(cfg.clock_hz, 'Hz')})",
        f"status   {attrs['stop_reason']}",
        f"cycles   {cycles:,}  = {_time(summary['seconds'])} at {_si(cfg.clock_hz, 'Hz')}",
        f"busy     {100 * summary['pe_utilization']:.1f}% of PE-cycles "
        f"({100 * summary['active_pe_utilization']:.1f}% over {summary['active_pes']:,} active PEs)",
        f"compute  {summary['flops']:,} FLOP, {100 * summary['flop_efficiency']:.2f}% of fp16 FMAC peak",
        f"fabric   {summary['wavelets_sent']:,} wavelets sent, {summary['wavelets_received']:,} received, "
        f"{summary['link_wavelets']:,} link hops",
    ]
    wall = float(attrs.get("wall_seconds", 0.0))
    if wall > 0:
        lines.append(f"wall     {wall:.2f} s  ({_si(pes * cycles / wall, 'PE-cycles/s')})")
    return "\n".join(lines)


JOB_LINES = (
    ("token_cycles", "token    {v:,} cycles per decode step = {t}"),
    ("layer_cycles", "layer    {v:,.0f} cycles per layer"),
    ("tokens_per_s_per_sequence", "rate     {v:,.0f} tokens/s per sequence"),
    ("tokens_per_s", "         {v:,.0f} tokens/s in aggregate"),
    ("ttft_cycles", "TTFT     {v:,} cycles = {t}"),
    ("compute_utilization", "compute  {p} of the fp16 peak of the model's PEs"),
    ("model_flop_efficiency", "compute  {p} of the region's fp16 peak (model FLOPs)"),
    ("dominant_stall", "stalls   dominant cause: {v}"),
    ("sram_bytes_per_pe", "SRAM     {v:,} bytes per PE at most"),
)


def format_job(figures: dict[str, Any], cfg: WaferConfig) -> str:
    """The job-level lines of a model or kernel run (those of its figures that exist)."""
    lines = []
    for name, fmt in JOB_LINES:
        if name not in figures:
            continue
        v = figures[name]
        t = _time(v / cfg.clock_hz) if isinstance(v, (int, float)) and "cycles" in name else ""
        p = f"{100 * v:.2f}%" if isinstance(v, float) else ""
        lines.append(fmt.format(v=v, t=t, p=p))
    return "\n".join(lines)
