"""Engine speed benchmark: prints dense PE-cycles/s, cold JIT compile time and warm start time.

    python tools/bench_engine.py [--mesh 256] [--wavelets 2000] [--colors 4] [--repeat 3] [--json]

Dense figure: the `neighbor` pattern (every PE streams to its east neighbour, colors cycling)
on a mesh x mesh region, stepped by the parallel kernel with all Numba threads; the best of
--repeat runs, measured inside the process after a warm-up so JIT loading is excluded.
Cold compile: a fresh process with an empty Numba cache simulating a tiny trace (both kernels).
Warm start: a fresh process with the cache filled, from interpreter start to a finished tiny run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

TINY_RUN = (
    "from wse import hardware; from wse.workload import synthetic as s; "
    "from wse.engine.run import simulate; c = hardware.load_preset('tiny'); "
    "simulate(s.neighbor(8, 8, 16), c, parallel=False); "
    "simulate(s.neighbor(8, 8, 16), c, parallel=True)"
)


def _timed_subprocess(code: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return time.perf_counter() - t0


def dense(mesh: int, wavelets: int, colors: int, repeat: int) -> dict[str, float]:
    import numba

    from wse import hardware
    from wse.engine.run import simulate
    from wse.workload import synthetic

    cfg = hardware.load_preset("wse3")
    simulate(synthetic.neighbor(8, 8, 8, colors), cfg, parallel=True)  # load the kernels
    trace = synthetic.neighbor(mesh, mesh, wavelets, colors)
    best = None
    for _ in range(repeat):
        r = simulate(trace, cfg, parallel=True)
        assert r.complete
        if best is None or r.wall_seconds < best.wall_seconds:
            best = r
    pe_cycles = mesh * mesh * best.total_cycles
    return {"mesh": mesh, "cycles": best.total_cycles, "wall_s": best.wall_seconds,
            "pe_cycles_per_s": pe_cycles / best.wall_seconds, "threads": numba.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", type=int, default=256)
    ap.add_argument("--wavelets", type=int, default=2000)
    ap.add_argument("--colors", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache:
        cold_env = dict(env, NUMBA_CACHE_DIR=cache)
        cold = _timed_subprocess(TINY_RUN, cold_env)
        warm = min(_timed_subprocess(TINY_RUN, cold_env) for _ in range(3))
    d = dense(a.mesh, a.wavelets, a.colors, a.repeat)
    out = {"dense_neighbor": d, "cold_compile_s": cold, "warm_start_s": warm}
    if a.json:
        print(json.dumps(out))
        return
    print(f"dense neighbor {d['mesh']}x{d['mesh']}, {a.colors} colors: "
          f"{d['pe_cycles_per_s'] / 1e6:.1f} M PE-cycles/s "
          f"({d['cycles']:,} cycles in {d['wall_s']:.2f} s, {d['threads']} threads)")
    print(f"cold JIT compile (fresh cache, tiny run, both kernels): {cold:.1f} s")
    print(f"warm start (cached JIT, tiny run, process start to finish): {warm:.2f} s")


if __name__ == "__main__":
    main()
