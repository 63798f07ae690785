"""`wse report`, `plot`, `export`, `compare` and `bench`: offline analysis of run files and the
benchmarks. Registered on the `wse` group by cli.py."""
from __future__ import annotations

import click

from .cli import _clean_errors, _json_default, cli
from .errors import WseError
from .files import check_output


@cli.command("report")
@click.argument("run_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@_clean_errors
def report_cmd(run_file, as_json) -> None:
    """Configuration, cycles, rates, utilization and the top bottlenecks of a run."""
    from .results.analysis import build_report, format_report
    from .results.store import read_run
    rep = build_report(read_run(run_file))
    if as_json:
        import json
        click.echo(json.dumps(rep, default=_json_default))
    else:
        click.echo(format_report(rep))


@cli.command("plot")
@click.argument("run_file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False), help="folder for the PNGs")
@click.option("--quiet", is_flag=True)
@_clean_errors
def plot_cmd(run_file, outdir, quiet) -> None:
    """PNG heatmaps of PE utilization and link traffic, an activity timeline, breakdown bars; for a
    sweep file, the Pareto front and one figure per swept axis."""
    from .results.plots import plot_run
    from .results.store import read_run
    from .results.sweep import is_sweep, plot_sweep
    check_output(outdir, [run_file], folder=True)
    paths = plot_sweep(run_file, outdir) if is_sweep(run_file) else plot_run(read_run(run_file), outdir)
    for path in paths:
        if not quiet:
            click.echo(f"wrote {path}")


@cli.command("export")
@click.argument("run_file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["perfetto", "csv"]), required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--quiet", is_flag=True)
@_clean_errors
def export_cmd(run_file, fmt, output, quiet) -> None:
    """Perfetto/Chrome trace of sampled PEs' op timelines, or CSV of the summary and ops (of a
    sweep file: its table)."""
    from .results.export import csv_tables, perfetto
    from .results.store import read_run
    from .results.sweep import csv_sweep, is_sweep
    out = check_output(output, [run_file])
    if fmt == "csv":  # the ops table goes beside it
        check_output(out.with_name(f"{out.stem}-ops{out.suffix or '.csv'}"), [run_file])
    if is_sweep(run_file):
        if fmt != "csv":
            raise WseError(f"{run_file}: a sweep file exports as csv only")
        if not quiet:
            click.echo(f"wrote {csv_sweep(run_file, output)}")
        return
    rf = read_run(run_file)
    if fmt == "perfetto":
        n = perfetto(rf, output)
        if not quiet:
            click.echo(f"wrote {output}: {n:,} op slices")
    else:
        for path in csv_tables(rf, output):
            if not quiet:
                click.echo(f"wrote {path}")


@cli.command("compare")
@click.argument("run_files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@_clean_errors
def compare_cmd(run_files, as_json) -> None:
    """Key metrics of several runs side by side, with ratios to the first."""
    from .results.analysis import compare, format_compare
    from .results.store import read_run
    cmp = compare([read_run(p) for p in run_files])
    if as_json:
        import json
        click.echo(json.dumps(cmp, default=_json_default))
    else:
        click.echo(format_compare(cmp))


@cli.command("bench")
@click.option("--only", "only", multiple=True, metavar="NAME",
              help="run only these benchmarks (repeatable or comma-separated): dense, wse3, layer, token8b, "
                   "token70b, jit, system, functional")
@click.option("--quick", is_flag=True, help="smoke-test sizes (seconds, not minutes)")
@click.option("--history", type=click.Path(dir_okay=False), default="bench-history.jsonl", show_default=True,
              help="JSON-lines file each run appends to")
@click.option("--json", "as_json", is_flag=True, help="print this run's history line")
@_clean_errors
def bench_cmd(only, quick, history, as_json) -> None:
    """Speed and memory benchmarks (docs/performance.md), each in a fresh process."""
    from pathlib import Path

    from . import bench
    names = [n.strip() for item in only for n in item.split(",") if n.strip()] or list(bench.NAMES)
    for n in names:
        if n not in bench.NAMES:
            raise WseError(f"--only {n!r}: choose from {', '.join(bench.NAMES)}")
    results = {}
    for n in names:
        if not as_json:
            click.echo(f"running {n} ...", err=True)
        results[n] = bench.run_isolated(n, quick)
        if not as_json:
            click.echo(bench.format_results({n: results[n]})[0])
    entry, previous = bench.record(results, quick, Path(history))
    if as_json:
        import json
        click.echo(json.dumps(entry))
        return
    m = entry["machine"]
    click.echo(f"machine: {m['cpus']} CPUs, {m['cpu']}; appended to {history}")
    for figure, before, now, worse in bench.changes(entry, previous):
        flag = "  REGRESSION" if worse else ""
        click.echo(f"  {figure}: {before:,.4g} -> {now:,.4g} ({now / before:.2f}x){flag}")
