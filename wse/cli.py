"""The `wse` command line: parses, calls the library, formats. No simulation logic here.

Exit codes: 0 success; 2 bad input or usage (one line on stderr, no traceback); 3 the run
stopped before completing (deadlock or max_cycles; the run file is written, marked incomplete);
130 interrupted.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Callable

import click

from . import __version__, hardware, isa
from . import trace as trace_mod
from .trace_check import validate
from .errors import WseError
from .files import check_output, claim

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


class _Group(click.Group):
    """The `wse` group: a usage error (unknown option, bad value, missing argument) is one
    `error:` line and exit 2, like every other bad input."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # `wse` alone: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            click.echo(f"error: {e.format_message()}" + (f" (wse {e.ctx.command_path.split(' ', 1)[1]} --help)"
                                                         if e.ctx and " " in e.ctx.command_path else ""), err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group)
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

    check_output(output)
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
    if colors is not None and not 2 <= colors <= 127:
        raise WseError(f"--colors {colors}: must be in [2, 127] (one color in and one out per PE; the trace "
                       "format's color ids are 8-bit)")
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


def _config_options(fn):
    for opt in reversed([
        click.option("--wafer", help="wafer preset (default wse3)"),
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="wafer configuration TOML"),
        click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="override a configuration key"),
    ]):
        fn = opt(fn)
    return fn


def _workload_options(fn):
    """Options shared by `trace gen` and `run` for --op and --model."""
    for opt in reversed([
        click.option("--op", type=click.Choice(["gemv", "gemm", "attention", "allreduce"]), help="a kernel"),
        click.option("--model", help="a model from `wse models` (or a spec .toml)"),
        click.option("--phase", type=click.Choice(["decode", "prefill"]), default="decode", show_default=True),
        click.option("--m", "m", type=int, help="GEMV/GEMM rows of the input (M)"),
        click.option("--n", "n", type=int, help="GEMV/GEMM output columns (N)"),
        click.option("--k", "k", type=int, help="GEMM contraction length (K)"),
        click.option("--region", help="region WxH (kernels) or layer slot PxP (models; default: automatic)"),
        click.option("--algo", help="all-reduce (auto: models' default, two-level, chain; --op gemv: the last two) or GEMM (meshgemm, cannon, summa; prefill also stationary)"),
        click.option("--groups", type=int, help="two-level all-reduce group count"),
        click.option("--batch", type=int, help="sequences decoded together (default 1)"),
        click.option("--context", type=int, help="cached tokens attended to (default 128)"),
        click.option("--prompt-len", "prompt_len", type=int, help="prefill prompt length (default 512)"),
        click.option("--layers", type=int, help="layers to place (default: all)"),
        click.option("--token", type=int, help="token id looked up by the embedding (default 1)"),
        click.option("--expert-skew", "expert_skew", type=float,
                     help="MoE expert choice: 0 uniform (default), s > 0 Zipf-skewed popularity"),
        click.option("--moe-mapping", "moe_mapping", type=click.Choice(["auto", "local", "regions"]),
                     help="routed experts in the layer region (local), in expert regions (regions), or "
                          "local where it fits (auto, default)"),
        click.option("--experts-per-region", "experts_per_region", type=int,
                     help="expert regions hold at most this many routed experts (default: as many as fit)"),
        click.option("--slot-shape", "slot_shape", type=click.Choice(["tall", "square"]),
                     help="layer slots: tall P x Q regions of the largest area (default) or square P x P"),
        click.option("--weights", help="linear weights: bf16, fp8, int8 or int4 (default: the model's "
                                       "published checkpoint)"),
        click.option("--attention", type=click.Choice(["flash", "classic"]),
                     help="decode attention: blocked with an online softmax (flash, default) or classic"),
        click.option("--flash-blocks", "flash_blocks", type=click.Choice(["auto", "overlapped", "serial"]),
                     help="flash: a block's score reduction overlapping the previous block's softmax "
                          "(overlapped), each block in turn (serial), or auto (default): overlapped where "
                          "its second score buffer fits"),
        click.option("--attention-block", "attention_block", type=int,
                     help="flash: cached tokens per block and column (default: automatic)"),
        click.option("--mla-groups", "mla_groups", type=int,
                     help="latent attention: the layer region's rows in N groups, each attending its own share "
                          "of the context over every latent dim (default 1)"),
        click.option("--norms", type=click.Choice(["fused", "separate"]),
                     help="RMSNorm sums in the next GEMV's all-reduce (fused, default) or their own"),
        click.option("--dense-ffn", "dense_ffn", type=click.Choice(["auto", "layer", "region"]),
                     help="a dense layer's FFN in its layer region, in a slot of its own after it, or auto "
                          "(default): its own where a MoE model's routed experts are in expert regions"),
        click.option("--tables", type=click.Choice(["auto", "slots", "strips"]),
                     help="the embedding and LM head in slots beside the layers, in strips as wide as the mesh, "
                          "or auto (default): strips only where slots place nothing"),
        click.option("--down-gemv", "down_gemv", type=click.Choice(["auto", "axpy", "dot"]),
                     help="the FFN's down GEMV: a FMAC per input element (axpy), a DOT per output element "
                          "(dot), or whichever is fewer cycles (auto, default)"),
        click.option("--gemv-form", "gemv_form", type=click.Choice(["auto", "axpy", "dot"]),
                     help="the other weight GEMVs (QKV, O, router, gate/up, latent attention's W_a, W_qb, W_o) "
                          "and low-precision down tiles under --down-gemv auto: as --down-gemv (default axpy)"),
        click.option("--handoff", type=click.Choice(["fused", "barrier"]),
                     help="a region's hand-off: its sync nested in the FFN's down all-reduce (fused, default) "
                          "or a region-wide barrier of its own"),
        click.option("--heads", type=int, help="attention heads (--op attention)"),
        click.option("--kv-heads", "kv_heads", type=int, help="KV heads (--op attention)"),
        click.option("--head-dim", "head_dim", type=int, help="head dimension (--op attention)"),
        click.option("--elements", type=int, help="vector length (--op allreduce)"),
        click.option("--axis", type=click.Choice(["x", "y"]), help="all-reduce axis (--op allreduce)"),
    ]):
        fn = opt(fn)
    return fn


