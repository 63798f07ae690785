"""Analytic roofline model of GPU inference nodes (8xH100, 8xH200, 8xB200): the baseline the
wafer simulator is compared against.

A node holds `gpus_per_node` GPUs joined by NVLink; the model is split by tensor parallelism
(TP) over the GPUs of a node and by pipeline parallelism (PP) over nodes, layers split evenly.
Each layer costs max(HBM time, compute time) plus two ring all-reduces; docs/gpu-baseline.md
gives every equation and what the model leaves out. Presets live in wse/presets/gpus/*.toml.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from ..errors import WseError
from ..tomlfile import read_toml, toml_value
from ..workload.mesh import split_ranges as split_layers  # contiguous pipeline stages, earlier ones larger
from ..workload.models import DTYPE_BYTES, ModelSpec

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets" / "gpus"
GPU_NAMES: tuple[str, ...] = tuple(sorted(p.stem for p in PRESETS_DIR.glob("*.toml")))
ACT_BYTES = 2.0  # activations (all-reduce and pipeline payloads) are bf16
DEFAULT_BATCHES = tuple(2 ** i for i in range(9))  # 1 .. 256


class GpuConfigError(WseError):
    """An unknown GPU preset or a malformed GPU configuration."""


# ---- configuration ---------------------------------------------------------------------------

# key: (type, low, high, description); every key is required.
FIELDS: dict[str, tuple[type, float | None, float | None, str]] = {
    "name": (str, None, None, "preset name"),
    "hbm_bytes": (float, 1e9, 1e13, "HBM capacity per GPU"),
    "hbm_bytes_per_s": (float, 1e11, 1e14, "peak HBM bandwidth per GPU"),
    "bf16_flops_per_s": (float, 1e12, 1e17, "dense bf16 peak per GPU"),
    "fp8_flops_per_s": (float, 1e12, 1e17, "dense fp8 peak per GPU"),
    "nvlink_bytes_per_s": (float, 1e9, 1e13, "NVLink per GPU, one direction"),
    "power_w": (float, 1.0, 1e5, "power per GPU while serving"),
    "gpus_per_node": (int, 1, 1024, "GPUs per node, all in one TP group"),
    "node_overhead_power_w": (float, 0.0, 1e6, "node power besides the GPUs"),
    "internode_bytes_per_s": (float, 1e8, 1e13, "inter-node bandwidth per GPU, one direction"),
    "internode_latency_s": (float, 0.0, 1.0, "latency of one inter-node transfer"),
    "allreduce_step_latency_s": (float, 0.0, 1.0, "fixed cost of one ring all-reduce step"),
    "hbm_efficiency": (float, 0.01, 1.0, "achievable fraction of peak HBM bandwidth"),
    "flops_efficiency": (float, 0.01, 1.0, "achievable fraction of peak FLOP/s"),
    "memory_reserve_fraction": (float, 0.0, 0.99, "HBM fraction kept for activations and runtime"),
    "cost_per_gpu_hour_usd": (float, 0.0, 1e4, "price of one GPU-hour"),
}


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """A validated GPU node description (fields as in FIELDS)."""

    name: str
    hbm_bytes: float
    hbm_bytes_per_s: float
    bf16_flops_per_s: float
    fp8_flops_per_s: float
    nvlink_bytes_per_s: float
    power_w: float
    gpus_per_node: int
    node_overhead_power_w: float
    internode_bytes_per_s: float
    internode_latency_s: float
    allreduce_step_latency_s: float
    hbm_efficiency: float
    flops_efficiency: float
    memory_reserve_fraction: float
    cost_per_gpu_hour_usd: float

    @property
    def usable_node_bytes(self) -> float:
        """HBM of one node available to weights and KV cache."""
        return self.gpus_per_node * self.hbm_bytes * (1.0 - self.memory_reserve_fraction)

    @property
    def node_power_w(self) -> float:
        return self.gpus_per_node * self.power_w + self.node_overhead_power_w

    def matmul_flops_per_s(self, weight_bytes) -> float:
        """Peak for weight GEMMs: fp8 tensor cores for fp8 weights (a Weights says; a number of
        bytes per parameter: 8 bits or fewer), bf16 otherwise."""
        if isinstance(weight_bytes, tuple):
            fp8 = weight_bytes.fp8
        else:
            fp8 = weight_bytes <= 1.0
        return self.fp8_flops_per_s if fp8 else self.bf16_flops_per_s


def _check(values: dict[str, Any], where: str) -> GpuConfig:
    for key in values:
        if key not in FIELDS:
            near = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise GpuConfigError(f"{where}: unknown GPU key {key!r}{hint}")
    out: dict[str, Any] = {}
    for key, (kind, lo, hi, _) in FIELDS.items():
        if key not in values:
            raise GpuConfigError(f"{where}: missing GPU key {key!r}")
        v = values[key]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if kind is int and isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise GpuConfigError(f"{where}: {key} must be {kind.__name__}, got {v!r}")
        if lo is not None and not (lo <= v <= hi):
            raise GpuConfigError(f"{where}: {key} = {v!r} is out of range [{lo:g}, {hi:g}]")
        out[key] = v
    return GpuConfig(**out)


def _parse_set(s: str) -> tuple[str, Any]:
    if "=" not in s:
        raise GpuConfigError(f"--set {s!r}: expected key=value or gpu.key=value")
    key, raw = (x.strip() for x in s.split("=", 1))
    key = key.removeprefix("gpu.")
    return key, toml_value(raw)


def load_gpu(name_or_path: str, sets: Sequence[str] = ()) -> GpuConfig:
    """A GPU node by preset name (h100, h200, b200) or TOML path with one [gpu] table, then
    `key=value` / `gpu.key=value` overrides; invalid input raises GpuConfigError naming the key."""
    path = Path(name_or_path)
    if path.suffix != ".toml" and "/" not in name_or_path:
        if name_or_path not in GPU_NAMES:
            raise GpuConfigError(f"unknown GPU preset {name_or_path!r} (presets: {', '.join(GPU_NAMES)})")
        path = PRESETS_DIR / f"{name_or_path}.toml"
    doc = read_toml(path, "GPU configuration", GpuConfigError)
    extra = [k for k in doc if k != "gpu"]
    if extra or not isinstance(doc.get("gpu"), dict):
        raise GpuConfigError(f"{path}: expected exactly one [gpu] table, found {', '.join(doc) or 'nothing'}")
    values = dict(doc["gpu"])
    cfg = _check(values, str(path))
    if not sets:
        return cfg
    values = dataclasses.asdict(cfg)
    values.update(_parse_set(s) for s in sets)
    return _check(values, f"{path} with --set")


# ---- per-layer work --------------------------------------------------------------------------

def distinct_experts(experts: int, per_token: int, tokens: float) -> float:
    """Expected number of distinct routed experts `tokens` tokens touch under uniform routing:
    each expert is missed by one token with probability 1 - k/E."""
    return experts * (1.0 - (1.0 - per_token / experts) ** tokens)


class Weights(NamedTuple):
    """How the GPU node stores and multiplies the weights: bytes per parameter other than the
    routed experts', per routed-expert parameter, and whether the weight GEMMs run on fp8 tensor
    cores (fp8 weights) or in bf16 (16-bit weights, and integer weights dequantized on the fly:
    weight-only quantization)."""

    dense: float
    expert: float
    fp8: bool


def weights_for(spec: ModelSpec, precisions: tuple[str, str]) -> Weights:
    """The GPU form of the wafer's (dense, expert) weight precisions (workload/precision.py)."""
    from ..workload.precision import value_bytes
    dense, expert = precisions
    return Weights(value_bytes(dense), value_bytes(expert), dense == expert == "fp8")


