"""`wse serve`: a request stream served by a wafer system and by GPU nodes (docs/serving.md).
Registered on the `wse` group by cli.py."""
from __future__ import annotations

import time

import click

from .cli import _clean_errors, cli
from .cli_system import _cache_line, _fanout, _fanout_options, _in_process, _placement_options
from .errors import WseError
from .files import check_output, claim


def _numbers(text: str | None, option: str, kind: type = int) -> list:
    if not text:
        return []
    try:
        out = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise WseError(f"{option} {text!r}: expected comma-separated numbers") from None
    if any(not v > 0 for v in out):
        raise WseError(f"{option} {text!r}: every value must be positive")
    return out


@cli.command("serve")
@click.option("--model", required=True, help="model name (wse models)")
@click.option("--system", "system_name", default="cs3x4", show_default=True, help="system preset or TOML file")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="override a system or wafer value")
@click.option("--wafers", default="auto", show_default=True, help="wafers: a number, 'auto' or 'preset'")
@click.option("--batch", type=int, default=1, show_default=True, help="sequences per micro-batch on the wafers")
@click.option("--context", type=int, default=0, show_default=True,
              help="tokens the wafers' KV layout is planned for (0: the longest request, rounded up)")
@click.option("--rate", type=float, help="requests per second (with --duration); or give --requests")
@click.option("--arrivals", default="poisson", show_default=True, help="poisson, or gamma:CV (bursty for CV > 1)")
@click.option("--requests", "requests_file", type=click.Path(dir_okay=False),
              help="CSV of requests: arrival_s, prompt_tokens, output_tokens")
@click.option("--prompt-len", default="512", show_default=True,
              help="prompt tokens: N, uniform:LO:HI, normal:MEAN:SD, lognormal:MEAN:SD or exp:MEAN")
@click.option("--output-len", default="256", show_default=True, help="output tokens, as --prompt-len")
@click.option("--duration", type=float, default=60.0, show_default=True, help="seconds of arrivals")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--slo-ttft", type=float, default=1.0, show_default=True, help="time to first token target (s)")
@click.option("--slo-tpot", type=float, default=0.05, show_default=True, help="time per output token target (s)")
@click.option("--gpu", type=click.Choice(["h100", "h200", "b200"]), default="h100", show_default=True)
@click.option("--nodes", type=int, default=0, show_default=True,
              help="GPU nodes (0: the fewest holding the weights and the KV of as many sequences as the wafers)")
@click.option("--gpu-tp", type=click.Choice(["1", "2", "4", "8"]), default="8", show_default=True,
              help="GPU tensor parallelism: GPUs of a node in one model replica (pipeline stages across them)")
@click.option("--weights", help="linear weights: bf16, fp8, int8 or int4 (default: the published checkpoint)")
@click.option("--prefill-prompts", help="prompt lengths whose prefill is simulated and fitted (default: the median)")
@click.option("--prefill-checks", help="prompt lengths simulated to measure the prefill fit's error")
@click.option("--prefill-steps", type=int, default=16, show_default=True,
              help="simulate each prefill GEMM for its first N/2 and N steps and extrapolate (0: every step)")
@click.option("--prefill-chunk", type=int, default=0, show_default=True,
              help="chunked prefill, both sides: prompt tokens per chunk (wafers) / per iteration (GPUs); 0 whole prompts")
@click.option("--prefill-wafers", default="0", show_default=True,
              help="separate prefill wafers, the KV handed to the decode wafers: N, or auto (the fewest that hold "
                   "the model); 0 prefill on the decode wafers")
@click.option("--sharing-check", type=int, default=0, show_default=True,
              help="also simulate N micro-batches back to back through the busiest wafer, against the pipeline "
                   "model (0: not)")
@click.option("--gpu-max-seqs", type=int, default=256, show_default=True, help="GPU: sequences per iteration")
@click.option("--gpu-max-prefill-tokens", type=int, default=8192, show_default=True,
              help="GPU: prompt tokens per prefill iteration")
@click.option("--curve", default="0.25,0.5,1,1.5,2", show_default=True,
              help="also serve at these multiples of --rate (latency-throughput curve; '' for none)")
@click.option("--sensitivity", is_flag=True, help="sweep every assumed energy and cost input by +-50%")
@click.option("--attention", type=click.Choice(["flash", "classic"]), default="flash", show_default=True)
@click.option("--norms", type=click.Choice(["fused", "separate"]), default="fused", show_default=True)
@click.option("--uniform-slots", is_flag=True, help="every wafer on one slot shape")
@click.option("--slot-shape", type=click.Choice(["tall", "square"]), default="tall", show_default=True,
              help="layer slots: tall P x Q regions of the largest area, or square P x P")
