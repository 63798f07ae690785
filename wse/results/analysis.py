"""Reading a run file as an architect: the report, the comparison, the bottlenecks."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from .serving import format_serve_section, serve_section
from .store import LINK_PORTS, RunFile

KEY_METRICS = (  # (summary key, label, units, format)
    ("total_cycles", "cycles", "cycles", "{:,.0f}"),
    ("seconds", "time", "s", "{:.4g}"),
    ("token_cycles", "token", "cycles", "{:,.0f}"),
    ("layer_cycles", "layer", "cycles", "{:,.0f}"),
    ("tokens_per_s_per_sequence", "rate per sequence", "tokens/s", "{:,.1f}"),
    ("tokens_per_s", "aggregate rate", "tokens/s", "{:,.1f}"),
    ("ttft_seconds", "TTFT", "s", "{:.4g}"),
    ("pe_utilization", "PE utilization", "", "{:.2%}"),
    ("link_utilization", "link utilization", "", "{:.2%}"),
    ("flop_efficiency", "FLOP efficiency", "", "{:.2%}"),
    ("compute_utilization", "compute utilization", "", "{:.2%}"),
    ("flops", "FLOPs", "flop", "{:,.0f}"),
    ("wavelets_sent", "wavelets sent", "", "{:,.0f}"),
    ("energy_per_token_j", "energy per token", "J", "{:.4g}"),
    ("cost_per_mtok_usd", "cost per million tokens", "$", "{:.4g}"),
)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) else None


def bottlenecks(rf: RunFile, top: int = 5) -> dict[str, list[dict[str, Any]]]:
    """The ops that took longest, the busiest regions and the most loaded and blocked links."""
    out: dict[str, list[dict[str, Any]]] = {"ops": [], "regions": [], "links": [], "blocked_links": []}
    ops = rf.ops
    if ops is not None and len(ops.get("name", ())):
        span = ops["end_cycle"] - ops["start_cycle"]
        for i in np.argsort(-span, kind="stable")[:top]:
            out["ops"].append({"op": str(ops["name"][i]), "kind": str(ops["kind"][i]), "cycles": int(span[i]),
                               "start": int(ops["start_cycle"][i]), "end": int(ops["end_cycle"][i]),
                               "pes": int(ops["pes"][i]), "flops": int(ops["flops"][i])})
    tl = rf.timeline
    if tl is not None and len(tl.get("cycle", ())):
        busy = np.asarray(tl["region_busy_pe_cycles"]).sum(axis=0)
        total = busy.sum()
        for i in np.argsort(-busy, kind="stable")[:top]:
            if busy[i] > 0:
                out["regions"].append({"region": str(tl["regions"][i]), "busy_pe_cycles": int(busy[i]),
                                       "share": float(busy[i] / total) if total else 0.0})
    ports = LINK_PORTS.split(",")
    for key, name in (("wavelets", "links"), ("blocked_cycles", "blocked_links")):
        a = rf.link.get(key)
        if a is None:
            continue
        flat = a.reshape(-1)
        for i in np.argsort(-flat, kind="stable")[:top]:
            if flat[i] > 0:
                y, x, p = np.unravel_index(i, a.shape)
                out[name].append({"pe": [int(x), int(y)], "port": ports[p], key: int(flat[i])})
    return out


def build_report(rf: RunFile) -> dict[str, Any]:
    """Everything `wse report` shows, as plain data (the --json output)."""
    cfg = rf.config()
    metrics = {}
    for key, label, units, _ in KEY_METRICS:
        if key in rf.summary:
            metrics[key] = {"label": label, "value": rf.summary[key], "units": units}
    stall = {k.replace("stall_", "").replace("_cycles", ""): int(rf.summary[k])
             for k in ("stall_sram_cycles", "stall_recv_cycles", "stall_send_cycles", "stall_sync_cycles")
             if k in rf.summary}
    return {
        "file": str(rf.path),
        "complete": rf.complete,
        "stop_reason": rf.attrs.get("stop_reason"),
        "trace": rf.attrs.get("trace_path"),
        "configuration": {"wafer": cfg.name, "mesh": f"{cfg.mesh_width}x{cfg.mesh_height}",
                          "clock_hz": cfg.clock_hz, "hop_latency_cycles": cfg.hop_latency_cycles,
                          "queue_depth_wavelets": cfg.queue_depth_wavelets,
                          "sram_bytes": cfg.sram_bytes},
        "simulated_mesh": f"{rf.attrs.get('trace_mesh_width')}x{rf.attrs.get('trace_mesh_height')}",
        "metrics": metrics,
        "stall_cycles": stall,
        "bottlenecks": bottlenecks(rf),
        "energy_and_cost": {k: rf.summary[k] for k in ("energy_per_token_j", "cost_per_mtok_usd") if k in rf.summary}
        or "not modelled in this run",
        "system": system_section(rf),
        "serve": serve_section(rf),
    }


def system_section(rf: RunFile) -> dict[str, Any] | None:
    """A `wse system` run's side-by-side table, wafers, pipeline depth and region breakdown."""
    t = rf.tables
    if "system" not in t:
        return None
    rows = [dict(zip(("metric", "units", "wafer_system", "gpu"), map(str, r)))
            for r in zip(*(t["system"][k] for k in ("metric", "units", "wafer_system", "gpu")))]
    w = t["wafers"]
    wafers = [{k: int(w[k][i]) for k in ("wafer", "first_layer", "layers", "slot_columns", "slot_rows",
                                         "expert_regions", "cycles")} for i in range(len(w["wafer"]))]
    if "packing" in w:  # (run files before the packing column have none)
        for i, x in enumerate(wafers):
            x["packing"] = float(w["packing"][i])
    out: dict[str, Any] = {"rows": rows, "wafers": wafers}
    if "pipeline" in t:
        out["pipeline"] = {"max_in_flight": int(t["pipeline"]["max_in_flight"][0]),
                           "bound": str(t["pipeline"]["bound"][0])}
        for k in ("crossover", "wafer_search"):  # (run files before 2026-12-01 have neither)
            if k in t["pipeline"]:
                out["pipeline"][k] = str(t["pipeline"][k][0])
    r = t.get("regions")
    if r is not None and "class" in r:
        out["regions"] = region_classes(map(str, r["class"]), map(int, r["cycles"]), int(w["cycles"].sum()))
    return out


