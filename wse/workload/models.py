"""Transformer model specs (traces/models/*.toml) and their exact parameter and FLOP counts.

A spec names the shapes of a decoder-only transformer: dense or MoE feed-forward, standard
multi-head / grouped-query attention or DeepSeek's multi-head latent attention (MLA). The
counts here are closed forms over those shapes; tests compare them with the published totals.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import WseError
from ..tomlfile import read_toml

MODELS_DIR = Path(__file__).resolve().parents[2] / "traces" / "models"
DTYPE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 4.25 / 8, "mxfp4": 4.25 / 8}


class ModelError(WseError):
    """An unknown model or a malformed model spec."""


@dataclasses.dataclass(frozen=True)
class MoE:
    experts: int
    experts_per_token: int
    shared_experts: int
    expert_ffn_size: int
    dense_layers: int = 0  # the first layers keep a dense FFN (DeepSeek-V3: 3)
    router_bias: bool = False  # a per-expert routing bias (DeepSeek / gpt-oss)
    expert_bias: bool = False  # biases inside each expert (gpt-oss)
    expert_weight_dtype: str | None = None  # e.g. mxfp4 (gpt-oss); default: weight_dtype


@dataclasses.dataclass(frozen=True)
class MLA:
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    gated_ffn: bool = True
    activation: str = "silu"
    norm: str = "rmsnorm"
    tied_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    attention_sinks: bool = False
    sliding_window: int = 0  # tokens a sliding-window layer attends to (0: every layer attends to all)
    full_attention_every: int = 0  # with a window: layer i attends to all iff (i + 1) % this == 0
    weight_dtype: str = "bf16"
    weight_dtypes: tuple[str, ...] = ()  # published checkpoints (default: weight_dtype alone)
    moe: MoE | None = None
    mla: MLA | None = None
    published_params: float | None = None  # total, for tests
    source: str = ""
    origin: str = ""  # the TOML file a model outside the zoo was read from (traces record it: model_file)

    # ---- structure ---------------------------------------------------------------------------

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.moe.dense_layers

    def is_sliding(self, layer: int) -> bool:
        """A layer whose attention sees only the last sliding_window tokens."""
        return bool(self.sliding_window) and not (self.full_attention_every
                                                  and (layer + 1) % self.full_attention_every == 0)

    def attended(self, layer: int, context: int) -> int:
        """Cached tokens a decode step of the layer attends to (and its KV cache holds)."""
        return min(context, self.sliding_window) if self.is_sliding(layer) else context

    def causal_pairs(self, layer: int, tokens: int) -> int:
        """(query, key) pairs of the layer's causal attention over a prompt of `tokens`."""
        w = self.sliding_window if self.is_sliding(layer) else tokens
        if tokens <= w:
            return tokens * (tokens + 1) // 2
        return w * (w + 1) // 2 + (tokens - w) * w

    @property
    def q_size(self) -> int:
        """Width of the query projection output."""
        if self.mla:
            return self.heads * (self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim)
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the K and V projection outputs (standard attention)."""
        return self.kv_heads * self.head_dim

    @property
    def kv_cache_width(self) -> int:
        """Elements cached per token and layer: K and V, or MLA's latent plus its shared RoPE key."""
        if self.mla:
            return self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        return 2 * self.kv_size

    @property
    def attn_out_size(self) -> int:
        """Width of the attention output (input of the O projection)."""
        return self.heads * (self.mla.v_head_dim if self.mla else self.head_dim)

    # ---- parameter counts (exact) ------------------------------------------------------------

    def attention_params(self) -> int:
        h = self.hidden_size
        if self.mla:
            m = self.mla
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            if m.q_lora_rank:
                q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * self.heads * qk
            else:
                q = h * self.heads * qk
            kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank \
                + m.kv_lora_rank * self.heads * (m.qk_nope_head_dim + m.v_head_dim)
            return q + kv + self.heads * m.v_head_dim * h
        n = h * self.q_size + 2 * h * self.kv_size + self.attn_out_size * h
        if self.qkv_bias:
            n += self.q_size + 2 * self.kv_size
        if self.o_bias:
            n += h
        if self.attention_sinks:
            n += self.heads
        return n

    def dense_ffn_params(self) -> int:
        return (3 if self.gated_ffn else 2) * self.hidden_size * self.ffn_size

    def expert_params(self) -> int:
        """One routed expert."""
        assert self.moe
        f = self.moe.expert_ffn_size
        n = (3 if self.gated_ffn else 2) * self.hidden_size * f
        if self.moe.expert_bias:
            n += (2 if self.gated_ffn else 1) * f + self.hidden_size
        return n

    def moe_ffn_params(self) -> int:
        m = self.moe
        assert m
        router = self.hidden_size * m.experts + (m.experts if m.router_bias else 0)
        return router + (m.experts + m.shared_experts) * self.expert_params()

    def layer_params(self, layer: int) -> int:
        ffn = self.moe_ffn_params() if self.is_moe_layer(layer) else self.dense_ffn_params()
        return self.attention_params() + ffn + 2 * self.hidden_size

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        return (self.embedding_params() + self.lm_head_params() + self.hidden_size
                + sum(self.layer_params(i) for i in range(self.layers)))

    def linear_params(self, layer: int) -> tuple[int, int]:
        """(the layer's linear-projection weights other than its routed experts', its routed
        experts' weights): what a low-precision checkpoint stores at low precision (precision.py;
        latent attention's absorbed up-projections, norms, biases, sinks and the router stay
        16-bit)."""
        h = self.hidden_size
        if self.mla:
            m = self.mla
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            q = h * m.q_lora_rank + m.q_lora_rank * self.heads * qk if m.q_lora_rank else h * self.heads * qk
            attn = q + h * (m.kv_lora_rank + m.qk_rope_head_dim) + self.heads * m.v_head_dim * h
        else:
            attn = h * self.q_size + 2 * h * self.kv_size + self.attn_out_size * h
        mats = 3 if self.gated_ffn else 2
        if not self.is_moe_layer(layer):
            return attn + mats * h * self.ffn_size, 0
        e = mats * h * self.moe.expert_ffn_size
        return attn + self.moe.shared_experts * e, self.moe.experts * e

    def layer_bytes(self, layer: int, dense: float, expert: float, routed: bool = True) -> float:
        """Bytes of a layer's weights with its linear weights at `dense` and its routed experts'
        at `expert` bytes each, the rest 16-bit (routed=False: without the routed experts)."""
        lin, rt = self.linear_params(layer)
        rest = self.layer_params(layer) - lin - rt
        if not routed:
            rest -= self.moe.experts * self.expert_params() - rt if rt else 0
        return 2 * rest + dense * lin + (expert * rt if routed else 0)

    def active_params(self) -> int:
        """Parameters touched per token (routed experts: experts_per_token of them)."""
        n = self.total_params()
        if self.moe:
            idle = self.moe.experts - self.moe.experts_per_token
            n -= idle * self.expert_params() * (self.layers - self.moe.dense_layers)
        return n

    def weight_bytes(self) -> float:
        """Bytes of all weights in their stored dtypes."""
        total = self.total_params() * DTYPE_BYTES[self.weight_dtype]
        if self.moe and self.moe.expert_weight_dtype:
            experts = self.moe.experts * self.expert_params() * (self.layers - self.moe.dense_layers)
            total += experts * (DTYPE_BYTES[self.moe.expert_weight_dtype] - DTYPE_BYTES[self.weight_dtype])
        return total

    # ---- FLOPs -------------------------------------------------------------------------------

    def attention_flops_per_token(self, context: int) -> int:
        """Scores and weighted sum over `context` cached tokens (a sliding-window layer's window),
        all layers: 2 FLOP per MAC."""
        if self.mla:
            qk = self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim
            per_token = 2 * self.heads * (qk + self.mla.v_head_dim)
        else:
            per_token = 4 * self.heads * self.head_dim
        return per_token * sum(self.attended(i, context) for i in range(self.layers))

    def decode_flops_per_token(self, context: int) -> int:
        """Matrix FLOPs of one decode step: 2 per active weight (embedding lookup excluded)
        plus attention over `context` tokens."""
        return 2 * (self.active_params() - self.embedding_params()) + self.attention_flops_per_token(context)