def _param_bytes(spec: ModelSpec, weight_bytes) -> tuple[float, float]:
    """(bytes per non-expert parameter, bytes per routed-expert parameter); weight_bytes: one
    number for both, a Weights, or None (the model's stored dtypes)."""
    if isinstance(weight_bytes, Weights):
        return weight_bytes.dense, weight_bytes.expert
    if weight_bytes is not None:
        return float(weight_bytes), float(weight_bytes)
    dense = DTYPE_BYTES[spec.weight_dtype]
    expert = spec.moe.expert_weight_dtype if spec.moe and spec.moe.expert_weight_dtype else spec.weight_dtype
    return dense, DTYPE_BYTES[expert]


def _layer_split(spec: ModelSpec, layer: int) -> tuple[int, int]:
    """(parameters other than routed experts, parameters of one routed expert) of a layer."""
    if not spec.is_moe_layer(layer):
        return spec.layer_params(layer), 0
    e = spec.expert_params()
    return spec.layer_params(layer) - spec.moe.experts * e, e


def layer_stored_bytes(spec: ModelSpec, layer: int, weight_bytes: float | None = None) -> float:
    """Bytes of all of a layer's weights (every routed expert)."""
    dense_b, expert_b = _param_bytes(spec, weight_bytes)
    common, e = _layer_split(spec, layer)
    return common * dense_b + (spec.moe.experts * e * expert_b if e else 0.0)


