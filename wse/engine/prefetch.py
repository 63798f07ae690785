"""A software prefetch for the kernels: a hint that brings an array element's cache line in
early, so the cache misses of many PEs' records overlap instead of stalling one after another.
It changes no value (docs/performance.md, "Overlapping the misses")."""
from __future__ import annotations

from llvmlite import ir
from numba import types
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
