"""The GPU baseline's parallelism (docs/gpu-baseline.md, "Parallelism and memory"): a node's
GPUs as tensor-parallel groups of 1, 2, 4 or 8, and the cheapest feasible choice per model,
batch and context."""
from __future__ import annotations

import dataclasses

from ..errors import WseError
from ..workload.models import ModelSpec
from .gpu import DEFAULT_BATCHES, GpuConfig, GpuResult, gpu_decode

TP_CHOICES = (1, 2, 4, 8)


def with_tp(gpu: GpuConfig, tp: int) -> GpuConfig:
    """The model's unit ("node") as a tensor-parallel group of `tp` GPUs of a node: its share of
    the node's overhead power; pipeline stages between groups cross the inter-node links (also
    when two groups share a node: conservative, NVLink is faster)."""
    if not 1 <= tp <= gpu.gpus_per_node:
        raise WseError(f"tensor parallelism {tp} must be between 1 and {gpu.gpus_per_node} (GPUs per node)")
    if tp == gpu.gpus_per_node:
        return gpu
    return dataclasses.replace(gpu, gpus_per_node=tp,
                               node_overhead_power_w=gpu.node_overhead_power_w * tp / gpu.gpus_per_node)


def best_decode(spec: ModelSpec, gpu: GpuConfig, *, batch: int, context: int, weight_bytes=None,
                kv_bytes: float = 2.0, utilization: float = 1.0, tp: int | None = None
                ) -> tuple[GpuResult, GpuConfig]:
    """The feasible parallelism with the lowest $/Mtok for this model, batch and context (ties:
    the shorter step): TP over 1, 2, 4 or 8 GPUs of a node, PP over the fewest TP groups that
    hold weights and KV cache (MoE experts are sharded over the group as the dense weights are:
    expert and tensor parallelism read the same bytes per GPU in this model). `tp` fixes it.
    Returns the decode result and the configuration of one TP group."""
    best = None
    last: WseError | None = None
    for t in ([tp] if tp else [t for t in TP_CHOICES if t <= gpu.gpus_per_node]):
        g = with_tp(gpu, t)
        try:
            r = gpu_decode(spec, g, batch=batch, context=context, weight_bytes=weight_bytes, kv_bytes=kv_bytes,
                           utilization=utilization)
        except WseError as e:
            last = e
            continue
        if best is None or (r.usd_per_mtok, r.step_latency_s) < (best[0].usd_per_mtok, best[0].step_latency_s):
            best = (r, g)
    if best is None:
        raise last or WseError(f"{spec.name} fits no parallelism on {gpu.name} nodes")
    return best


def cost_frontier(spec: ModelSpec, gpu: GpuConfig, *, context: int, batches=DEFAULT_BATCHES, weight_bytes=None,
                  kv_bytes: float = 2.0, utilization: float = 1.0) -> list[tuple[GpuResult, GpuConfig]]:
    """For each batch that fits some parallelism, its cheapest (best_decode): what an operator
    pays per token at each interactivity, free to size the nodes for the batch."""
    out = []
    for b in batches:
        try:
            out.append(best_decode(spec, gpu, batch=b, context=context, weight_bytes=weight_bytes, kv_bytes=kv_bytes,
                                   utilization=utilization))
        except WseError:
            continue
    return out


def cheapest(frontier: list[tuple[GpuResult, GpuConfig]]) -> tuple[GpuResult, GpuConfig]:
    """The point of least $/Mtok on a cost frontier (ties: the shorter step)."""
    if not frontier:
        raise WseError("no batch fits any parallelism on the GPU nodes")
    return min(frontier, key=lambda rc: (rc[0].usd_per_mtok, rc[0].step_latency_s))


def undercut(frontier: list[tuple[GpuResult, GpuConfig]], usd_per_mtok: float
             ) -> tuple[GpuResult, GpuConfig] | None:
    """The frontier point of highest tokens/s per user that costs less per token than
    `usd_per_mtok` (None: none does): below its rate per user the GPU nodes serve cheaper, above
    it every point of the frontier costs more."""
    below = [rc for rc in frontier if rc[0].usd_per_mtok < usd_per_mtok]
    return max(below, key=lambda rc: rc[0].tokens_per_s_per_user) if below else None


def gpu_label(g: GpuConfig, groups: int) -> str:
    """How a baseline reads in tables: 2 x 8xh100 (whole nodes), or 3 x TP4 h100 (TP groups)."""
    return f"{groups} x {g.gpus_per_node}x{g.name}" if g.gpus_per_node >= 8 else f"{groups} x TP{g.gpus_per_node} {g.name}"