def layer_touched(spec: ModelSpec, layer: int, tokens: float,
                  weight_bytes: float | None = None) -> tuple[float, float]:
    """(weight bytes read, matmul FLOPs) of one layer processing `tokens` tokens together.
    MoE layers read the shared experts, the router and the expected distinct routed experts;
    each token multiplies through experts_per_token routed experts."""
    dense_b, expert_b = _param_bytes(spec, weight_bytes)
    common, e = _layer_split(spec, layer)
    if not e:
        return common * dense_b, 2.0 * common * tokens
    m = spec.moe
    touched = distinct_experts(m.experts, m.experts_per_token, tokens)
    return (common * dense_b + touched * e * expert_b,
            2.0 * tokens * (common + m.experts_per_token * e))


def kv_bytes_per_token_layer(spec: ModelSpec, kv_bytes: float = 2.0) -> float:
    """KV-cache bytes one token adds to one layer. MLA caches the compressed latent plus the
    shared RoPE key (kv_lora_rank + qk_rope_head_dim); standard attention caches K and V."""
    return spec.kv_cache_width * kv_bytes


def kv_replication(spec: ModelSpec, tp: int) -> float:
    """Copies of the KV cache across a TP group: the MLA latent is shared by all heads, so every
    rank holds it whole; K/V heads fewer than tp ranks are duplicated."""
    return float(tp) if spec.mla else max(1.0, tp / spec.kv_heads)


def attention_flops_per_pair(spec: ModelSpec) -> float:
    """FLOPs of one (query token, cached token) pair in one layer. MLA decodes in the absorbed
    form over the latent: scores over kv_lora_rank + rope dims, values over kv_lora_rank."""
    if spec.mla:
        m = spec.mla
        return 2.0 * spec.heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim)
    return 4.0 * spec.heads * spec.head_dim


# ---- timing ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Terms:
    """Seconds of a stage, split by what bounds each part: each roofline max goes to its winner."""

    memory: float = 0.0
    compute: float = 0.0
    communication: float = 0.0

    def __add__(self, o: "Terms") -> "Terms":
        return Terms(self.memory + o.memory, self.compute + o.compute, self.communication + o.communication)

    @property
    def total(self) -> float:
        return self.memory + self.compute + self.communication

    @property
    def bound(self) -> str:
        return max(("memory", self.memory), ("compute", self.compute),
                   ("communication", self.communication), key=lambda kv: kv[1])[0]


def _roofline(gpu: GpuConfig, nbytes: float, flops_at_peak: float) -> Terms:
    """max(HBM time, compute time) over one TP group; flops_at_peak is FLOPs / peak already."""
    tp = gpu.gpus_per_node
    t_mem = nbytes / (tp * gpu.hbm_bytes_per_s * gpu.hbm_efficiency)
    t_comp = flops_at_peak / (tp * gpu.flops_efficiency)
    return Terms(memory=t_mem) if t_mem >= t_comp else Terms(compute=t_comp)


def allreduce_s(gpu: GpuConfig, nbytes: float) -> float:
    """Ring all-reduce over the TP group: 2(tp-1)/tp of the payload per link, 2(tp-1) steps."""
    tp = gpu.gpus_per_node
    if tp == 1:
        return 0.0
    return 2 * (tp - 1) / tp * nbytes / gpu.nvlink_bytes_per_s + 2 * (tp - 1) * gpu.allreduce_step_latency_s