def region_classes(labels: Iterable[str], cycles: Iterable[int], total: int) -> list[dict[str, Any]]:
    """A system run's regions grouped by class (layer region, idle expert region, ...), largest
    share first: count, min/max/mean hold time and share of all region cycles (`total`)."""
    classes: dict[str, list[int]] = {}
    for label, c in zip(labels, cycles):
        classes.setdefault(label, []).append(c)
    return [{"class": k, "regions": len(v), "min": min(v), "max": max(v), "mean": sum(v) / len(v),
             "share": sum(v) / total if total else 0.0}
            for k, v in sorted(classes.items(), key=lambda kv: -sum(kv[1]))]


def format_region_classes(classes: list[dict[str, Any]], indent: str = "") -> list[str]:
    """The region breakdown as `wse system` and `wse report` print it."""
    return [f"{indent}regions (cycles each holds the token; share of all region cycles):"] + [
        f"{indent}  {c['class']}: {c['regions']} x {c['min']:,}-{c['max']:,}, mean {c['mean']:,.0f}; "
        f"{c['share']:.0%}" for c in classes]


def _format_system(s: dict[str, Any]) -> list[str]:
    w0 = max(len(r["metric"]) + len(r["units"]) + 3 for r in s["rows"])
    w1 = max(len(r["wafer_system"]) for r in s["rows"])
    lines = [f"system   {'':{w0 - 9}}  {'wafer system':>{w1}}  GPU nodes"]
    for r in s["rows"]:
        label = f"{r['metric']} ({r['units']})" if r["units"] else r["metric"]
        lines.append(f"  {label:{w0 - 2}}  {r['wafer_system']:>{w1}}  {r['gpu'] or '-'}")
    for x in s["wafers"]:
        lines.append(f"  wafer {x['wafer']}: layers {x['first_layer']}-{x['first_layer'] + x['layers'] - 1}, "
                     f"{x['slot_columns']}x{x['slot_rows']} slots, {x['expert_regions']} expert regions, "
                     f"{x['cycles']:,} cycles/token"
                     + (f", weights + KV fill {x['packing']:.0%} of its usable SRAM" if "packing" in x else ""))
    if "pipeline" in s:
        p = s["pipeline"]
        lines.append(f"  pipeline depth: {p['max_in_flight']} micro-batches in flight, bounded by {p['bound']}")
        lines += [f"  {p[k]}" for k in ("crossover", "wafer_search") if p.get(k)]
    if s.get("regions"):
        lines += format_region_classes(s["regions"], "  ")
    return lines


