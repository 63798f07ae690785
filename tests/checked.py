"""Simulate a trace after validating it, and require that it completes (workload tests)."""
from wse.engine.run import simulate
from wse.trace import validate


def run(trace, cfg):
    validate(trace, cfg)
    r = simulate(trace, cfg, validated=True)
    assert r.complete, r.stuck[:5]
    return r


def composed_equals_full(plan, cfg):
    """A model plan's composed step equals its full simulation, cycles and FLOPs (counted, and
    analytic per region) alike, and its regions hold exactly the model's weights; returns the
    regions' builds."""
    from wse.workload.decode import compose, full_trace
    trace, builds = full_trace(plan)
    full = run(trace, cfg)
    composed = compose(plan, lambda t: run(t, cfg))
    assert composed.total_cycles == full.total_cycles
    assert composed.total("flops") == int(full.pe("flops").sum()) == sum(sum(b.flops.values()) for b in builds)
    assert sum(b.weight_bytes for b in builds) == 2 * plan.spec.total_params()
    return builds