def _layer_terms(spec: ModelSpec, gpu: GpuConfig, layer: int, tokens: float, kv_tokens: float,
                 pairs: float, weight_bytes: float | None, kv_bytes: float) -> Terms:
    """One layer: `tokens` new tokens, `kv_tokens` cached positions read (or written), `pairs`
    attention (query, key) pairs (both the layer's own: a sliding window's); two all-reduces
    (after attention and after the FFN)."""
    w_bytes, mm_flops = layer_touched(spec, layer, tokens, weight_bytes)
    kv = kv_tokens * kv_bytes_per_token_layer(spec, kv_bytes) * kv_replication(spec, gpu.gpus_per_node)
    peak = gpu.matmul_flops_per_s(_peak_form(spec, weight_bytes))
    at_peak = mm_flops / peak + pairs * attention_flops_per_pair(spec) / gpu.bf16_flops_per_s
    comm = 2 * allreduce_s(gpu, tokens * spec.hidden_size * ACT_BYTES)
    return _roofline(gpu, w_bytes + kv, at_peak) + Terms(communication=comm)


def _lm_head_terms(spec: ModelSpec, gpu: GpuConfig, rows: float, weight_bytes: float | None) -> Terms:
    """LM head: a (rows x hidden) x (hidden x vocab) product, vocab split over the TP group."""
    params = spec.vocab_size * spec.hidden_size
    bpp = 2.0 if isinstance(weight_bytes, Weights) else _param_bytes(spec, weight_bytes)[0]  # (16-bit head)
    return _roofline(gpu, params * bpp, 2.0 * params * rows / gpu.matmul_flops_per_s(bpp))


def _peak_form(spec: ModelSpec, weight_bytes):
    """What decides a layer's GEMM peak: a Weights, else its bytes per parameter."""
    return weight_bytes if isinstance(weight_bytes, Weights) else _param_bytes(spec, weight_bytes)[0]


def _stage_bytes(spec: ModelSpec, stage: range, first: bool, last: bool, nodes: int,
                 kv_positions: float, tp: int, weight_bytes: float | None, kv_bytes: float,
                 length: int | None = None) -> float:
    """HBM one node needs: its layers' weights and KV cache, the embedding on the first node,
    the LM head on the last (a tied embedding is stored twice when the ends differ; 16-bit with a
    Weights, as the quantized checkpoints keep them)."""
    bpp = 2.0 if isinstance(weight_bytes, Weights) else _param_bytes(spec, weight_bytes)[0]
    total = sum(layer_stored_bytes(spec, i, weight_bytes) for i in stage)
    total += kv_positions * sum(window_share(spec, i, length) for i in stage) \
        * kv_bytes_per_token_layer(spec, kv_bytes) * kv_replication(spec, tp)
    if first:
        total += spec.embedding_params() * bpp
    if last:
        head = spec.lm_head_params() or (spec.embedding_params() if nodes > 1 else 0)
        total += (head + spec.hidden_size) * bpp
    return total


def node_bytes(spec: ModelSpec, gpu: GpuConfig, nodes: int, kv_positions: float,
               weight_bytes: float | None = None, kv_bytes: float = 2.0, length: int | None = None) -> list[float]:
    """HBM needed on each node for weights plus `kv_positions` (batch x context) cached tokens
    (`length`: the sequences' length, for the layers that keep a sliding window only)."""
    stages = split_layers(spec.layers, nodes)
    return [_stage_bytes(spec, s, i == 0, i == nodes - 1, nodes, kv_positions, gpu.gpus_per_node,
                         weight_bytes, kv_bytes, length) for i, s in enumerate(stages)]


def window_share(spec: ModelSpec, layer: int, length: int | None) -> float:
    """The share of a `length`-token sequence's cache a layer keeps (1 but for a sliding window)."""
    return spec.attended(layer, length) / length if length else 1.0


