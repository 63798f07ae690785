"""`wse system`, `wse sweep` and `wse cache`: the commands that fan stage simulations out (to Dask
workers, through the stage cache; docs/scale-out.md). Registered on the `wse` group by cli.py."""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from . import isa
from .cli import _clean_errors, _json_default, _Progress, cli
from .errors import WseError
from .files import check_output, claim


def _placement_options(fn: Callable) -> Callable:
    """--moe-mapping, --dense-ffn and --tables: where a model's parts go (wse system, wse serve)."""
    for opt in reversed([
        click.option("--moe-mapping", type=click.Choice(["auto", "local", "regions"]), default="auto",
                     show_default=True, help="routed experts in the layer region (local), in expert regions "
                                             "(regions), or local where it fits"),
        click.option("--dense-ffn", type=click.Choice(["auto", "layer", "region"]), default="auto", show_default=True,
                     help="a dense layer's FFN in its layer region, in a slot of its own after it, or auto: its "
                          "own where a MoE model's routed experts are in expert regions"),
        click.option("--tables", type=click.Choice(["auto", "slots", "strips"]), default="auto", show_default=True,
                     help="the embedding and LM head in slots beside the layers, in strips as wide as the mesh "
                          "above and below them, or auto: strips only where slots place nothing"),
    ]):
        fn = opt(fn)
    return fn


def _fanout_options(fn: Callable) -> Callable:
    options = [
        click.option("--jobs", type=int, default=0, show_default=True, envvar="WSE_JOBS",
                     help="Dask workers simulating stages: 0 sized to the machine, 1 in this process, N a local "
                          "cluster of N (env WSE_JOBS)"),
        click.option("--scheduler", envvar="WSE_SCHEDULER", metavar="tcp://HOST:PORT",
                     help="submit to this Dask scheduler instead of a local cluster (env WSE_SCHEDULER)"),
        click.option("--threads", type=int, help="Numba threads per simulation (default: the cores, shared "
                                                 "among local workers)"),
        click.option("--cache", "cache_dir", type=click.Path(), help="stage cache folder (default: $WSE_CACHE or "
                                                                     "the user cache folder)"),
        click.option("--no-cache", is_flag=True, help="neither read nor write the stage cache"),
        click.option("--quiet", is_flag=True, help="print nothing but errors"),
        click.option("--log-progress", "log_every", type=float, metavar="SECONDS",
                     help="where stderr is not a terminal (a log file), a plain progress line (elapsed, "
                          "simulations run of those to run, from cache) at most every SECONDS"),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _fanout(jobs: int, scheduler: str | None, threads: int | None, cache_dir: str | None, no_cache: bool,
            quiet: bool, log_every: float | None = None):
    """The Fanout the options describe, with a terminal status line unless quiet or piped (piped:
    plain lines with --log-progress)."""
    from .system.cache import StageCache, default_dir
    from .system.pool import Fanout
    from .system.progress import Progress
    if threads is not None and threads < 1:
        raise WseError("--threads must be at least 1")
    if no_cache and cache_dir:
        raise WseError("give either --cache or --no-cache, not both")
    if scheduler is not None and not scheduler.strip():
        raise WseError("--scheduler: empty address")
    if log_every is not None and not log_every > 0:
        raise WseError(f"--log-progress {log_every:g}: the interval must be a positive number of seconds")
    progress = Progress(not quiet, sys.stderr, log_every)

    def warn(msg: str) -> None:
        progress.clear()
        click.echo(f"warning: {msg}", err=True)
    cache = None if no_cache else StageCache(cache_dir or default_dir(), warn=warn)
    return Fanout(jobs, threads, scheduler, cache, progress)


def _in_process(threads: int | None, quiet: bool, fanout) -> Callable[[Any], Callable]:
    """cfg -> the simulate function for stages simulated in this process (engine progress bar on
    terminals, Ctrl-C honoured)."""
    from .engine.run import STAGE_TIMELINE, simulate
    bar = _Progress(not quiet and sys.stderr.isatty())

    def simulate_for(cfg):
        def sim(tr):
            fanout.progress.clear()
            res = simulate(tr, cfg, threads=threads, progress=bar, validated=True, timeline=STAGE_TIMELINE)
            bar.clear()
            if res.stop == isa.STOP_INTERRUPTED:
                raise KeyboardInterrupt
            return res
        return sim
    return simulate_for


@cli.command("system")
@click.option("--model", required=True, help="model name (wse models)")
@click.option("--system", "system_name", default="cs3x4", show_default=True,
              help="system preset (cs3, cs3x4, cs3x16, cs3x64) or TOML file")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="override a system value, or a wafer value (e.g. fabric.hop_latency_cycles=2)")
@click.option("--wafers", default="preset", show_default=True,
              help="wafers in the chain: a number, 'auto' (fewest that hold weights + KV cache), 'cheapest' (least "
                   "cost per token at the deepest pipeline: the fewest simulated, more planned, each with its "
                   "layer region simulated alone, the cheapest estimate simulated until a simulated count is "
                   "the cheapest) or 'preset'")
