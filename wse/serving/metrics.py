"""Per-request latencies and the operating point's figures: percentiles, throughput, goodput,
SLO attainment, energy and cost (docs/serving.md, "Figures")."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .requests import Requests
from .sim import Outcome

PERCENTILES = (50, 90, 99)
ACTIVITY = ("flops", "sram_bytes", "wavelet_hops", "link_bytes")  # what the wafer's dynamic energy counts


def latencies(req: Requests, out: Outcome) -> dict[str, np.ndarray]:
    """Per request (nan where rejected, or TPOT of a one-token answer): TTFT (arrival to first
    token), TPOT (mean time between its later tokens) and end-to-end latency."""
    ttft = out.first_token_s - req.arrival_s
    e2e = out.finish_s - req.arrival_s
    later = np.where(out.tokens > 1, out.tokens - 1, np.nan)
    tpot = (out.finish_s - out.first_token_s) / later
    return {"ttft_s": ttft, "tpot_s": tpot, "e2e_s": e2e}


@dataclasses.dataclass
class Costs:
    """How a side draws power and costs money: `power_w` all the time it exists (its rated draw),
    plus, for the wafer, simulated activity energy (pJ per ACTIVITY unit); `usd_per_hour` for
    the whole side."""

    power_w: float
    usd_per_hour: float
    pj: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)


def figures(req: Requests, out: Outcome, costs: Costs, slo_ttft_s: float, slo_tpot_s: float) -> dict[str, Any]:
    """The operating point's figures (names as in the run file's /serve table)."""
    lat = latencies(req, out)
    ok = out.completed
    span = out.end_s
    meets = ok & (lat["ttft_s"] <= slo_ttft_s) & ((lat["tpot_s"] <= slo_tpot_s) | (out.tokens <= 1))
    tokens = int(out.tokens[ok].sum())

    def per_s(x: float) -> float:
        return float(x) / span if span > 0 else float("nan")
    f: dict[str, Any] = {
        "requests": len(req), "completed": int(ok.sum()), "rejected": int(out.rejected.sum()),
        "output_tokens": tokens, "span_s": span,
        "tokens_per_s": per_s(tokens), "requests_per_s": per_s(ok.sum()),
        "goodput_tokens_per_s": per_s(out.tokens[meets].sum()),
        "slo_attainment": float(meets.sum()) / len(req),
        "busy_fraction": per_s(out.busy_s),
    }
    for name, a in lat.items():
        v = a[np.isfinite(a)]
        for p in PERCENTILES:
            f[f"{name[:-2]}_p{p}_s"] = float(np.percentile(v, p)) if len(v) else float("nan")
        f[f"{name[:-2]}_mean_s"] = float(v.mean()) if len(v) else float("nan")
    f.update(energy_cost(out, costs, tokens))
    return f


def energy_cost(out: Outcome, costs: Costs, tokens: int) -> dict[str, float]:
    """J per output token and $ per million output tokens over the run's span: the rated power
    and the hourly price for the whole span (idle time included: utilization is what the traffic
    makes it), plus the simulated activity energy."""
    activity_j = float(np.dot(out.activity, costs.pj)) * 1e-12
    energy = costs.power_w * out.end_s + activity_j
    usd = costs.usd_per_hour * out.end_s / 3600.0
    return {"energy_j": energy, "activity_j": activity_j, "j_per_token": energy / tokens if tokens else float("nan"),
            "usd": usd, "usd_per_mtok": usd / tokens * 1e6 if tokens else float("nan")}