def _workload_kw(kw: dict) -> dict:
    from .workload.jobs import parse_region
    out = {k: v for k, v in kw.items() if v is not None}
    if "region" in out:
        out["region"] = parse_region(out["region"])
    for k in ("m", "n", "k", "groups", "batch", "context", "prompt_len", "layers", "heads", "kv_heads",
              "head_dim", "elements"):
        if k in out and out[k] < 1:
            raise WseError(f"--{k.replace('_', '-')} must be positive")
    return out


@trace_group.command("gen")
@_workload_options
@_config_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="trace file to write")
@_clean_errors
def gen_cmd(op, model, phase, wafer, config_file, sets, output, **kw) -> None:
    """Write the trace of a kernel (--op) or of a model step (--model) for a wafer."""
    from .workload import jobs

    check_output(output, [config_file])
    cfg = hardware.resolve(wafer, config_file, sets)
    kw = _workload_kw(kw)
    if bool(op) == bool(model):
        raise WseError("give exactly one of --op and --model")
    if op:
        tr, _ = jobs.kernel_trace(op, cfg, **kw)
        validate(tr, cfg, where=f"--op {op}")
        tr.save(output)
        click.echo(f"wrote {output}: {op} on {tr.mesh_width}x{tr.mesh_height} PEs, {len(tr.prog_start):,} programs")
        return
    if phase == "prefill":
        written = jobs.prefill_traces(model, cfg, output, **kw)
        for path, tr in written:
            click.echo(f"wrote {path}: {tr.meta.get('kernel', 'kernel')} on {tr.mesh_width}x{tr.mesh_height} PEs")
        return
    tr, plan = jobs.model_trace(model, cfg, phase, **kw)
    validate(tr, cfg, where=f"--model {model}")
    tr.save(output)
    click.echo(f"wrote {output}: {model} decode step, {len(plan.slots)} regions of {plan.P}x{plan.P} slots, "
               f"{tr.mesh_width}x{tr.mesh_height} PEs, {len(tr.prog_start):,} programs")


@cli.command("models")
@_clean_errors
def models_cmd() -> None:
    """List the model specs with their sizes and parameter counts."""
    from .workload.models import load_model, model_names
    click.echo(f"{'model':15} {'layers':>6} {'hidden':>6} {'heads':>7} {'ffn':>6} {'experts':>9} "
               f"{'params':>9} {'active':>8} {'weights':>9}  precisions (--weights)")
    from .workload.precision import published
    for name in model_names():
        m = load_model(name)
        experts = f"{m.moe.experts_per_token}/{m.moe.experts}" + (f"+{m.moe.shared_experts}" if m.moe.shared_experts else "") \
            if m.moe else "-"
        click.echo(f"{name:15} {m.layers:>6} {m.hidden_size:>6} {m.heads:>4}/{m.kv_heads:<2} {m.ffn_size:>6} "
                   f"{experts:>9} {_count(m.total_params()):>9} {_count(m.active_params()):>8} "
                   f"{m.weight_bytes() / 1e9:>7.1f}GB  {', '.join(dict.fromkeys(published(m) + ('bf16',)))}")


def _count(n: int) -> str:
    return f"{n / 1e12:.2f}T" if n >= 1e12 else f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


