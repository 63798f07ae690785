"""Weight precision: how a model's linear weights are stored on the wafer (docs/workloads.md,
"Weight precision").

The CE multiplies in 16 bits; weights stored in fewer bits are dequantized (decoded and scaled)
into a small fp16 scratch by a vector op of their own dtype before the FMACs that use them,
block of tile rows by block: fewer bytes in SRAM (fewer wafers), more cycles per weight. Which
weights: every linear projection of attention, the dense FFN and the experts; norms, biases,
the router, attention sinks, latent attention's absorbed up-projections, the embedding and the
LM head stay 16-bit, as in the published low-precision checkpoints.
"""
from __future__ import annotations

from .. import isa
from ..errors import WseError

WEIGHTS = ("bf16", "fp8", "int8", "int4")
CHECKPOINT = {"bf16": "bf16", "fp16": "bf16", "fp8": "fp8", "int8": "int8", "int4": "int4", "mxfp4": "int4"}
STORE = {"bf16": isa.DTYPE_FP16, "fp8": isa.DTYPE_FP8, "int8": isa.DTYPE_INT8, "int4": isa.DTYPE_INT4}
INT4_GROUP = 32  # int4 values share one 8-bit scale per group (MXFP4-like)
SCRATCH_BYTES = 2048  # fp16 weights one dequantize op fills at most (a block of tile rows) [assumption]


def value_bytes(w: str) -> float:
    """Bytes a weight takes stored at precision w, its share of scales included."""
    return {"bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 1.0 / INT4_GROUP}[w]


def row_bytes(w: str, n: int) -> int:
    """Bytes of one stored tile row of n weights (scales of int4 groups with their row)."""
    if w == "int4":
        return -(-n // 2) + -(-n // INT4_GROUP)
    return n * (2 if w == "bf16" else 1)


def published(spec) -> tuple[str, ...]:
    """The precisions the model is published in (its TOML's weight_dtypes, else its weight_dtype)."""
    names = spec.weight_dtypes or (spec.weight_dtype,)
    out = tuple(dict.fromkeys(CHECKPOINT[n] for n in names))
    if spec.moe and spec.moe.expert_weight_dtype:
        out = tuple(dict.fromkeys(out + (CHECKPOINT[spec.moe.expert_weight_dtype],)))
    return out


def check_weights(spec, weights: str | None) -> None:
    """A model runs in a precision it is published in, or in bf16 (any checkpoint widens to it)."""
    if weights is None:
        return
    if weights not in WEIGHTS:
        raise WseError(f"--weights {weights!r} is not one of {', '.join(WEIGHTS)}")
    ok = ("bf16",) + published(spec)
    if weights not in ok:
        raise WseError(f"--weights {weights}: {spec.name} is published in {' and '.join(published(spec))} only "
                       f"(a model runs in a precision it is published in, or in bf16)")


def weights_of(spec, weights: str | None) -> tuple[str, str]:
    """(precision of the dense linear weights, of the routed experts'): `weights` for both, or by
    default the model's published checkpoint (its weight_dtype, expert_weight_dtype)."""
    check_weights(spec, weights)
    if weights is not None:
        return weights, weights
    dense = CHECKPOINT[spec.weight_dtype]
    expert = CHECKPOINT[spec.moe.expert_weight_dtype] if spec.moe and spec.moe.expert_weight_dtype else dense
    return dense, expert