def fits(spec: ModelSpec, gpu: GpuConfig, nodes: int, kv_positions: float,
         weight_bytes: float | None = None, kv_bytes: float = 2.0, length: int | None = None) -> bool:
    return max(node_bytes(spec, gpu, nodes, kv_positions, weight_bytes, kv_bytes, length)) <= gpu.usable_node_bytes


def min_nodes(spec: ModelSpec, gpu: GpuConfig, kv_positions: float,
              weight_bytes: float | None = None, kv_bytes: float = 2.0, length: int | None = None) -> int:
    """Fewest nodes (at least one layer each) whose usable HBM holds weights and KV cache."""
    for n in range(1, spec.layers + 1):
        if fits(spec, gpu, n, kv_positions, weight_bytes, kv_bytes, length):
            return n
    raise WseError(f"{spec.name} with {kv_positions:g} cached tokens does not fit on "
                   f"{spec.layers} {gpu.name} nodes (one layer per node)")


def _resolve_nodes(spec: ModelSpec, gpu: GpuConfig, nodes: int | None, kv_positions: float,
                   weight_bytes: float | None, kv_bytes: float, length: int | None = None) -> int:
    if nodes is None:
        return min_nodes(spec, gpu, kv_positions, weight_bytes, kv_bytes, length)
    if not 1 <= nodes <= spec.layers:
        raise WseError(f"nodes must be between 1 and {spec.layers} (the layer count), got {nodes}")
    if not fits(spec, gpu, nodes, kv_positions, weight_bytes, kv_bytes, length):
        need = max(node_bytes(spec, gpu, nodes, kv_positions, weight_bytes, kv_bytes, length))
        raise WseError(f"{spec.name} needs {need / 1e9:.1f} GB on a node but {nodes} {gpu.name} "
                       f"node(s) offer {gpu.usable_node_bytes / 1e9:.1f} GB each")
    return nodes


def _stage_terms(spec: ModelSpec, gpu: GpuConfig, stages: list[range], tokens: float, kv_tokens: float,
                 pairs: float, head_rows: float, weight_bytes: float | None, kv_bytes: float,
                 share=lambda layer: (1.0, 1.0)) -> list[Terms]:
    """Each stage's terms; `share(layer)`: the (KV, pairs) shares of a sliding-window layer."""
    out = []
    for i, stage in enumerate(stages):
        t = Terms()
        for layer in stage:
            kv_s, pair_s = share(layer)
            t = t + _layer_terms(spec, gpu, layer, tokens, kv_tokens * kv_s, pairs * pair_s, weight_bytes, kv_bytes)
        if i == len(stages) - 1:
            t = t + _lm_head_terms(spec, gpu, head_rows, weight_bytes)
        out.append(t)
    return out


def _hop_s(spec: ModelSpec, gpu: GpuConfig, tokens: float) -> float:
    """One pipeline hand-off: tokens x hidden activations; every TP rank holds them (replicated
    after the all-reduce) and sends them over its own link to its peer on the next node."""
    return gpu.internode_latency_s + tokens * spec.hidden_size * ACT_BYTES / gpu.internode_bytes_per_s


# ---- decode ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GpuResult:
    """Steady-state decode of `batch` concurrent sequences, each `context` tokens long."""

    gpu: str
    model: str
    batch: int
    context: int
    nodes: int
    gpus: int
    micro_batches: int
    step_latency_s: float          # time between two tokens of one sequence
    tokens_per_s_per_user: float
    aggregate_tokens_per_s: float  # at 100% utilization
    bound: str                     # memory / compute / communication: the largest summed term
    memory_s: float                # summed over stages for one micro-batch
    compute_s: float
    communication_s: float
    hbm_fraction: float            # of usable HBM on the fullest node
    power_w: float
    utilization: float
    j_per_token: float
    usd_per_mtok: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_positive(**kw: float) -> None:
    for k, v in kw.items():
        if not v > 0:
            raise WseError(f"{k} must be positive, got {v!r}")