@_placement_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="run file to write")
@_fanout_options
@_clean_errors
def serve_cmd(model, system_name, sets, wafers, batch, context, rate, arrivals, requests_file, prompt_len, output_len,
              duration, seed, slo_ttft, slo_tpot, gpu, nodes, gpu_tp, weights, prefill_prompts, prefill_checks, prefill_steps, prefill_chunk, prefill_wafers, sharing_check, gpu_max_seqs,
              gpu_max_prefill_tokens, curve, sensitivity, attention, norms, uniform_slots, slot_shape, moe_mapping,
              dense_ffn, tables, output, jobs, scheduler, threads, cache_dir, no_cache, quiet, log_every) -> None:
    """Serve a request stream on a wafer system and on GPU nodes: TTFT, TPOT, goodput, J/token, $/Mtok."""
    from .serving import requests as R
    from .serving.serve import check_slos, run_serve
    from .serving.store import write_serve
    from .system.config import load_system
    from .system.compare import check_options

    inputs = [system_name, model] + ([requests_file] if requests_file else [])
    check_output(output, inputs)
    check_slos(slo_ttft, slo_tpot)
    for name, v in (("--batch", batch), ("--gpu-max-seqs", gpu_max_seqs),
                    ("--gpu-max-prefill-tokens", gpu_max_prefill_tokens)):
        if v < 1:
            raise WseError(f"{name} {v} must be at least 1")
    if nodes < 0 or context < 0:
        raise WseError("--nodes and --context must be at least 0 (0: automatic)")
    multiples = _numbers(curve, "--curve", float)
    if prefill_chunk < 0:
        raise WseError(f"--prefill-chunk {prefill_chunk} must be at least 0 (0: whole prompts)")
    if sharing_check and sharing_check < 2:
        raise WseError(f"--sharing-check {sharing_check}: 0 (off) or at least 2 micro-batches")
    if prefill_steps != 0 and prefill_steps < 4:
        raise WseError(f"--prefill-steps {prefill_steps}: 0 (every step) or at least 4")
    if requests_file:
        if rate is not None:
            raise WseError("give either --rate or --requests, not both")
        req = R.read_requests(requests_file)
        multiples, regen = [], None
    else:
        if rate is None:
            raise WseError("give --rate (requests per second) or --requests FILE")
        arr = R.parse_arrivals(arrivals, rate)
        p, o = R.parse_length(prompt_len, "--prompt-len"), R.parse_length(output_len, "--output-len")
        req = R.generate(arr, p, o, duration, seed)

        def regen(k: float):
            return R.generate(R.Arrivals(arr.rate_per_s * k, arr.cv), p, o, duration, seed)
    if wafers == "cheapest":
        raise WseError("--wafers cheapest is wse system's (it simulates the fewest wafers first); wse serve takes "
                       "a number, 'auto' or 'preset'")
    system = load_system(system_name, sets)
    kw = check_options(system, model=model, wafers=wafers, batch=batch, context=max(context, 1), prompt_len=0,
                       gpu=gpu, weights=weights, attention=attention, norms=norms, uniform_slots=uniform_slots,
                       slot_shape=slot_shape, moe_mapping=moe_mapping, dense_ffn=dense_ffn, tables=tables)
    cfg = system.wafer_config
    t0 = time.perf_counter()
    with _fanout(jobs, scheduler, threads, cache_dir, no_cache, quiet, log_every) as fanout:
        def note(msg: str) -> None:
            if not quiet:
                fanout.progress.clear()
                click.echo(msg, err=True)
        try:
            job = run_serve(model, system, _in_process(threads, quiet, fanout)(cfg), req, fanout=fanout,
                            wafers=kw["wafers"], batch=batch, context=context or None, gpu=gpu, nodes=nodes or None, gpu_tp=int(gpu_tp),
                            weights=weights, slo_ttft_s=slo_ttft, slo_tpot_s=slo_tpot,
                            prefill_prompts=_numbers(prefill_prompts, "--prefill-prompts"),
                            prefill_checks=_numbers(prefill_checks, "--prefill-checks"), gpu_max_seqs=gpu_max_seqs,
                            gpu_max_prefill_tokens=gpu_max_prefill_tokens, curve=multiples, regenerate=regen,
                            sensitivity=sensitivity, note=note, prefill_steps=prefill_steps, prefill_chunk=prefill_chunk,
                            prefill_wafers=prefill_wafers, sharing_check=sharing_check,
                            attention=attention, norms=norms,
                            uniform_slots=uniform_slots, slot_shape=slot_shape, moe_mapping=moe_mapping,
                            dense_ffn=dense_ffn, tables=tables)
        except KeyboardInterrupt:
            claim(output)
            raise
        fanout.progress.clear()
        write_serve(output, job, cfg, fanout.worker_threads(), time.perf_counter() - t0, model, system.name)
        if not quiet:
            from .serving.store import format_serve
            click.echo(format_serve(job))
            _cache_line(fanout)
            click.echo(f"wrote {output}")
