"""Speed and memory benchmarks (`wse bench`, tools/bench_*.py): the figures docs/performance.md
defines, each measured in a fresh process so its peak memory is its own.

Benchmarks (--quick shrinks each to a smoke-test size):
  dense     `neighbor` traffic on a 256x256 region of wse3: PE-cycles per wall second
  wse3      `neighbor` traffic on the whole wse3 mesh: PE-cycles/s and peak memory
  layer     one llama3.1-8b decode layer on wse3 (a stage trace): simulated PE-cycles/s
  token8b   a whole llama3.1-8b decode token on one wse3, composed: wall seconds
  token70b  llama3.1-70b at its per-wafer share of layers, composed: wall seconds
  jit       cold JIT compile (empty cache) and warm start (cached), process start to finish
  stage     the largest stage of kimi-k2 (fp8) wafer 4 on its fewest CS-3 (uniform slots), on one thread
            as a `wse system` worker runs it: simulated PE-cycles per wall second
  system    `wse system` for kimi-k2 on the fewest CS-3 (uniform slots, --jobs 2, no TTFT), empty stage
            cache: wall seconds from process start, planning and every stage simulation included
  functional  the values of a gemv 8192x8192 and of a tiny-model decode layer on a 128x128 region
            (docs/model.md, "Values"): the dataflow evaluator's two schedules, wall seconds and
            element-ops per second, peak memory

Every `wse bench` run appends one JSON line (figures, machine, commit, date) to a history
file and compares against the last comparable line, so regressions show.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import WseError

NAMES = ("dense", "wse3", "layer", "token8b", "token70b", "jit", "stage", "system", "functional")
# Figures compared against the previous history line: (benchmark, key, higher is better).
HEADLINE = (("dense", "pe_cycles_per_s", True), ("wse3", "pe_cycles_per_s", True),
            ("layer", "pe_cycles_per_s", True), ("token8b", "wall_s", False), ("token70b", "wall_s", False),
            ("jit", "warm_start_s", False), ("stage", "pe_cycles_per_s", True), ("system", "wall_s", False),
            ("functional", "wall_s", False))
REGRESSION = 0.15  # a headline figure this much worse than last time is flagged
TINY_RUN = (
    "from wse import hardware; from wse.workload import synthetic as s; "
    "from wse.engine.run import simulate; c = hardware.load_preset('tiny'); "
    "simulate(s.neighbor(8, 8, 16), c, parallel=False); "
    "simulate(s.neighbor(8, 8, 16), c, parallel=True)"
)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _warm_kernels() -> None:
    """Load (or compile) both kernels so JIT time stays out of timed runs."""
    from . import hardware
    from .engine.run import simulate
    from .workload import synthetic
    c = hardware.load_preset("tiny")
    simulate(synthetic.neighbor(8, 8, 8), c, parallel=False)
    simulate(synthetic.neighbor(8, 8, 8), c, parallel=True)


def bench_neighbor(wafer: str, mesh: tuple[int, int] | None, wavelets: int, colors: int = 4,
                   repeat: int = 1) -> dict[str, Any]:
    """`neighbor` traffic (every PE streams to its east neighbour): best of `repeat` runs."""
    import numba

    from . import hardware
    from .engine.run import simulate
    from .workload import synthetic
    cfg = hardware.load_preset(wafer)
    w, h = mesh or (cfg.mesh_width, cfg.mesh_height)
    _warm_kernels()
    t0 = time.perf_counter()
    trace = synthetic.neighbor(w, h, wavelets, colors)
    build = time.perf_counter() - t0
    best = None
    for _ in range(repeat):
        r = simulate(trace, cfg, parallel=True)
        if not r.complete:
            raise WseError(f"benchmark run stopped: {r.stop_name}")
        if best is None or r.wall_seconds < best.wall_seconds:
            best = r
    return {"wafer": wafer, "mesh": f"{w}x{h}", "pes": w * h, "cycles": best.total_cycles,
            "wall_s": best.wall_seconds, "build_s": build, "pe_cycles_per_s": w * h * best.total_cycles / best.wall_seconds,
            "stepped_fraction": best.stepped_pe_cycles / max(1, w * h * best.total_cycles),
            "threads": numba.get_num_threads(), "trace_mb": _trace_mb(trace)}


def _trace_mb(trace) -> float:
    n = sum(a.nbytes for a in trace.routes.values()) + sum(a.nbytes for a in trace.ops.values())
    return (n + trace.pe_program.nbytes) / 2**20


def _plan(model: str, wafer: str, context: int, share: bool):
    """The decode plan; with share=True one wafer's share when the model is split over the
    fewest wafers that hold it (system/wafers.py): a middle wafer's layers when there is one."""
    from . import hardware
    from .workload.decode import plan_model
    from .workload.params import DecodeParams
    from .workload.models import load_model
    cfg = hardware.load_preset(wafer)
    spec = load_model(model)
    # the figures' history was measured on square slots with the classic attention and separate norms
    params = DecodeParams(context=context, slot_shape="square", attention="classic", norms="separate")
    if not share:
        return cfg, plan_model(spec, cfg, params)
    from .system.config import load_system
    from .system.wafers import fewest_wafers, wafer_plans
    system = load_system("cs3", [f'system.wafer="{wafer}"'])
    plans = wafer_plans(spec, system, params, fewest_wafers(spec, system, params))
    return cfg, plans[1] if len(plans) > 2 else plans[0]


