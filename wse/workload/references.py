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


def _layer(meta: dict, x: dict) -> dict:
    from .layer_tensors import reference
    return reference(meta, x)


def _step(meta: dict, x: dict) -> dict:
    from .step_tensors import reference
    return reference(meta, x)


REFERENCES: dict[str, Callable[[dict, dict], dict]] = {"gemv": _gemv, "allreduce": _allreduce, "gemm": _gemm,
                                                       "layer": _layer, "decode_step": _step}


def expected(trace: Trace, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference outputs of the kernel that made `trace` (meta 'kernel')."""
    kernel = trace.meta.get("kernel", "")
    if kernel not in REFERENCES:
        raise WseError(f"no numpy reference for a trace made by {kernel or 'an unnamed generator'!r} "
                       f"(references: {', '.join(REFERENCES)})")
    return REFERENCES[kernel](trace.meta, inputs)
