"""numpy references: what each kernel's outputs should be, computed in float64 from its inputs
(functional runs compare the simulated outputs with these; docs/model.md, "Values")."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import WseError
from ..trace import Trace


def _gemv(meta: dict, x: dict) -> dict:
    return {"y": x["x"] @ x["w"]}


def _allreduce(meta: dict, x: dict) -> dict:
    return {"sum": x["x"].sum(axis=1 if meta.get("axis") == "x" else 0)}


def _gemm(meta: dict, x: dict) -> dict:
    return {"C": x["A"] @ x["B"]}


def _attention(meta: dict, x: dict) -> dict:
    """The attention kernel: q | k | v (after RoPE) over the KV cache."""
    from .layer_tensors import attend
    from .models import ModelSpec
    heads, kv_heads, hd = int(meta["heads"]), int(meta["kv_heads"]), int(meta["head_dim"])
    spec = ModelSpec(name="attention", hidden_size=heads * hd, layers=1, heads=heads, kv_heads=kv_heads,
                     head_dim=hd, ffn_size=1, vocab_size=1)
    qkv = x["qkv"]
    B, qs, kvs = qkv.shape[0], spec.q_size, spec.kv_size
    q, k, v = (qkv[:, a:b].reshape(B, -1, hd) for a, b in ((0, qs), (qs, qs + kvs), (qs + kvs, qs + 2 * kvs)))
    return {"attn": attend(spec, q, k, v, x).reshape(B, -1)}


def _prefill_elementwise(meta: dict, x: dict) -> dict:
    from .prefill_elementwise import reference
    return reference(meta, x)


def _prefill_softmax_block(meta: dict, x: dict) -> dict:
    from .prefill_blocks import reference
    return reference(meta, x)


def _layer(meta: dict, x: dict) -> dict:
    from .layer_tensors import reference
    return reference(meta, x)


def _step(meta: dict, x: dict) -> dict:
    from .step_tensors import reference
    return reference(meta, x)


REFERENCES: dict[str, Callable[[dict, dict], dict]] = {
    "gemv": _gemv, "allreduce": _allreduce, "gemm": _gemm, "attention": _attention, "layer": _layer,
    "decode_step": _step, "prefill-elementwise": _prefill_elementwise,
    "prefill-softmax-block": _prefill_softmax_block}


def dequantized(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs with each low-precision weight's codes times its scale: `<a>+<b>.scale` [n]
    scales the tensors a and b (names after a's prefix, `layer1.`), element e of it their e-th
    slice along the first axis (n = 1: all of it)."""
    out = dict(x)
    for key, s in x.items():
        if not key.endswith(".scale"):
            continue
        first, *rest = key[:-len(".scale")].split("+")
        prefix = first[:first.rfind(".") + 1]
        for name in [first] + [prefix + r for r in rest]:
            w = x[name]
            out[name] = w * (s[0] if s.size == 1 else s.reshape((-1,) + (1,) * (w.ndim - 1)))
    return out


def expected(trace: Trace, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference outputs of the kernel that made `trace` (meta 'kernel'), its weights dequantized."""
    kernel = trace.meta.get("kernel", "")
    if kernel not in REFERENCES:
        raise WseError(f"no numpy reference for a trace made by {kernel or 'an unnamed generator'!r} "
                       f"(references: {', '.join(REFERENCES)})")
    return REFERENCES[kernel](trace.meta, dequantized(inputs))
