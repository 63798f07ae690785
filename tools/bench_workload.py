"""Workload speed benchmark: wall time and simulated PE-cycles per wall second.

    python tools/bench_workload.py [--model llama3.1-8b] [--wafer wse3] [--context 1024] [--json]

Figures: (1) one decode layer — the stage trace in which a layer region runs its whole decode
step after the previous region's hand-off; (2) a whole-model decode token, composed from the
distinct stage simulations (decode.compose). PE-cycles count every PE of the simulated traces.
"""
from __future__ import annotations

import argparse
import json
import time

from wse import hardware
from wse.engine.run import simulate
from wse.workload.decode import compose, plan_model, stage_S
from wse.workload.layer import DecodeParams
from wse.workload.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--wafer", default="wse3")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    cfg = hardware.load_preset(a.wafer)
    spec = load_model(a.model)
    plan = plan_model(spec, cfg, DecodeParams(context=a.context))
    k = next(i for i, s in enumerate(plan.slots[:-1]) if s.kind == "layer")
    t0 = time.perf_counter()
    stage = stage_S(plan, k)
    build = time.perf_counter() - t0
    r = simulate(stage.trace, cfg)
    layer = {"cycles": r.total_cycles, "wall_s": r.wall_seconds, "build_s": build,
             "pe_cycles_per_s": stage.trace.n_pes * r.total_cycles / r.wall_seconds, "pes": stage.trace.n_pes}
    pe_cycles = 0
    wall = 0.0

    def sim(t):
        nonlocal pe_cycles, wall
        res = simulate(t, cfg)
        pe_cycles += t.n_pes * res.total_cycles
        wall += res.wall_seconds
        return res

    t0 = time.perf_counter()
    d = compose(plan, sim)
    total_wall = time.perf_counter() - t0
    token = {"token_cycles": d.total_cycles, "simulations": d.simulations, "wall_s": total_wall,
             "sim_wall_s": wall, "pe_cycles_per_s": pe_cycles / wall if wall else 0.0,
             "tokens_per_s": cfg.clock_hz / d.total_cycles}
    out = {"model": a.model, "wafer": a.wafer, "slot": plan.P, "layer": layer, "token": token}
    if a.json:
        print(json.dumps(out))
        return
    print(f"{a.model} on {a.wafer}, context {a.context}, {plan.P}x{plan.P} slots")
    print(f"one decode layer: {layer['cycles']:,} cycles, {layer['wall_s']:.1f} s wall "
          f"({layer['pe_cycles_per_s'] / 1e6:.1f} M PE-cycles/s over {layer['pes']:,} PEs; trace built in "
          f"{layer['build_s']:.1f} s)")
    print(f"whole-model token (composed, {token['simulations']} simulations): {token['token_cycles']:,} cycles "
          f"= {token['tokens_per_s']:,.0f} tokens/s; {token['wall_s']:.1f} s wall "
          f"({token['pe_cycles_per_s'] / 1e6:.1f} M PE-cycles/s while simulating)")


if __name__ == "__main__":
    main()
