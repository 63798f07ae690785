"""Single-kernel traces: an all-reduce, and decode attention over a distributed KV cache."""
from __future__ import annotations


from ..errors import WseError
from ..hardware import WaferConfig
from ..trace import Trace
from .layer import decode_layer
from .layer_sizes import plan_layer
from .params import DecodeParams
from .region import THREADS, Lanes, reducers
from .mesh import X, Y, Allocator, MeshBuilder, Region, RegionProgram, tagged
from .models import ModelSpec
from .plan import fit_check

ELEM = 2


def allreduce(region: tuple[int, int], elements: int, axis: str, cfg: WaferConfig, algo: str = "two-level",
              groups: int | None = None) -> tuple[Trace, dict[str, int]]:
    """Every line of a region along `axis` all-reduces an `elements`-long fp16 vector."""
    if axis not in ("x", "y"):
        raise WseError(f"--axis {axis!r}: x or y")
    w, h = region
    if elements < 1:
        raise WseError("--elements must be positive")
    R = Region(0, 0, w, h)
    mem = Allocator(0, cfg.sram_bytes - cfg.sram_reserved_bytes)
    buf = mem.alloc("vector", elements * ELEM, "activations", 4)
    tmp = mem.alloc("tmp", elements * ELEM, "scratch")
    fit_check(mem, cfg, f"an all-reduce of {elements} elements")
    b = MeshBuilder(w, h, THREADS, kernel="allreduce", elements=elements, axis=axis, algo=algo)
    params = DecodeParams(algo=algo, groups=groups)
    red = reducers(R, b, params, cfg=cfg)
    ax = X if axis == "x" else Y
    prog = RegionProgram(R, THREADS)
    roles = [red[ax].role(p) for p in range(R.size(ax))]
    if ax is X:
        prog.add_roles(X, roles)
        prog.add_roles(Y, [0] * h)
    else:
        prog.add_roles(X, [0] * w)
        prog.add_roles(Y, roles)
    t = b.tag("allreduce", -1, "allreduce")
    prog.add(lambda xr, yr, sp: tagged(red[ax].role_ops((xr if ax is X else yr)[0], elements, buf, tmp), t))
    prog.program_ids(b)
    # /tensors: each PE's vector in, the line's sum out (in place)
    import numpy as np
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    b.tensors.pieces(b.tensors.add("x", "input", (h, w, elements)), yy * w + xx, buf, elements,
                     (yy * w + xx) * elements)
    line = yy if ax is X else xx
    b.tensors.pieces(b.tensors.add("sum", "output", (h if ax is X else w, elements)), yy * w + xx, buf, elements,
                     line * elements)
    lines = h if ax is X else w
    n = R.size(ax)
    return b.build(), {"model_flops": 0, "allreduce_flops": lines * (n - 1) * elements,
                       "sram_bytes_per_pe": mem.used}


def attention(P: int, heads: int, kv_heads: int, head_dim: int, context: int, batch: int, cfg: WaferConfig,
              algo: str = "two-level", groups: int | None = None, mapping: str = "flash", block: int = 0
              ) -> tuple[Trace, dict[str, int]]:
    """Decode attention (KV append and shift, scores, softmax, weighted values) on a P x P region
    (`mapping`: flash or classic, `block`: flash's tokens per block, 0 automatic).

    The q, k and v of the new token are taken as already split over the rows (what the QKV
    projection of a layer leaves); see layer.py for the layout.
    """
    if heads < 1 or kv_heads < 1 or head_dim < 1 or heads % kv_heads:
        raise WseError("--heads must be a positive multiple of --kv-heads; --head-dim positive")
    hidden = heads * head_dim
    spec = ModelSpec(name="attention", hidden_size=hidden, layers=1, heads=heads, kv_heads=kv_heads,
                     head_dim=head_dim, ffn_size=P, vocab_size=P)
    params = DecodeParams(batch=batch, context=context, algo=algo, groups=groups, attention=mapping,
                          attention_block=block)
    plan = plan_layer(spec, 0, P, cfg, params)
    b = MeshBuilder(P, P, 4, kernel="attention", heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                    context=context, batch=batch, region=f"{P}x{P}", algo=algo, attention=mapping)
    build = decode_layer(plan, Region(0, 0, P, P), b, Lanes(None, {}, None, {}), parts=("attention",))
    from .layer_tensors import record_attention_kernel
    record_attention_kernel(b.tensors, plan)
    return b.build(), {"model_flops": build.model_flops,
                       "executed_flops": sum(build.flops.values()),
                       "kv_cache_bytes": build.kv_bytes, "sram_bytes_per_pe": plan.mem.top}