def gpu_decode(spec: ModelSpec, gpu: GpuConfig, *, batch: int = 1, context: int = 1024,
               weight_bytes: float | None = None, kv_bytes: float = 2.0, nodes: int | None = None,
               utilization: float = 1.0, check_fit: bool = True) -> GpuResult:
    """One decode step of `batch` sequences of `context` cached tokens.

    weight_bytes: bytes per parameter (None: the model's stored dtypes); kv_bytes: per cached
    value. nodes=None picks the fewest that fit. With nodes > 1 the batch is cut into
    m = min(nodes, batch) micro-batches in flight; a sequence gets a token every
    max(pipeline traversal, m x busiest stage). utilization (0, 1] is the fraction of time the
    node serves at this rate: cost and energy per token are divided by it (power is drawn always).
    check_fit=False skips the capacity check of given nodes (the serving model admits by its own
    KV budget).
    """
    _check_positive(batch=batch, context=context, kv_bytes=kv_bytes, utilization=utilization)
    if utilization > 1:
        raise WseError(f"utilization must be at most 1, got {utilization!r}")
    if check_fit or nodes is None:
        nodes = _resolve_nodes(spec, gpu, nodes, batch * context, weight_bytes, kv_bytes, context)
    m = min(nodes, batch)
    mb = batch / m
    terms = _stage_terms(spec, gpu, split_layers(spec.layers, nodes), mb, mb * context, mb * context,
                         mb, weight_bytes, kv_bytes, lambda i: (window_share(spec, i, context),) * 2)
    hops = (nodes - 1) * _hop_s(spec, gpu, mb)
    traversal = sum(t.total for t in terms) + hops
    step = max(traversal, m * max(t.total for t in terms))
    total = sum(terms, Terms()) + Terms(communication=hops)
    aggregate = batch / step
    power = nodes * gpu.node_power_w
    served = aggregate * utilization
    return GpuResult(
        gpu=gpu.name, model=spec.name, batch=batch, context=context, nodes=nodes,
        gpus=nodes * gpu.gpus_per_node, micro_batches=m, step_latency_s=step,
        tokens_per_s_per_user=1.0 / step, aggregate_tokens_per_s=aggregate, bound=total.bound,
        memory_s=total.memory, compute_s=total.compute, communication_s=total.communication,
        hbm_fraction=max(node_bytes(spec, gpu, nodes, batch * context, weight_bytes, kv_bytes, context))
        / gpu.usable_node_bytes,
        power_w=power, utilization=utilization, j_per_token=power / served,
        usd_per_mtok=nodes * gpu.gpus_per_node * gpu.cost_per_gpu_hour_usd / 3600 / served * 1e6)


class CurvePoint(NamedTuple):
    batch: int
    tokens_per_s_per_user: float
    aggregate_tokens_per_s: float
    j_per_token: float
    usd_per_mtok: float


def curve(spec: ModelSpec, gpu: GpuConfig, context: int, batches: Sequence[int] = DEFAULT_BATCHES, *,
          nodes: int | None = None, weight_bytes: float | None = None,
          kv_bytes: float = 2.0, utilization: float = 1.0) -> list[CurvePoint]:
    """Throughput-vs-latency points on a fixed node count (given, or the fewest that hold batch 1),
    with energy and cost per token at each (utilization as in gpu_decode); batches whose KV cache
    no longer fits are dropped."""
    nodes = _resolve_nodes(spec, gpu, nodes, context, weight_bytes, kv_bytes, context)
    out = []
    for b in batches:
        if fits(spec, gpu, nodes, b * context, weight_bytes, kv_bytes, context):
            r = gpu_decode(spec, gpu, batch=b, context=context, weight_bytes=weight_bytes,
                           kv_bytes=kv_bytes, nodes=nodes, utilization=utilization)
            out.append(CurvePoint(b, r.tokens_per_s_per_user, r.aggregate_tokens_per_s, r.j_per_token,
                                  r.usd_per_mtok))
    return out