@click.option("--batch", type=int, default=1, show_default=True, help="sequences decoded together")
@click.option("--context", type=int, default=1024, show_default=True, help="cached tokens attended to")
@click.option("--prompt-len", type=int, default=512, show_default=True, help="prompt tokens for TTFT (0: skip)")
@click.option("--expert-skew", type=float, default=0.0, show_default=True,
              help="MoE expert choice: 0 uniform, s > 0 Zipf-skewed popularity")
@_placement_options
@click.option("--experts-per-region", type=int, default=0, show_default=True,
              help="expert regions hold at most this many routed experts (0: as many as fit)")
@click.option("--slot-shape", type=click.Choice(["tall", "square"]), default="tall", show_default=True,
              help="layer slots: tall P x Q regions of the largest area, or square P x P")
@click.option("--uniform-slots", is_flag=True,
              help="every wafer on one slot shape (fewer distinct stage simulations; slots no larger)")
@click.option("--weights", help="linear weights: bf16, fp8, int8 or int4 (default: the model's published "
                                "checkpoint; the GPU nodes store them alike)")
@click.option("--attention", type=click.Choice(["flash", "classic"]), default="flash", show_default=True,
              help="decode attention: blocked with an online softmax (flash) or classic")
@click.option("--flash-blocks", type=click.Choice(["auto", "overlapped", "serial"]), default="auto",
              show_default=True, help="flash: a block's score reduction overlapping the previous block's softmax, "
                                      "each block in turn, or overlapped where its second score buffer fits")
@click.option("--attention-block", type=int, default=0, show_default=True,
              help="flash: cached tokens per block and column (0: automatic)")
@click.option("--norms", type=click.Choice(["fused", "separate"]), default="fused", show_default=True,
              help="RMSNorm sums in the next GEMV's all-reduce (fused) or their own")
@click.option("--allreduce", type=click.Choice(["auto", "two-level", "chain"]), default="auto", show_default=True,
              help="line all-reduces in the layer regions: two-level, with long vectors in one two-way chain "
                   "(auto), always two-level, or one chain to the line's end")
@click.option("--down-gemv", type=click.Choice(["auto", "axpy", "dot"]), default="auto", show_default=True,
              help="the FFN's down GEMV: a FMAC per input element, a DOT per output element, "
                   "or whichever is fewer cycles")
@click.option("--gemv-form", type=click.Choice(["auto", "axpy", "dot"]), default="axpy", show_default=True,
              help="the other weight GEMVs (QKV, O, router, gate/up, latent attention's W_a, W_qb, W_o) and "
                   "low-precision down tiles under --down-gemv auto: as --down-gemv")
@click.option("--handoff", type=click.Choice(["fused", "barrier"]), default="fused", show_default=True,
              help="a region's hand-off: its sync nested in the FFN's down all-reduce, or a region-wide barrier")
@click.option("--mla-groups", default="1", show_default=True,
              help="latent attention: the layer regions' rows in N groups, each attending its own share of the "
                   "context over every latent dim, or auto: the fewest layer-region cycles of N = 1, 2, ... "
                   "simulated on this run's wafers")
@click.option("--generate", type=int, default=1, show_default=True,
              help="tokens generated from --context: TPOT as the context grows (simulated at the first, middle "
                   "and last token; wafers hold the last token's KV cache)")
@click.option("--gpu", type=click.Choice(["h100", "h200", "b200"]), default="h100", show_default=True)
@click.option("--prefill-steps", type=int, default=16, show_default=True,
              help="TTFT: simulate each prefill GEMM for its first N/2 and N steps and extrapolate (0: every step)")
@click.option("--prefill-chunk", type=int, default=0, show_default=True,
              help="TTFT: prefill in chunks of N tokens pipelined through the layers (0: the whole prompt at once; "
                   "long prompts need chunks)")
@click.option("--prefill-samples", type=int, default=3, show_default=True,
              help="chunked TTFT with --prefill-keys whole: chunks at which the attention kernels are simulated "
                   "(interpolated between)")
@click.option("--prefill-keys", type=click.Choice(["blocked", "whole"]), default="blocked", show_default=True,
              help="chunked TTFT: a chunk attends the chunks so far one block of keys at a time (online softmax; "
                   "every kernel at the chunk's size) or all its keys at once")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="run file to write")