def _build(doc: dict[str, Any], where: str) -> ModelSpec:
    doc = dict(doc)
    for cls, table, prefix in ((ModelSpec, doc, ""), (MoE, doc.get("moe"), "moe."), (MLA, doc.get("mla"), "mla.")):
        if table is None:
            continue
        if not isinstance(table, dict):
            raise ModelError(f"{where}: {prefix[:-1]} must be a table ([{prefix[:-1]}])")
        known = ({f.name for f in dataclasses.fields(cls)} - {"origin"}) | ({"moe", "mla"} if cls is ModelSpec else set())
        names = [f for f in known if f not in ("moe", "mla")] if cls is ModelSpec else sorted(known)
        for k in table:
            if k not in known:
                raise ModelError(f"{where}: unknown key {prefix}{k} (keys: {', '.join(sorted(names))})")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in table
                   and f.default is dataclasses.MISSING and f.name not in ("moe", "mla")]
        if missing:
            raise ModelError(f"{where}: missing key {prefix}{missing[0]}")
    try:
        moe = MoE(**doc.pop("moe")) if "moe" in doc else None
        mla = MLA(**doc.pop("mla")) if "mla" in doc else None
        if "weight_dtypes" in doc:
            doc["weight_dtypes"] = tuple(doc["weight_dtypes"])
        spec = ModelSpec(moe=moe, mla=mla, **doc)
    except TypeError as e:
        raise ModelError(f"{where}: bad model spec ({e})") from None
    for w in (spec.weight_dtype, *spec.weight_dtypes) + ((spec.moe.expert_weight_dtype,) if spec.moe and
                                                        spec.moe.expert_weight_dtype else ()):
        if w not in DTYPE_BYTES:
            raise ModelError(f"{where}: weight dtype {w!r} is not one of {', '.join(DTYPE_BYTES)}")
    for field in ("sliding_window", "full_attention_every"):
        if not isinstance(getattr(spec, field), int) or getattr(spec, field) < 0:
            raise ModelError(f"{where}: {field} must be a non-negative integer")
    if spec.sliding_window and spec.mla:
        raise ModelError(f"{where}: sliding_window with latent attention (mla) is not modelled")
    for field in ("hidden_size", "layers", "heads", "kv_heads", "head_dim", "ffn_size", "vocab_size"):
        if not isinstance(getattr(spec, field), int) or getattr(spec, field) < 1:
            raise ModelError(f"{where}: {field} must be a positive integer")
    if spec.heads % spec.kv_heads:
        raise ModelError(f"{where}: heads ({spec.heads}) must be a multiple of kv_heads ({spec.kv_heads})")
    if spec.moe:
        m = spec.moe
        for field in ("experts", "experts_per_token", "expert_ffn_size"):
            if not _int(getattr(m, field)) or getattr(m, field) < 1:
                raise ModelError(f"{where}: moe.{field} must be a positive integer")
        for field in ("shared_experts", "dense_layers"):
            if not _int(getattr(m, field)) or getattr(m, field) < 0:
                raise ModelError(f"{where}: moe.{field} must be a non-negative integer")
        if m.experts_per_token > m.experts:
            raise ModelError(f"{where}: moe.experts_per_token ({m.experts_per_token}) exceeds moe.experts "
                             f"({m.experts})")
        if m.dense_layers > spec.layers:
            raise ModelError(f"{where}: moe.dense_layers ({m.dense_layers}) exceeds layers ({spec.layers})")
    if spec.mla:
        for f in dataclasses.fields(spec.mla):
            v = getattr(spec.mla, f.name)
            if not _int(v) or v < (0 if f.name == "q_lora_rank" else 1):
                raise ModelError(f"{where}: mla.{f.name} must be a {'non-negative' if f.name == 'q_lora_rank' else 'positive'} "
                                 "integer")
    return spec


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def model_names() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.toml"))


def load_model(name_or_path: str) -> ModelSpec:
    """A model by name (traces/models/NAME.toml) or by path to a TOML spec."""
    path = Path(name_or_path)
    zoo = path.suffix != ".toml" and "/" not in name_or_path
    if zoo:
        path = MODELS_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise ModelError(f"unknown model {name_or_path!r} (models: {', '.join(model_names())})")
    spec = _build(read_toml(path, "model spec", ModelError), str(path))
    return spec if zoo else dataclasses.replace(spec, origin=str(path.resolve()))


def model_meta(spec: ModelSpec) -> dict[str, str]:
    """What a trace records of its model: the name, and the TOML file of a model outside the zoo
    (so its numpy reference can load it again: spec_of)."""
    return {"model": spec.name, **({"model_file": spec.origin} if spec.origin else {})}


def spec_of(meta: dict) -> ModelSpec:
    """The model a trace's meta names (model_meta)."""
    return load_model(meta.get("model_file") or meta["model"])
