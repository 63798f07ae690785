"""Simulate a trace after validating it, and require that it completes (workload tests)."""
from wse.engine.run import simulate
from wse.trace import validate


def run(trace, cfg):
    validate(trace, cfg)
    r = simulate(trace, cfg, validated=True)
    assert r.complete, r.stuck[:5]
    return r