def bench_layer(model: str, wafer: str, context: int) -> dict[str, Any]:
    """One decode layer: the first stage trace in which a layer region runs its whole step."""
    from .engine.run import simulate
    from .workload.stages import stage_S
    cfg, plan = _plan(model, wafer, context, False)
    _warm_kernels()
    k = next(i for i, s in enumerate(plan.slots[:-1]) if s.kind == "layer")
    t0 = time.perf_counter()
    stage = stage_S(plan, k)
    build = time.perf_counter() - t0
    r = simulate(stage.trace, cfg)
    pe_cycles = stage.trace.n_pes * r.total_cycles
    return {"model": model, "wafer": wafer, "slot": plan.P, "pes": stage.trace.n_pes, "cycles": r.total_cycles,
            "wall_s": r.wall_seconds, "build_s": build, "pe_cycles_per_s": pe_cycles / r.wall_seconds,
            "stepped_fraction": r.stepped_pe_cycles / max(1, pe_cycles)}


def bench_token(model: str, wafer: str, context: int, share: bool) -> dict[str, Any]:
    """A whole decode token, composed from its distinct stages; wall includes trace builds."""
    from .engine.run import simulate
    from .workload.compose import compose
    cfg, plan = _plan(model, wafer, context, share)
    _warm_kernels()
    sim_wall, pe_cycles = 0.0, 0

    def sim(t):
        nonlocal sim_wall, pe_cycles
        r = simulate(t, cfg)
        sim_wall += r.wall_seconds
        pe_cycles += t.n_pes * r.total_cycles
        return r

    t0 = time.perf_counter()
    d = compose(plan, sim)
    wall = time.perf_counter() - t0
    return {"model": model, "wafer": wafer, "layers": plan.n_layers, "slot": plan.P, "token_cycles": d.total_cycles,
            "tokens_per_s": cfg.clock_hz / d.total_cycles, "simulations": d.simulations, "wall_s": wall,
            "sim_wall_s": sim_wall, "pe_cycles_per_s": pe_cycles / sim_wall if sim_wall else 0.0}