@_fanout_options
@_clean_errors
def system_cmd(model, system_name, sets, output, jobs, scheduler, threads, cache_dir, no_cache, quiet, log_every,
               **options) -> None:
    """A model on a multi-wafer system and on GPU nodes, side by side (docs/system.md)."""
    from .results.store import RunInfo, write_run
    from .system import compare
    from .system.config import load_system

    check_output(output, [system_name, model])
    system = load_system(system_name, sets)
    cfg = system.wafer_config
    t0 = time.perf_counter()
    with _fanout(jobs, scheduler, threads, cache_dir, no_cache, quiet, log_every) as fanout:
        kw = compare.check_options(system, model=model, **options)
        fanout.start()  # (workers start while the system is planned)
        try:
            job = compare.run_system(system=system, simulate=_in_process(threads, quiet, fanout)(cfg),
                                     fanout=fanout, **kw)
        except KeyboardInterrupt:  # the run started: an older file at -o must not stand for it
            claim(output)          # (bad input found while planning leaves it as it was)
            raise
        fanout.progress.clear()
    rep = job.decode.representative
    info = RunInfo(trace_path=f"--model {model} --system {system.name} (counters of the largest stage)",
                   trace_hash="", trace_mesh=(rep.pe_counters.shape[1], rep.pe_counters.shape[0]),
                   threads=fanout.worker_threads(), wall_seconds=time.perf_counter() - t0)  # the whole command
    write_run(output, rep, cfg, info, extra=compare.figures(job), tables=compare.tables(job))
    if not quiet:
        dense, expert = job.precisions
        prec = dense if dense == expert else f"{dense} (experts {expert})"
        click.echo(f"{model}, batch {options['batch']}, context {options['context']}, {prec} weights")
        click.echo(compare.format_rows(job))
        _cache_line(fanout)
        click.echo(f"wrote {output}")


def _cache_line(fanout) -> None:
    if fanout.cache is not None:
        s = fanout.cache.stats
        click.echo(f"stage cache: {s.hits} hits, {s.misses} misses ({fanout.cache.root})")


@cli.command("sweep")
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="sweep file to write (an earlier one is resumed: only missing points run)")
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
@_fanout_options
@_clean_errors
def sweep_cmd(spec_file, output, as_json, jobs, scheduler, threads, cache_dir, no_cache, quiet, log_every) -> None:
    """`wse system` over a grid of points (SPEC.toml: [base], [grid], [[points]]), a table row per point."""
    from .system.sweep import load_spec, run_sweep

    check_output(output, [spec_file])
    spec = load_spec(spec_file)
    check_output(output, [spec_file, *{p.option("model") for p in spec.points}])  # a model given as a file

    def report(point, row, error) -> None:
        if quiet or as_json:
            return
        fanout.progress.clear()
        label = ", ".join(f"{k}={v}" for k, v in (*point.options, *point.sets) if k in spec.axes) or point.key
        if error:
            click.echo(f"  {label}: error: {error}")
        else:
            click.echo(f"  {label}: {row['tokens_per_s_per_user'][0]:,.1f} tokens/s per user, "
                       f"${row['cost_per_mtok_usd'][0]:,.3g}/Mtok, {row['system_wafers'][0]} wafers")

    with _fanout(jobs, scheduler, threads, cache_dir, no_cache, quiet, log_every) as fanout:
        if not quiet and not as_json:
            click.echo(f"{len(spec.points)} points, axes: {', '.join(spec.axes) or 'none'}")
        rows = run_sweep(spec, output, fanout, _in_process(threads, quiet, fanout), report)
        fanout.progress.clear()
    failed = sum(bool(r["error"][0]) for r in rows)
    if as_json:
        import json
        click.echo(json.dumps([{k: v[0] for k, v in r.items()} for r in rows], default=_json_default))
    elif not quiet:
        _cache_line(fanout)
        click.echo(f"wrote {output}: {len(rows) - failed} points" + (f", {failed} failed" if failed else ""))


@cli.group("cache")
def cache_group() -> None:
    """The stage cache: what it holds, and clearing it."""


def _cache_dir(fn: Callable) -> Callable:
    @click.option("--cache", "cache_dir", type=click.Path(file_okay=False),
                  help="stage cache folder (default: $WSE_CACHE or the user cache folder)")
    @functools.wraps(fn)
    def wrapper(cache_dir, **kw):
        from .system.cache import default_dir
        return fn(Path(cache_dir) if cache_dir else default_dir(), **kw)
    return wrapper


@cache_group.command("info")
@_cache_dir
@click.option("--json", "as_json", is_flag=True)
@_clean_errors
def cache_info_cmd(cache_dir, as_json) -> None:
    """Entries, bytes and the hit rate of the last run."""
    from .system import cache
    d = cache.info(cache_dir)
    if as_json:
        import json
        click.echo(json.dumps(d))
        return
    click.echo(f"{d['directory']}: {d['entries']:,} entries, {d['bytes'] / 1e6:,.1f} MB"
               + (f", {d['temporary']} unfinished writes" if d["temporary"] else ""))
    last = d["last_run"]
    if last:
        looked = last["hits"] + last["misses"]
        rate = f"{last['hits'] / looked:.0%}" if looked else "n/a"
        click.echo(f"last run: {last['hits']} hits, {last['misses']} misses (hit rate {rate}), "
                   f"{last['stored']} stored, {last['corrupt']} damaged")


@cache_group.command("clear")
@_cache_dir
@click.option("--quiet", is_flag=True)
@_clean_errors
def cache_clear_cmd(cache_dir, quiet) -> None:
    """Remove every entry."""
    from .system import cache
    n = cache.clear(cache_dir)
    if not quiet:
        click.echo(f"removed {n:,} entries from {cache_dir}")