class _Progress:
    """The engine's progress on a terminal (click's progress bar): share of the trace's ops
    done, with cycles and rate beside it and an ETA. Callers enable it on terminals only."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.text = ""
        self.t0 = time.perf_counter()

    def __call__(self, cycles: int, fraction: float) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.t0 = time.perf_counter()
            self.bar = click.progressbar(length=1000, label="  ops", file=sys.stderr, width=20, show_eta=True,
                                         show_percent=True, item_show_func=lambda _: self.text)
        wall = time.perf_counter() - self.t0
        self.text = f"{cycles:,} cycles  {cycles / wall / 1e3 if wall > 0 else 0.0:,.1f} kcycles/s"
        step = int(1000 * min(max(fraction, 0.0), 1.0)) - self.bar.pos
        if step > 0:
            self.bar.make_step(step)
        self.bar.render_progress()

    def clear(self) -> None:
        if self.bar is not None:
            click.echo("\r" + " " * 100 + "\r\x1b[?25h", nl=False, err=True)  # the cursor the bar hid
            self.bar = None


def _placeholder(tr, cfg):
    """An empty, incomplete result: what the run file holds before anything is measured."""
    import numpy as np

    from .engine.result import EngineResult
    return EngineResult(0, isa.STOP_RUNNING,
                        np.zeros((tr.mesh_height, tr.mesh_width, isa.N_PE_COUNTERS), np.int64),
                        np.zeros((tr.mesh_height, tr.mesh_width, 4, isa.N_LINK_COUNTERS), np.int64))


def _functional_options(fn):
    for opt in reversed([
        click.option("--inputs", type=click.Path(dir_okay=False),
                     help="functional: an .npz with one array per input and weight tensor (default: seeded "
                          "N(0, 1), weight matrices N(0, 1/fan_in))"),
        click.option("--seed", type=int, help="functional: seed of the inputs (default 0)"),
        click.option("--tolerance", type=float,
                     help="functional: largest output error over the largest reference magnitude (default 0.05)"),
    ]):
        fn = opt(fn)
    return fn


@cli.command("run")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), help="trace file")
@_workload_options
@click.option("--full", is_flag=True, help="simulate every region of a model in one trace (default: compose stages)")
@click.option("--functional", is_flag=True, help="also compute values (needs a trace with /tensors: kernels gemv, "
                                                 "gemm, allreduce; `wse check --model` for decode layers) and check "
                                                 "them against numpy")
@_functional_options
@_config_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="run file to write")
@click.option("--threads", type=int, help="Numba threads (default: all cores)")
@click.option("--snapshot-seconds", type=float, default=30.0, show_default=True,
              help="rewrite the (incomplete) run file this often while a trace runs")
@click.option("--quiet", is_flag=True, help="print nothing but errors")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@_clean_errors
def run_cmd(trace_path, op, model, phase, full, functional, inputs, seed, tolerance, wafer, config_file, sets,
            output, threads, snapshot_seconds, quiet, as_json, **kw) -> None:
    """Simulate a trace, a kernel (--op) or a model step (--model) and write the run file."""
    if sum(bool(v) for v in (trace_path, op, model)) != 1:
        raise WseError("give exactly one of --trace, --op and --model")
    check_output(output, [trace_path, config_file, inputs])
    if not functional and (inputs, seed, tolerance) != (None, None, None):
        raise WseError("--inputs, --seed and --tolerance need --functional")
    _simulate_to_file(trace_path, op, model, phase, full, hardware.resolve(wafer, config_file, sets), output,
                      threads, snapshot_seconds, quiet, as_json, kw,
                      _functional_run(model, inputs, seed, tolerance) if functional else None)


def _functional_run(model, inputs, seed, tolerance):
    from .results.functional import FP16_TOLERANCE, FunctionalRun
    if model:
        raise WseError("--functional: a model step's trace (embedding, layers, LM head, lanes) records no /tensors "
                       "table; `wse check --model` checks its decode layers one by one")
    return FunctionalRun(inputs, seed or 0, FP16_TOLERANCE if tolerance is None else tolerance)


@cli.command("replay")
@click.argument("trace_path", type=click.Path(dir_okay=False))
@_config_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="run file to write")
@click.option("--threads", type=int, help="Numba threads (default: all cores)")
@click.option("--quiet", is_flag=True, help="print nothing but errors")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@_clean_errors
def replay_cmd(trace_path, wafer, config_file, sets, output, threads, quiet, as_json) -> None:
    """Rerun a saved TRACE_PATH on another configuration (e.g. --set fabric.hop_latency_cycles=1)."""
    check_output(output, [trace_path, config_file])
    _simulate_to_file(trace_path, None, None, "decode", False, hardware.resolve(wafer, config_file, sets), output,
                      threads, 30.0, quiet, as_json, {})


def _simulate_to_file(trace_path, op, model, phase, full, cfg, output, threads, snapshot_seconds, quiet, as_json,
                      kw, fn=None) -> None:
    """Shared body of `run` and `replay`: placeholder file, simulation, final file, summary."""
    from .engine.run import simulate
    from .results.report import format_job, format_summary
    from .results.store import RunInfo, read_run, summary_values, write_run
    from .workload import jobs

    if threads is not None and threads < 1:
        raise WseError("--threads must be at least 1")
    if not 0 < snapshot_seconds < float("inf"):
        raise WseError(f"--snapshot-seconds {snapshot_seconds}: must be a finite number of seconds above 0")
    bar = _Progress(not quiet and not as_json and sys.stderr.isatty())
    job = None
    info = RunInfo(trace_path="", trace_hash="", trace_mesh=(0, 0), threads=0, wall_seconds=0.0)

    def sim(tr, snapshot=None, fkw=None):
        fkw = fkw if fkw is not None else fn.prepare(tr, source) if fn else {}
        res = simulate(tr, cfg, threads=threads, progress=bar, validated=True, snapshot=snapshot,
                       snapshot_seconds=snapshot_seconds, **fkw)
        bar.clear()
        if res.stop == isa.STOP_INTERRUPTED and job is not None:
            raise KeyboardInterrupt
        return res

    source = f"--trace {trace_path}" if trace_path else f"--op {op}"
    if trace_path:
        tr = trace_mod.load(trace_path)
        validate(tr, cfg, where=trace_path)
        fkw = fn.prepare(tr, source) if fn else {}  # (bad inputs are found before the file is touched)
        info = RunInfo(str(trace_path), tr.content_hash(), (tr.mesh_width, tr.mesh_height), 0, 0.0)
        write_run(output, _placeholder(tr, cfg), cfg, info)  # replaces any old file: readable, incomplete

        def snapshot(res):
            write_run(output, res, cfg, dataclasses.replace(info, threads=res.threads, wall_seconds=res.wall_seconds))
        res = sim(tr, snapshot, fkw)
        source = str(trace_path)
    else:
        kw = _workload_kw(kw)
        job = True  # interruption inside a job's simulations ends the job
        what = "whole trace" if full else "a layer stage" if phase == "decode" else "its longest kernel"
        source = f"--op {op}" if op else f"--model {model} ({phase}; counters of {what})"
        try:
            if op:
                job = jobs.run_kernel(op, cfg, sim, **kw)
            else:
                job = jobs.run_model(model, cfg, sim, phase=phase, full=full, **kw)
        except KeyboardInterrupt:  # the run started: an older file at -o must not stand for it
            claim(output)          # (bad input found while planning leaves it as it was)
            raise
        tr, res = job.trace, job.engine
    info = RunInfo(trace_path=source, trace_hash=tr.content_hash(), trace_mesh=(tr.mesh_width, tr.mesh_height),
                   threads=res.threads, wall_seconds=res.wall_seconds)
    figures = job.figures if job else None
    tables = {"stages": job.stages} if job and job.stages else {}
    checks = None
    if fn and res.complete:
        checks, more, figs = fn.finish(tr, res)
        tables.update(more)
        figures = {**(figures or {}), **figs}
    write_run(output, res, cfg, info, extra=figures, tables=tables or None)
    if as_json:
        import json
        data = {k: v[0] for k, v in summary_values(res, cfg).items()}
        data.update({k: v[0] for k, v in (figures or {}).items()})
        click.echo(json.dumps({"file": output, "complete": res.complete, "stop_reason": res.stop_name,
                               "summary": data}, default=_json_default))
    elif not quiet:
        rf = read_run(output)
        click.echo(format_summary(rf.summary, cfg, rf.attrs))
        if figures:
            click.echo(format_job({k: v[0] for k, v in figures.items()}, cfg))
        if checks is not None:
            from .results.functional import format_checks
            click.echo(format_checks(checks, res.raced))
        click.echo(f"wrote {output}" + ("" if res.complete else " (marked incomplete)"))
    if res.stop == isa.STOP_INTERRUPTED:
        click.echo("interrupted: the run file holds what was measured, marked incomplete", err=True)
        sys.exit(130)
    if not res.complete:
        click.echo(f"error: run stopped ({res.stop_name}) after {res.total_cycles:,} cycles", err=True)
        for line in res.stuck:
            click.echo(f"  {line}", err=True)
        sys.exit(EXIT_INCOMPLETE)


def _json_default(v):
    import numpy as np
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


from . import cli_analysis, cli_check, cli_serve, cli_system  # noqa: E402,F401  (register the other commands)


def main() -> None:
    """Console entry point."""
    cli(prog_name="wse")


if __name__ == "__main__":  # run as a script: the commands are registered on the package's module
    from wse.cli import main as _main
    _main()