# ---- prefill ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PrefillResult:
    """Time to first token of `batch` prompts of `prompt_tokens` tokens processed together."""

    gpu: str
    model: str
    prompt_tokens: int
    batch: int
    nodes: int
    gpus: int
    ttft_s: float
    bound: str
    memory_s: float
    compute_s: float
    communication_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gpu_prefill(spec: ModelSpec, gpu: GpuConfig, prompt_tokens: int, *, batch: int = 1,
                nodes: int | None = None, weight_bytes: float | None = None,
                kv_bytes: float = 2.0) -> PrefillResult:
    """Prefill roofline: per layer max(weights touched + KV written over HBM, matmul FLOPs of
    batch x prompt tokens + causal attention over P(P+1)/2 pairs) plus two all-reduces of
    batch x prompt x hidden; stages run one after another (no chunked pipelining), and the LM
    head runs only for each prompt's last token."""
    _check_positive(prompt_tokens=prompt_tokens, batch=batch, kv_bytes=kv_bytes)
    nodes = _resolve_nodes(spec, gpu, nodes, batch * prompt_tokens, weight_bytes, kv_bytes, prompt_tokens)
    tokens = batch * prompt_tokens
    full = prompt_tokens * (prompt_tokens + 1) / 2
    pairs = batch * full
    terms = _stage_terms(spec, gpu, split_layers(spec.layers, nodes), tokens, tokens, pairs, batch, weight_bytes,
                         kv_bytes, lambda i: (1.0, spec.causal_pairs(i, prompt_tokens) / full))
    total = sum(terms, Terms()) + Terms(communication=(nodes - 1) * _hop_s(spec, gpu, tokens))
    return PrefillResult(gpu=gpu.name, model=spec.name, prompt_tokens=prompt_tokens, batch=batch,
                         nodes=nodes, gpus=nodes * gpu.gpus_per_node, ttft_s=total.total,
                         bound=total.bound, memory_s=total.memory, compute_s=total.compute,
                         communication_s=total.communication)


def prefill_iteration(spec: ModelSpec, gpu: GpuConfig, prompts: Sequence[int], nodes: int,
                      weight_bytes: float | None = None, kv_bytes: float = 2.0) -> float:
    """Seconds of one prefill iteration over prompts of different lengths batched together (as
    gpu_prefill, with every prompt's own causal pairs and one LM-head row per prompt)."""
    if not prompts or min(prompts) < 1:
        raise WseError("a prefill iteration needs prompts of at least one token")
    tokens = float(sum(prompts))
    full = sum(s * (s + 1) / 2 for s in prompts)
    terms = _stage_terms(spec, gpu, split_layers(spec.layers, nodes), tokens, tokens, full, len(prompts),
                         weight_bytes, kv_bytes,
                         lambda i: (1.0, sum(spec.causal_pairs(i, s) for s in prompts) / full))
    return sum(t.total for t in terms) + (nodes - 1) * _hop_s(spec, gpu, tokens)


def mixed_iteration(spec: ModelSpec, gpu: GpuConfig, nodes: int, weight_bytes, kv_bytes: float, decode_n: int,
                    decode_context: float, pieces: Sequence[tuple[int, int, bool]]) -> float:
    """Seconds of one chunked-prefill iteration (vLLM-like): `decode_n` sequences decoding at
    `decode_context` cached tokens on average, fused with prefill pieces (start, end, ends the
    prompt): one pass over the weights for all their tokens; attention over each piece's causal
    pairs (earlier chunks' keys included) and the decoders' caches; the LM head for the
    decoders and for pieces that end a prompt; stages one after another."""
    if not pieces:
        raise WseError("a mixed iteration needs at least one prefill piece")
    new = float(sum(b - a for a, b, _ in pieces))
    tokens = decode_n + new
    read = decode_n * decode_context + sum(a for a, _, _ in pieces)

    def pairs(layer: int) -> float:
        dec = decode_n * spec.attended(layer, max(1, round(decode_context)))
        return dec + sum(spec.causal_pairs(layer, b) - spec.causal_pairs(layer, a) for a, b, _ in pieces)
    total = sum(pairs(i) for i in range(spec.layers)) / spec.layers or 1.0
    terms = _stage_terms(spec, gpu, split_layers(spec.layers, nodes), tokens, read + new, total,
                         decode_n + sum(1 for *_, last in pieces if last), weight_bytes, kv_bytes,
                         lambda i: (1.0, pairs(i) / total))
    return sum(t.total for t in terms) + (nodes - 1) * _hop_s(spec, gpu, tokens)
