"""A `wse serve` run file read back: the side-by-side figures, percentiles recomputed from the
per-request table (what offline re-analysis starts from), the step models' errors, and plots:
latency against throughput with the SLO lines, TTFT and TPOT distributions, the cost tornado."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .store import RunFile

SIDES = (("wafer", "wafer system"), ("gpu", "GPU nodes"))


def request_latencies(req: dict[str, np.ndarray], side: str) -> dict[str, np.ndarray]:
    """Per request of one side (nan where rejected): TTFT, TPOT and end-to-end seconds."""
    first, fin, toks = req[f"{side}_first_token_s"], req[f"{side}_finish_s"], req[f"{side}_tokens"]
    later = np.where(toks > 1, toks - 1, np.nan)
    return {"ttft_s": first - req["arrival_s"], "tpot_s": (fin - first) / later, "e2e_s": fin - req["arrival_s"]}


def serve_section(rf: RunFile) -> dict[str, Any] | None:
    t = rf.tables
    if "serve" not in t or "requests" not in t:
        return None
    s = t["serve"]
    rows = [{"metric": str(m), "units": str(u), "wafer_system": float(a), "gpu": float(b)}
            for m, u, a, b in zip(s["metric"], s["units"], s["wafer_system"], s["gpu"])]
    req = t["requests"]
    recomputed = {}
    for side, _ in SIDES:
        lat = request_latencies(req, side)
        recomputed[side] = {f"{k[:-2]}_p{p}_s": float(np.nanpercentile(v, p)) if np.isfinite(v).any() else math.nan
                            for k, v in lat.items() for p in (50, 99)}
    dp = t.get("decode_points", {})
    errors = [{"batch": int(b), "context": int(c), "error": abs(float(i) / float(m) - 1)}
              for b, c, f, m, i in zip(dp.get("batch", []), dp.get("context", []), dp.get("fitted", []),
                                       dp.get("simulated_s", []), dp.get("interpolated_s", [])) if not f]
    return {"rows": rows, "requests": len(req["arrival_s"]), "recomputed": recomputed, "decode_errors": errors,
            "break_even_usd_per_system_hour": rf.summary.get("break_even_usd_per_system_hour")}


def format_serve_section(s: dict[str, Any]) -> list[str]:
    lines = [f"serving  {s['requests']:,} requests{'':8}wafer system     GPU nodes"]
    for r in s["rows"]:
        a, b = r["wafer_system"], r["gpu"]
        f = (lambda v: f"{v:.1%}") if r["metric"] in ("slo_attainment", "busy_fraction") else \
            (lambda v: f"{v * 1e3:,.4g} ms") if r["units"] == "s" else (lambda v: f"{v:,.4g}")
        lines.append(f"  {r['metric']:<26} {f(a):>14}  {f(b):>12}")
    lines.append("  recomputed from /requests: " + "; ".join(
        f"{name} TTFT p99 {s['recomputed'][side]['ttft_p99_s'] * 1e3:,.4g} ms, "
        f"TPOT p99 {s['recomputed'][side]['tpot_p99_s'] * 1e3:,.4g} ms" for side, name in SIDES))
    if s["decode_errors"]:
        lines.append("  decode interpolation error: " + ", ".join(
            f"{e['error']:.2%} at batch {e['batch']}, context {e['context']:,}" for e in s["decode_errors"]))
    be = s.get("break_even_usd_per_system_hour")
    if be is not None and math.isfinite(be):
        lines.append(f"  break-even price of a wafer system: ${be:,.1f} per hour")
    return lines


def plot_serve(rf: RunFile, save, plt) -> None:
    """The serving plots of a `wse serve` run (nothing for other runs)."""
    t = rf.tables
    if "requests" not in t or "serve" not in t:
        return
    slo_ttft, slo_tpot = rf.summary.get("slo_ttft_s"), rf.summary.get("slo_tpot_s")
    curve = t.get("serve_curve")
    if curve is not None and len(curve["side"]):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, key, slo, label in ((axes[0], "tpot", slo_tpot, "TPOT"), (axes[1], "ttft", slo_ttft, "TTFT")):
            for side, name in SIDES:
                m = np.array([str(x) == side for x in curve["side"]])
                order = np.argsort(curve["tokens_per_s"][m])
                for p, style in (("p50", "o-"), ("p99", "s--")):
                    ax.plot(curve["tokens_per_s"][m][order], curve[f"{key}_{p}_s"][m][order] * 1e3, style,
                            label=f"{name} {p}")
            if slo:
                ax.axhline(slo * 1e3, color="red", lw=1, label=f"SLO {slo * 1e3:g} ms")
            ax.set_xlabel("output tokens/s (throughput)")
            ax.set_ylabel(f"{label} (ms)")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("latency against throughput (rates: multiples of --rate)", fontsize=9)
        save(fig, "serve-latency-throughput.png")
    req = t["requests"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, slo, label in ((axes[0], "ttft_s", slo_ttft, "TTFT"), (axes[1], "tpot_s", slo_tpot, "TPOT")):
        for side, name in SIDES:
            v = np.sort(request_latencies(req, side)[key])
            v = v[np.isfinite(v)]
            if len(v):
                ax.step(v * 1e3, np.arange(1, len(v) + 1) / len(v), where="post", label=name)
        if slo:
            ax.axvline(slo * 1e3, color="red", lw=1, label="SLO")
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("share of requests")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, "serve-cdf.png")
    sens = t.get("sensitivity")
    if sens is not None and len(sens["input"]):
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(sens["input"]) + 2))
        for ax, key, label in ((axes[0], "usd_per_mtok", "$ per M output tokens"), (axes[1], "j_per_token", "J/token")):
            base, lo, hi = sens[key], sens[f"{key}_low"], sens[f"{key}_high"]
            order = np.argsort(np.abs(hi - lo))
            y = np.arange(len(order))
            for i, k in enumerate(order):
                ax.barh(i, lo[k] - base[k], left=base[k], color="tab:blue")
                ax.barh(i, hi[k] - base[k], left=base[k], color="tab:orange")
            ax.set_yticks(y, [f"{sens['input'][k]}" for k in order], fontsize=7)
            ax.set_xlabel(f"{label} (blue: input -50%, orange: +50%)")
            ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        save(fig, "serve-sensitivity.png")

