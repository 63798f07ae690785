"""`wse check`: run a kernel (or a trace with /tensors) functionally and compare every output with
its numpy reference (docs/model.md, "Values"). Registered on the `wse` group by cli.py.

Exit codes: 0 every output within tolerance; 1 an output is wrong, its copies disagree, or values
depend on the schedule (a race); 2 bad input; 3 the run did not complete.
"""
from __future__ import annotations

import sys

import click

from . import hardware
from . import trace as trace_mod
from .cli import EXIT_INCOMPLETE, _clean_errors, _config_options, _functional_options, _workload_kw, \
    _workload_options, cli
from .errors import WseError
from .trace_check import validate

EXIT_WRONG = 1


@cli.command("check")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), help="trace file with a /tensors table")
@_workload_options
@_functional_options
@_config_options
@click.option("--full", is_flag=True, help="--model: the whole decode step in one trace (embedding, layers, LM head, "
                                           "lanes), not each layer alone")
@click.option("--wafers", type=int, help="--full: the model split over this many wafers of --wafer as `wse system` "
                                         "splits it (whole layers; with --moe-mapping regions at routed experts), "
                                         "each wafer's share checked alone")
@click.option("--threads", type=int, help="Numba threads (default: all cores)")
@_clean_errors
def check_cmd(trace_path, op, model, phase, inputs, seed, tolerance, wafer, config_file, sets, full, wafers, threads,
              **kw) -> None:
    """Run a kernel (--op gemv | gemm | allreduce | attention), a model's decode layers (--model;
    --phase prefill: one layer's prefill kernels) or a trace functionally and check its outputs."""
    from .engine.run import simulate
    from .results.functional import FP16_TOLERANCE, FunctionalRun, format_checks
    from .workload import jobs

    if sum(bool(v) for v in (trace_path, op, model)) != 1:
        raise WseError("give exactly one of --trace, --op and --model")
    if model and phase == "prefill" and full:
        raise WseError("--full checks a model's decode step (--phase prefill checks one layer's prefill kernels)")
    if threads is not None and threads < 1:
        raise WseError("--threads must be at least 1")
    cfg = hardware.resolve(wafer, config_file, sets)
    fn = FunctionalRun(inputs, seed or 0, FP16_TOLERANCE if tolerance is None else tolerance)
    if full and not model:
        raise WseError("--full checks a model's decode step: give --model")
    if wafers is not None and not full:
        raise WseError("--wafers splits a model's whole step: give --model and --full")
    widen = False
    if model and phase == "prefill":  # one layer's prefill kernels, each alone
        traces = jobs.prefill_check_traces(model, cfg, **_workload_kw(kw))
    elif model and full:  # the whole step: every region and lane in one trace
        traces = jobs.step_check_traces(model, cfg, wafers, **_workload_kw(kw))
        widen = True  # a share continuing a layer's experts: its stand-in lies a slot west of the wafer
    elif model:  # every decode layer (or the first --layers), each on one layer region
        traces = jobs.layer_check_traces(model, cfg, **_workload_kw(kw))
    else:
        where = trace_path or f"--op {op}"
        traces = [(where, trace_mod.load(trace_path) if trace_path
                   else jobs.kernel_trace(op, cfg, **_workload_kw(kw))[0])]
    wrong = False
    for where, tr in traces:
        run_cfg = cfg
        if widen and (tr.mesh_width > cfg.mesh_width or tr.mesh_height > cfg.mesh_height):
            run_cfg = cfg.with_overrides([f"wafer.mesh_width={max(tr.mesh_width, cfg.mesh_width)}",
                                          f"wafer.mesh_height={max(tr.mesh_height, cfg.mesh_height)}"])
        validate(tr, run_cfg, where=where)
        res = simulate(tr, run_cfg, threads=threads, validated=True, **fn.prepare(tr, where))
        if not res.complete:
            click.echo(f"error: {where}: the run stopped ({res.stop_name}) after {res.total_cycles:,} cycles",
                       err=True)
            sys.exit(EXIT_INCOMPLETE)
        rows, _, _ = fn.finish(tr, res)
        click.echo(f"{where}: {tr.mesh_width}x{tr.mesh_height} PEs, {res.total_cycles:,} cycles, inputs "
                   + (inputs if inputs else f"seeded normal (seed {seed or 0})"))
        click.echo(format_checks(rows, res.raced))
        wrong = wrong or bool(res.raced) or not all(r.ok for r in rows)
    if wrong:
        sys.exit(EXIT_WRONG)
