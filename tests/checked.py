"""Simulate a trace after validating it, and require that it completes (workload tests)."""
import pytest

from wse.engine.run import simulate
from wse.trace_check import validate


def run(trace, cfg):
    validate(trace, cfg, fit=False)  # (a stage may hold a stand-in beside a wafer's regions)
    r = simulate(trace, cfg, validated=True)
    assert r.complete, r.stuck[:5]
    return r


def composed_equals_full(plan, cfg):
    """A model plan's composed step equals its full simulation, cycles and FLOPs (counted, and
    analytic per region) alike, and its regions hold exactly the model's weights; returns the
    regions' builds."""
    from wse.workload.compose import compose
    from wse.workload.stages import full_trace
    trace, builds = full_trace(plan)
    full = run(trace, cfg)
    composed = compose(plan, lambda t: run(t, cfg))
    assert composed.total_cycles == full.total_cycles
    assert composed.total("flops") == int(full.pe("flops").sum()) == sum(sum(b.flops.values()) for b in builds)
    assert sum(b.weight_bytes for b in builds) == pytest.approx(model_bytes(plan), rel=1e-12)
    return builds


def model_bytes(plan) -> float:
    """Bytes of a whole model's weights at the plan's precisions: its linear weights at theirs,
    the rest (norms, router, tables, ...) 16-bit. Latent attention in row groups (--mla-groups G)
    holds G copies of what a group's rows need of every latent dim: W_a's latent and rotary
    columns, W_uk and W_uv (16-bit) and the latent norm's weight."""
    from wse.workload.precision import value_bytes, weights_of
    spec = plan.spec
    dense, expert = (value_bytes(w) for w in weights_of(spec, plan.params.weights))
    layers = sum(spec.layer_bytes(i, dense, expert) for i in range(spec.layers))
    if spec.mla and plan.params.mla_groups > 1:
        m = spec.mla
        copy = spec.hidden_size * spec.kv_cache_width * dense + 2 * m.kv_lora_rank * (
            spec.heads * (m.qk_nope_head_dim + m.v_head_dim) + 1)
        layers += (plan.params.mla_groups - 1) * copy * spec.layers
    return layers + 2 * (spec.total_params() - sum(spec.layer_params(i) for i in range(spec.layers)))


COUNTERS = ("flops", "sram_read_bytes", "sram_write_bytes", "wavelets_sent", "wavelets_received", "ops_completed")


def standin_work(plan, cfg, delta=None):
    """A stand-in's barrier (its B stage), sends and delay ops: what a wafer's full trace holds
    beyond the wafer's own work; returns (counters to take out, its anchor cycle)."""
    from wse.workload.mesh import split
    from wse.workload.stages import delay_ops, stage_B, standin_delta
    st = stage_B(plan, None)
    r = run(st.trace, cfg)
    B, k = plan.params.batch, plan.spec.moe.experts_per_token
    Hc = split(plan.spec.hidden_size, plan.P)
    md, mc = sum(h + k for h in Hc) * B, sum(Hc) * B
    delay = [op for h in Hc for op in delay_ops(plan, h, standin_delta(plan, delta))]
    moved = 2 * sum(op.length for op in delay)
    minus = {c: int(r.pe(c).sum()) for c in COUNTERS}
    minus["wavelets_sent"] += md + mc
    minus["sram_read_bytes"] += 2 * (md + mc) + moved
    minus["sram_write_bytes"] += moved
    minus["ops_completed"] += 3 * plan.P + len(delay)
    minus["hops"] = int(r.link("wavelets").sum()) + plan.P * (md + mc)
    return minus, int(r.pe("finish_cycle")[st.anchor[1], st.anchor[0]])
