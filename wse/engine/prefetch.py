"""A software prefetch for the kernels: a hint that brings an array element's cache line in
early, so the cache misses of many PEs' records overlap instead of stalling one after another.
It changes no value (docs/performance.md, "Overlapping the misses")."""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def prefetch(typingctx, arr, idx):
    """Prefetch arr[idx] (a 1-D contiguous array, an unsigned index) for reading into all cache
    levels: llvm.prefetch, a no-op where the target has none."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        ary, i = args
        data = context.make_array(signature.args[0])(context, builder, ary).data
        ptr = builder.bitcast(builder.gep(data, [i]), ir.IntType(8).as_pointer())  # one declaration for all types
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in all levels, data cache
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def passes_pay(busy_last, x0, x1, y0, y1):
    """Whether a phase's prefetch pass over tile [x0, x1) x [y0, y1) pays, given how many of its
    PEs that phase stepped at the tile's last visit. Not for a one-row tile where over half were:
    its records lie in one run, read in order, which the hardware prefetcher follows by itself
    (dense traffic: the passes cost a quarter of the time). A 2-D tile's records lie in short runs
    a mesh row apart, where the passes pay even when most of its PEs are busy (a Kimi K2 group
    stage on 8x8 tiles: a quarter slower without them)."""
    return y1 - y0 > 1 or 2 * busy_last <= x1 - x0