def _timed_subprocess(code: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return time.perf_counter() - t0


def bench_jit() -> dict[str, Any]:
    """Cold compile: a fresh process and an empty Numba cache running a tiny trace through both
    kernels. Warm start: the same with the cache filled (best of 3)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        cold = _timed_subprocess(TINY_RUN, env)
        warm = min(_timed_subprocess(TINY_RUN, env) for _ in range(3))
    return {"cold_compile_s": cold, "warm_start_s": warm}


def bench_stage(model: str, system_name: str, weights: str | None, wafer: int) -> dict[str, Any]:
    """The stage of most PEs among a wafer's distinct stages (the fewest wafers that hold the
    model, uniform slots: `wse system --wafers auto --uniform-slots`), simulated on one Numba
    thread with a pool worker's options: the stages that dominate a big system run."""
    import numba

    from .engine.run import simulate, stage_options
    from .system.config import load_system
    from .system.wafers import fewest_wafers, wafer_plans
    from .workload.compose import build_stage, stages
    from .workload.models import load_model
    from .workload.params import DecodeParams
    system, spec = load_system(system_name, []), load_model(model)
    params = DecodeParams(weights=weights, uniform_slots=True)
    plans = wafer_plans(spec, system, params, fewest_wafers(spec, system, params))
    plan = plans[min(wafer, len(plans) - 1)]
    t0 = time.perf_counter()
    built = [build_stage(plan, kind, ref) for _, kind, ref in stages(plan)]
    st = max(built, key=lambda s: s.trace.n_pes)
    build = time.perf_counter() - t0
    numba.set_num_threads(1)
    _warm_kernels()
    r = simulate(st.trace, system.wafer_config, threads=1, validated=True, **stage_options(1))
    pe_cycles = st.trace.n_pes * r.total_cycles
    return {"model": model, "weights": weights or "", "wafer": min(wafer, len(plans) - 1), "wafers": len(plans),
            "mesh": f"{st.trace.mesh_width}x{st.trace.mesh_height}", "pes": st.trace.n_pes,
            "cycles": r.total_cycles, "wall_s": r.wall_seconds, "build_s": build,
            "pe_cycles_per_s": pe_cycles / r.wall_seconds,
            "stepped_fraction": r.stepped_pe_cycles / max(1, pe_cycles)}


def bench_system(model: str, jobs: int) -> dict[str, Any]:
    """`wse system --model M --wafers auto --uniform-slots --jobs N --prompt-len 0` in a fresh
    process with an empty stage cache (a cold run): wall seconds, and the run's figures."""
    import h5py
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "system.h5"
        env = dict(os.environ, WSE_CACHE=str(Path(tmp) / "cache"))
        cmd = ["from wse.cli import cli; cli()", "system", "--model", model, "--wafers", "auto", "--uniform-slots",
               "--jobs", str(jobs), "--prompt-len", "0", "--quiet", "-o", str(out)]
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", *cmd], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise WseError(f"system benchmark failed: {(p.stderr.strip().splitlines() or ['no output'])[-1]}")
        with h5py.File(out) as f:
            rows = dict(zip((m.decode().strip() for m in f["system/metric"][:]), f["system/wafer_system"][:]))
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return {"model": model, "jobs": jobs, "wall_s": wall, "largest_process_mb": children_mb,
            "wafers": int(rows["chips"]),
            "tokens_per_s_per_user": float(rows["tokens/s per user"])}


def bench_functional(m: int, region: int) -> dict[str, Any]:
    """A gemv's values: inputs filled through /tensors, both schedules of the evaluator (the race
    check), outputs checked against numpy; wall seconds of the evaluation."""
    from . import hardware
    from .engine import functional
    from .results import functional as data
    from .workload.gemv import standalone
    from .workload.references import expected
    cfg = hardware.load_preset("wse3")
    functional.evaluate(standalone(16, 16, 4, 4, cfg)[0])  # compile (or load) outside the timing
    trace = standalone(m, m, region, region, cfg)[0]
    inputs = data.random_inputs(trace, 0)
    sram = data.fill(trace, inputs, functional.sram_extent(trace))
    t0 = time.perf_counter()
    v = functional.evaluate(trace, sram)
    wall = time.perf_counter() - t0
    rows = data.check(data.read_outputs(trace, v.sram), expected(trace, inputs))
    if v.raced or not all(r.ok for r in rows):
        raise WseError("functional benchmark: the gemv's outputs are wrong")
    element_ops = 2 * (m * m + m * region)  # both schedules: the FMACs, the column all-reduces' adds
    out = {"kernel": f"gemv {m}x{m} on {region}x{region}", "wall_s": wall,
           "element_ops_per_s": element_ops / wall, "max_error": max(r.error for r in rows)}
    return dict(out, **_functional_layer(cfg, region))


