"""PNG plots of a run file (matplotlib, headless): heatmaps, timeline, breakdown bars."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import RunFileError
from .store import RunFile


def plot_run(rf: RunFile, outdir: str | Path) -> list[Path]:
    """Write the plots of a run into `outdir`; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFileError(f"{out}: cannot create the plot folder ({e.strerror})") from None
    cycles = max(int(rf.summary.get("total_cycles", 0)), 1)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        path = out / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    def heatmap(data: np.ndarray, title: str, label: str, name: str) -> None:
        fig, ax = plt.subplots(figsize=(7, 7 * data.shape[0] / max(data.shape[1], 1) + 0.8))
        im = ax.imshow(data, origin="upper", interpolation="nearest", aspect="auto", cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel("x (PE column)")
        ax.set_ylabel("y (PE row)")
        fig.colorbar(im, ax=ax, label=label)
        save(fig, name)

    heatmap(rf.pe["busy_cycles"] / cycles, "PE utilization (busy cycles / total)", "fraction", "pe_utilization.png")
    heatmap(rf.link["wavelets"].sum(axis=2), "link traffic out of each PE (all ports)", "wavelets", "link_traffic.png")

    tl = rf.timeline
    if tl is not None and len(tl["cycle"]):
        c = np.asarray(tl["cycle"], dtype=float)
        widths = np.diff(np.concatenate([[0.0], c]))
        fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
        axes[0].step(c, tl["busy_pe_cycles"] / widths, where="pre")
        axes[0].set_ylabel("active PEs")
        axes[1].step(c, tl["flops"] / widths, where="pre", color="tab:orange")
        axes[1].set_ylabel("FLOP / cycle")
        axes[2].plot(c, tl["wavelets_in_flight"], color="tab:green")
        axes[2].set_ylabel("wavelets in flight")
        axes[2].set_xlabel("cycle")
        axes[0].set_title("activity over time")
        save(fig, "timeline.png")
        reg = np.asarray(tl["region_busy_pe_cycles"])
        if reg.ndim == 2 and reg.shape[1] > 1:
            fig, ax = plt.subplots(figsize=(9, 4.5))
            im = ax.imshow((reg / widths[:, None]).T, aspect="auto", interpolation="nearest", cmap="magma",
                           extent=(0, c[-1], reg.shape[1] - 0.5, -0.5))
            ax.set_yticks(range(reg.shape[1]))
            ax.set_yticklabels([str(n) for n in tl["regions"]], fontsize=7)
            ax.set_xlabel("cycle")
            ax.set_title("active PEs per region")
            fig.colorbar(im, ax=ax, label="active PEs")
            save(fig, "regions.png")

    ops = rf.ops
    if ops is not None and len(ops["name"]):
        span = np.asarray(ops["end_cycle"]) - np.asarray(ops["start_cycle"])
        order = np.argsort(-span, kind="stable")[:25][::-1]
        fig, ax = plt.subplots(figsize=(9, 0.3 * len(order) + 1.5))
        ax.barh([str(ops["name"][i]) for i in order], span[order])
        ax.set_xlabel("cycles (first step to last completion)")
        ax.set_title("per-op time")
        save(fig, "ops.png")
        layers = np.asarray(ops["layer"])
        if (layers >= 0).any():
            kinds = sorted(set(str(k) for k in ops["kind"]))
            ls = sorted(set(int(v) for v in layers if v >= 0))
            fig, ax = plt.subplots(figsize=(9, 4.5))
            bottom = np.zeros(len(ls))
            for kind in kinds:
                vals = np.array([sum(span[i] for i in range(len(span)) if layers[i] == L and str(ops["kind"][i]) == kind)
                                 for L in ls], dtype=float)
                if vals.any():
                    ax.bar([str(L) for L in ls], vals, bottom=bottom, label=kind)
                    bottom += vals
            ax.set_xlabel("layer")
            ax.set_ylabel("op cycles (stacked by kind)")
            ax.set_title("per-layer breakdown")
            ax.legend(fontsize=7)
            save(fig, "layers.png")
    wc, gc = rf.tables.get("curve_wafer"), rf.tables.get("curve_gpu")
    if wc is not None and gc is not None:  # a `wse system` run: both sides' curves
        system = rf.tables.get("system", {})
        names = dict(zip(system.get("metric", []), zip(system.get("wafer_system", []), system.get("gpu", []))))
        label_w, label_g = names.get("system", ("wafer system", "GPU nodes"))
        title = f"{rf.attrs.get('trace_path', '')}"[:80]
        save(_curves(plt, title, "tokens_per_s", "aggregate tokens/s (throughput)", (wc, label_w), (gc, label_g)),
             "throughput-latency.png")
        fc = rf.tables.get("curve_gpu_cheapest")  # (run files before 2026-12-01 have none)
        if fc is not None:  # cost against interactivity: the GPU side sized for each batch
            save(_curves(plt, title, "usd_per_mtok", "$ per million tokens", (wc, label_w),
                         (fc, "GPU nodes, the cheapest parallelism for each batch")), "cost-latency.png")
    from .serving import plot_serve
    plot_serve(rf, save, plt)
    return written


def _curves(plt, title: str, y: str, y_label: str, wafer: tuple[dict, str], gpu: tuple[dict, str]):
    """Column `y` of the wafers' curve (points labelled by micro-batches in flight) and of a GPU
    curve (by batch) against tokens/s per user, log-log."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for (t, label), key, style in ((wafer, "in_flight", "o-"), (gpu, "batch", "s-")):
        if len(t[key]):
            name = "micro-batches in flight" if key == "in_flight" else "batch"
            ax.plot(t["tokens_per_s_per_user"], t[y], style, label=f"{label} ({name})")
            for px, py, n in zip(t["tokens_per_s_per_user"], t[y], t[key]):
                ax.annotate(str(n), (px, py), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s per user (interactivity)")
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
