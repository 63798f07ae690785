"""The `wse` command line: parses, calls the library, formats. No simulation logic here.

Exit codes: 0 success; 2 bad input or usage (one line on stderr, no traceback); 3 the run
stopped before completing (deadlock or max_cycles; the run file is written, marked incomplete);
130 interrupted.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from . import __version__, hardware, isa
from . import trace as trace_mod
from .errors import WseError

EXIT_INCOMPLETE = 3


class InputError(click.ClickException):
    """A WseError shown as one line, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _clean_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except WseError as e:
            raise InputError(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


def _parse_mesh(value: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise WseError(f"--mesh {value!r}: expected WxH, e.g. 64x64") from None
    if not (1 <= w <= 4096 and 1 <= h <= 4096):
        raise WseError(f"--mesh {value!r}: width and height must be in [1, 4096]")
    return w, h


@click.group()
@click.version_option(__version__, prog_name="wse")
def cli() -> None:
    """wse-sim: cycle-level simulation of wafer-scale engines."""


@cli.command("wafers")
@_clean_errors
def wafers_cmd() -> None:
    """List the wafer presets with their key numbers."""
    head = f"{'preset':8} {'mesh':>10} {'PEs':>9} {'clock':>8} {'SRAM/PE':>8} {'SRAM':>8} " \
           f"{'hop':>4} {'fp16 FMAC':>9} {'peak fp16':>11}"
    click.echo(head)
    for name in hardware.preset_names():
        c = hardware.load_preset(name)
        pes = c.mesh_width * c.mesh_height
        width = min(c.simd_width(isa.KIND_FMAC, isa.DTYPE_FP16), c.sram_port_bytes // 2)
        peak = pes * width * 2 * c.clock_hz
        click.echo(f"{name:8} {c.mesh_width:>4}x{c.mesh_height:<5} {pes:>9,} {c.clock_hz / 1e9:>5.2f}GHz "
                   f"{c.sram_bytes // 1024:>5}KiB {pes * c.sram_bytes / 1e9:>6.2f}GB "
                   f"{c.hop_latency_cycles:>4} {width:>7}/c {peak / 1e15:>7.2f}PF/s")


@cli.group("trace")
def trace_group() -> None:
    """Make traces."""


@trace_group.command("synth")
@click.argument("pattern", type=click.Choice(["stream", "neighbor", "contention", "broadcast",
                                              "chain-reduce", "compute"]))
@click.option("--mesh", required=True, help="mesh size WxH, e.g. 64x64")
@click.option("--wavelets", type=int, help="wavelets per stream (stream, neighbor, contention, broadcast)")
@click.option("--hops", type=int, help="path length in hops (stream, contention, broadcast, chain-reduce)")
@click.option("--elements", type=int, help="vector length (chain-reduce, compute)")
@click.option("--colors", type=int, help="colors cycled along a row (neighbor; default 2)")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="trace file to write")
@_clean_errors
def synth_cmd(pattern: str, mesh: str, wavelets: int | None, hops: int | None, elements: int | None,
              colors: int | None, output: str) -> None:
    """Write a synthetic PATTERN trace (see docs/model.md for each pattern's closed form)."""
    from .workload import synthetic

    w, h = _parse_mesh(mesh)
    uses = {
        "stream": ("wavelets", "hops"), "neighbor": ("wavelets", "colors"),
        "contention": ("wavelets", "hops"), "broadcast": ("wavelets", "hops"),
        "chain-reduce": ("elements", "hops"), "compute": ("elements",),
    }[pattern]
    given = {"wavelets": wavelets, "hops": hops, "elements": elements, "colors": colors}
    for name, value in given.items():
        if value is not None and name not in uses:
            raise WseError(f"--{name} does not apply to pattern {pattern} (it takes {', '.join('--' + u for u in uses)})")
        if value is not None and not 1 <= value <= 2**31 - 1:
            raise WseError(f"--{name} must be in [1, 2147483647]")
    n_wave = wavelets or 64
    n_elem = elements or 256
    if pattern == "stream":
        tr = synthetic.stream(w, h, n_wave, hops if hops is not None else w - 1)
    elif pattern == "neighbor":
        tr = synthetic.neighbor(w, h, n_wave, colors or 2)
    elif pattern == "contention":
        tr = synthetic.contention(w, h, n_wave, hops if hops is not None else max(1, w - 3))
    elif pattern == "broadcast":
        tr = synthetic.broadcast(w, h, n_wave, hops)
    elif pattern == "chain-reduce":
        tr = synthetic.chain_reduce(w, h, n_elem, hops)
    else:
        tr = synthetic.compute_pattern(w, h, n_elem)
    tr.save(output)
    click.echo(f"wrote {output}: {pattern} on {w}x{h} PEs, {len(tr.routes['pe']):,} routes, "
               f"{len(tr.prog_start):,} distinct programs")


@cli.command("run")
@click.option("--trace", "trace_path", required=True, type=click.Path(dir_okay=False), help="trace file")
@click.option("--wafer", help="wafer preset (default wse3)")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="wafer configuration TOML")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="override a configuration key")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="run file to write")
@click.option("--threads", type=int, help="Numba threads (default: all cores)")
@click.option("--quiet", is_flag=True, help="print nothing but errors")
@_clean_errors
def run_cmd(trace_path: str, wafer: str | None, config_file: str | None, sets: tuple[str, ...],
            output: str, threads: int | None, quiet: bool) -> None:
    """Simulate a trace cycle by cycle and write the run file."""
    from .engine.run import simulate
    from .results.report import format_summary
    from .results.store import RunInfo, read_run, write_run

    cfg = hardware.resolve(wafer, config_file, sets)
    tr = trace_mod.load(trace_path)
    trace_mod.validate(tr, cfg, where=trace_path)
    if threads is not None and threads < 1:
        raise WseError("--threads must be at least 1")
    progress = None
    if not quiet and sys.stderr.isatty():
        def progress(t: int, _max: int) -> None:
            click.echo(f"\r  simulated {t:,} cycles", nl=False, err=True)
    res = simulate(tr, cfg, threads=threads, progress=progress, validated=True)
    if progress is not None:
        click.echo("\r" + " " * 40 + "\r", nl=False, err=True)
    info = RunInfo(trace_path=str(trace_path), trace_hash=tr.content_hash(),
                   trace_mesh=(tr.mesh_width, tr.mesh_height), threads=res.threads,
                   wall_seconds=res.wall_seconds)
    write_run(output, res, cfg, info)
    if not quiet:
        rf = read_run(output)
        click.echo(format_summary(rf.summary, cfg, rf.attrs))
        click.echo(f"wrote {output}" + ("" if res.complete else " (marked incomplete)"))
    if not res.complete:
        click.echo(f"error: run stopped ({res.stop_name}) after {res.total_cycles:,} cycles", err=True)
        for line in res.stuck:
            click.echo(f"  {line}", err=True)
        sys.exit(EXIT_INCOMPLETE)


def main() -> None:
    """Console entry point."""
    cli(prog_name="wse")


if __name__ == "__main__":
    main()