def _functional_layer(cfg, region: int) -> dict[str, Any]:
    """A tiny-model decode layer's values on a region x region slot: build, fill, evaluate."""
    from .engine import functional
    from .results import functional as data
    from .workload.layer_tensors import layer_trace
    from .workload.models import load_model
    from .workload.params import DecodeParams
    from .workload.references import expected
    t0 = time.perf_counter()
    trace = layer_trace(load_model("tiny"), 0, region, region, cfg, DecodeParams(context=2 * region))
    inputs = data.random_inputs(trace, 0)
    v = functional.evaluate(trace, data.fill(trace, inputs, functional.sram_extent(trace)))
    wall = time.perf_counter() - t0
    rows = data.check(data.read_outputs(trace, v.sram), expected(trace, inputs))
    if v.raced or not all(r.ok for r in rows):
        raise WseError("functional benchmark: the layer's outputs are wrong")
    return {"layer": f"tiny layer on {region}x{region}", "layer_wall_s": wall,
            "layer_max_error": max(r.error for r in rows)}


def run_one(name: str, quick: bool) -> dict[str, Any]:
    """One benchmark in this process."""
    if name == "dense":
        out = bench_neighbor("wse3", (64, 64) if quick else (256, 256), 200 if quick else 2000,
                             repeat=1 if quick else 3)
    elif name == "wse3":
        out = bench_neighbor("small" if quick else "wse3", None, 50 if quick else 300)
    elif name == "layer":
        out = bench_layer("tiny", "small", 12) if quick else bench_layer("llama3.1-8b", "wse3", 1024)
    elif name == "token8b":
        out = bench_token("tiny", "small", 12, False) if quick else bench_token("llama3.1-8b", "wse3", 1024, False)
    elif name == "token70b":
        out = (bench_token("tiny", "small", 12, True) if quick
               else bench_token("llama3.1-70b", "wse3", 1024, True))
    elif name == "jit":
        out = bench_jit()
    elif name == "stage":
        out = (bench_stage("tiny-moe", "cs3", None, 4) if quick
               else bench_stage("kimi-k2", "cs3x64", "fp8", 4))
    elif name == "system":
        out = bench_system("tiny-moe" if quick else "kimi-k2", 2)
    elif name == "functional":
        out = bench_functional(256, 16) if quick else bench_functional(8192, 128)
    else:
        raise WseError(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}")
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def run_isolated(name: str, quick: bool) -> dict[str, Any]:
    """One benchmark in a fresh process (its own peak memory); raises WseError on failure."""
    cmd = [sys.executable, "-m", "wse.bench", name] + (["--quick"] if quick else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise WseError(f"benchmark {name} failed: {last}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numba
    return {"cpus": os.cpu_count(), "cpu": model, "python": platform.python_version(), "numba": numba.__version__,
            "host": platform.node()}


def _commit() -> str:
    try:
        p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           cwd=Path(__file__).parent, timeout=5)
        return p.stdout.strip() if p.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def record(results: dict[str, Any], quick: bool, history: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Append this run to the history file; return (this entry, the last comparable entry)."""
    entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "commit": _commit(), "quick": quick, "machine": machine(), "results": results}
    previous = None
    if history.exists():
        for line in history.read_text().splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if e.get("quick") == quick and e.get("machine", {}).get("cpus") == entry["machine"]["cpus"]:
                previous = e
    history.parent.mkdir(parents=True, exist_ok=True)
    with history.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry, previous


def changes(entry: dict[str, Any], previous: dict[str, Any] | None) -> list[tuple[str, float, float, bool]]:
    """(figure, before, now, regressed) for headline figures present in both entries."""
    out = []
    if previous is None:
        return out
    for name, key, higher in HEADLINE:
        a = previous["results"].get(name, {}).get(key)
        b = entry["results"].get(name, {}).get(key)
        if a and b:
            worse = (b < a * (1 - REGRESSION)) if higher else (b > a * (1 + REGRESSION))
            out.append((f"{name}.{key}", a, b, worse))
    return out


def format_results(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, r in results.items():
        if name in ("dense", "wse3"):
            lines.append(f"{name:9s} neighbor {r['mesh']} on {r['wafer']}: {r['pe_cycles_per_s'] / 1e6:.1f} M PE-cycles/s "
                         f"({r['cycles']:,} cycles, {r['wall_s']:.2f} s, {r['threads']} threads), "
                         f"peak {r['peak_rss_mb']:,.0f} MB")
        elif name == "layer":
            lines.append(f"{name:9s} {r['model']} decode layer on {r['wafer']}: {r['pe_cycles_per_s'] / 1e6:.1f} M "
                         f"PE-cycles/s ({r['pes']:,} PEs x {r['cycles']:,} cycles in {r['wall_s']:.1f} s; "
                         f"{100 * r['stepped_fraction']:.0f}% stepped), peak {r['peak_rss_mb']:,.0f} MB")
        elif name.startswith("token"):
            lines.append(f"{name:9s} {r['model']} ({r['layers']} layers) token on {r['wafer']}: {r['wall_s']:.1f} s wall "
                         f"({r['simulations']} simulations, {r['token_cycles']:,} cycles = "
                         f"{r['tokens_per_s']:,.0f} tokens/s), peak {r['peak_rss_mb']:,.0f} MB")
        elif name == "jit":
            lines.append(f"{name:9s} cold compile {r['cold_compile_s']:.1f} s, warm start {r['warm_start_s']:.2f} s")
        elif name == "stage":
            lines.append(f"{name:9s} {r['model']} {r['weights']} wafer {r['wafer']} of {r['wafers']}, its largest "
                         f"stage ({r['mesh']}, one thread): {r['pe_cycles_per_s'] / 1e6:.0f} M PE-cycles/s "
                         f"({r['cycles']:,} cycles in {r['wall_s']:.1f} s; {100 * r['stepped_fraction']:.1f}% "
                         f"stepped; stages built in {r['build_s']:.1f} s), peak {r['peak_rss_mb']:,.0f} MB")
        elif name == "system":
            lines.append(f"{name:9s} wse system {r['model']} on {r['wafers']} wafers (cold, --jobs {r['jobs']}): "
                         f"{r['wall_s']:.1f} s wall, {r['tokens_per_s_per_user']:,.0f} tokens/s per user, "
                         f"largest process {r['largest_process_mb']:,.0f} MB")
        elif name == "functional":
            lines.append(f"{name:9s} values of a {r['kernel']}: {r['wall_s']:.1f} s for both schedules "
                         f"({r['element_ops_per_s'] / 1e6:.1f} M element-ops/s); a {r.get('layer', 'layer')} "
                         f"built, filled and evaluated in {r.get('layer_wall_s', 0):.1f} s; "
                         f"peak {r['peak_rss_mb']:,.0f} MB")
    return lines


def main() -> None:
    """`python -m wse.bench NAME [--quick]`: one benchmark, its figures as one JSON line."""
    args = sys.argv[1:]
    quick = "--quick" in args
    names = [a for a in args if a != "--quick"]
    if len(names) != 1:
        sys.exit("usage: python -m wse.bench NAME [--quick]")
    try:
        print(json.dumps(run_one(names[0], quick)))
    except WseError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