def format_report(rep: dict[str, Any]) -> str:
    c = rep["configuration"]
    lines = [
        f"run      {rep['file']}  ({'complete' if rep['complete'] else 'INCOMPLETE: ' + str(rep['stop_reason'])})",
        f"source   {rep['trace']}  ({rep['simulated_mesh']} PEs simulated)",
        f"wafer    {c['wafer']}  {c['mesh']} PEs, {c['clock_hz'] / 1e9:.3g} GHz, hop {c['hop_latency_cycles']} cycles, "
        f"queues {c['queue_depth_wavelets']} wavelets, SRAM {c['sram_bytes']:,} B/PE",
    ]
    fmt = {k: f for k, _, _, f in KEY_METRICS}
    for key, m in rep["metrics"].items():
        v = m["value"]
        text = fmt[key].format(v) if _num(v) is not None else str(v)
        lines.append(f"  {m['label']:<24} {text} {m['units']}".rstrip())
    if rep["stall_cycles"]:
        lines.append("  stalls (PE-cycles)       " + ", ".join(f"{k} {v:,}" for k, v in rep["stall_cycles"].items()))
    b = rep["bottlenecks"]
    if b["ops"]:
        lines.append("longest ops")
        lines += [f"  {o['op']:<28} {o['cycles']:>10,} cycles  [{o['start']:,} .. {o['end']:,}]  {o['pes']:,} PEs"
                  for o in b["ops"]]
    if b["regions"]:
        lines.append("busiest regions")
        lines += [f"  {r['region']:<28} {r['share']:>7.1%} of busy PE-cycles" for r in b["regions"]]
    if b["links"]:
        lines.append("most loaded links")
        lines += [f"  PE ({l['pe'][0]}, {l['pe'][1]}) {l['port']:<6} {l['wavelets']:>12,} wavelets" for l in b["links"]]
    if b["blocked_links"]:
        lines.append("most blocked links")
        lines += [f"  PE ({l['pe'][0]}, {l['pe'][1]}) {l['port']:<6} {l['blocked_cycles']:>12,} cycles blocked"
                  for l in b["blocked_links"]]
    if rep.get("system"):
        lines += _format_system(rep["system"])
    if rep.get("serve"):
        lines += format_serve_section(rep["serve"])
    ec = rep["energy_and_cost"]
    lines.append("energy/cost  " + (ec if isinstance(ec, str) else ", ".join(f"{k} {v:.4g}" for k, v in ec.items())))
    return "\n".join(lines)


def compare(files: list[RunFile]) -> dict[str, Any]:
    """Key metrics of several runs side by side, with ratios to the first run."""
    rows = []
    for key, label, units, _ in KEY_METRICS:
        vals = [rf.summary.get(key) for rf in files]
        if all(v is None for v in vals):
            continue
        base = _num(vals[0])
        ratios = [(_num(v) / base) if base and _num(v) is not None else None for v in vals]
        rows.append({"metric": key, "label": label, "units": units, "values": vals, "ratios": ratios})
    return {"files": [str(rf.path) for rf in files], "rows": rows}


def format_compare(cmp: dict[str, Any]) -> str:
    files = cmp["files"]
    names = [f"[{i}] {f}" for i, f in enumerate(files)]
    fmt = {k: f for k, _, _, f in KEY_METRICS}
    head = f"{'metric':<24}" + "".join(f"{'[' + str(i) + ']':>18}" for i in range(len(files))) \
        + "".join(f"{'[' + str(i) + ']/[0]':>10}" for i in range(1, len(files)))
    lines = names + [head]
    for r in cmp["rows"]:
        cells = "".join(f"{(fmt[r['metric']].format(v) if _num(v) is not None else '-'):>18}" for v in r["values"])
        ratios = "".join(f"{(f'{q:.3f}' if q is not None else '-'):>10}" for q in r["ratios"][1:])
        lines.append(f"{r['label']:<24}{cells}{ratios}")
    return "\n".join(lines)
