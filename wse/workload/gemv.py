"""MeshGEMV: y[1, N] = x[1, M] . W[M, N] on a P_x x P_y region (docs/workloads.md).

PE (i, j) holds the weight tile W[rows of chunk j, columns of chunk i] (M split over the P_y
rows, N over the P_x columns, chunks differing by at most one) and the input chunk j, which an
earlier step left replicated along its row. It runs one vector FMAC per input element (length
= its column chunk), then the partial outputs are all-reduced along the column. The result,
chunk i of y, ends on every PE of column i: replicated along Y, ready to be the input of a GEMV
whose input axis is X. `reduce_axis` picks the orientation, so successive GEMVs alternate.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import isa
from ..runs import positions
from ..trace import compute, with_tag
from .mesh import X, Y, Axis, Allocator, RegionProgram, split
from .precision import SCRATCH_BYTES, STORE, row_bytes, value_bytes

FP16 = isa.DTYPE_FP16
ELEM = 2  # bytes of a 16-bit element


@dataclasses.dataclass
class GemvShape:
    """Sizes of one GEMV on a region, and where its buffers live."""

    m: int  # input length (reduction dimension)
    n: int  # output length
    reduce_axis: Axis  # axis along which partial outputs are summed
    in_chunks: list[int]  # input chunk per position along reduce_axis
    out_chunks: list[int]  # output chunk per position along the other axis
    weights: int = 0  # address of the tile
    pitch: int = 0  # bytes per tile row (multiple of 8: every row starts in one bank group)
    precision: str = "bf16"  # how the weights are stored (precision.py)
    scratch: int = 0  # where a low-precision tile's rows are dequantized to fp16
    scales: int = 0  # a low-precision tile's scale (fp16; copy c of the tile: scales + c * ELEM)
    # the tile stored by output: each output element's weights contiguous, one DOT per output over
    # the input chunk, instead of one FMAC per input element over the output chunk (a low-precision
    # tile dequantizes a block of outputs' weights at a time)
    dots: bool = False

    @property
    def out_axis(self) -> Axis:
        return X if self.reduce_axis is Y else Y

    @property
    def store(self) -> int:
        """The isa dtype of the stored weights (fp16: used as they are)."""
        return STORE[self.precision]

    def set_pitch(self) -> None:
        """Row pitch for the widest output chunk at the shape's precision (by output: the widest
        input chunk), a multiple of 8 bytes."""
        width = row_bytes(self.precision, max(self.in_chunks if self.dots else self.out_chunks))
        self.pitch = -(-width // 8) * 8

    def tile_bytes(self) -> int:
        return max(self.out_chunks if self.dots else self.in_chunks) * self.pitch

    def scratch_pitch(self) -> int:
        """Bytes of one dequantized row: a stored byte per element of the dequantize op."""
        return self.pitch * isa.DTYPE_DST_BYTES[self.store]

    def block_rows(self) -> int:
        """Tile rows one dequantize op converts (its fp16 rows within SCRATCH_BYTES)."""
        return max(1, SCRATCH_BYTES // self.scratch_pitch())

    def stored_rows(self) -> list[int]:
        """The tile's stored rows per position: input rows, or by output the output columns."""
        return self.out_chunks if self.dots else self.in_chunks

    def scratch_bytes(self) -> int:
        """The fp16 scratch a low-precision tile needs (0 for fp16 weights)."""
        return 0 if self.store == FP16 else min(self.block_rows(), max(self.stored_rows())) * self.scratch_pitch()

    def weight_bytes(self) -> float:
        """Bytes of real weights over the region (no padding), at the shape's precision."""
        return self.m * self.n * value_bytes(self.precision)

    def dequant_flops(self) -> int:
        """FLOPs of dequantizing every tile once (one per stored value, padding included), summed
        over the PEs that hold a tile."""
        if self.store == FP16:
            return 0
        rows = self.n * sum(1 for c in self.in_chunks if c) if self.dots \
            else self.m * sum(1 for c in self.out_chunks if c)
        return rows * self.pitch * isa.DTYPE_VALUES[self.store]


def dots_cheaper(shape: GemvShape, cfg) -> bool:
    """Whether the longest tile's products take fewer cycles as DOTs over the outputs (nt ops
    of mt elements) than as FMACs over the inputs (mt ops of nt): each op pays the vector setup,
    so the form with fewer, longer ops wins (the ops' SIMD widths and ports; a low-precision tile
    runs them on its dequantized fp16 rows, and dequantizes every stored value either way)."""
    mt, nt = max(shape.in_chunks), max(shape.out_chunks)
    port = cfg.sram_port_bytes // ELEM

    def steps(kind: int, n: int) -> int:
        return -(-n // min(cfg.simd_width(kind, FP16) or cfg.simd_width(isa.KIND_FMAC, FP16), port))

    setup = cfg.vector_setup_cycles
    return nt * (setup + steps(isa.KIND_DOT, mt)) < mt * (setup + steps(isa.KIND_FMAC, nt))


def choose_form(shape: GemvShape, form: str, cfg) -> None:
    """Store the tile by output (`form` "dot"), by input ("axpy"), or ("auto") whichever takes
    fewer cycles on `cfg` (dots_cheaper; by input without a configuration). The form also moves
    the padding (each stored row is padded to 8 bytes), so a tile may grow or shrink."""
    shape.dots = form == "dot" or (form == "auto" and cfg is not None and dots_cheaper(shape, cfg))


def tile_form(params, name: str, precision: str) -> str:
    """The form (params.py) of GEMV tile `name` stored at `precision`: a down tile follows
    down_gemv, except that under down_gemv "auto" a low-precision one follows gemv_form (by
    input unless that says otherwise, as before both existed); every other tile gemv_form."""
    if name == "down" and (params.down_gemv != "auto" or STORE[precision] == FP16):
        return params.down_gemv
    return params.gemv_form


def plan_gemv(m: int, n: int, reduce_axis: Axis, px: int, py: int) -> GemvShape:
    rn, on = (py, px) if reduce_axis is Y else (px, py)
    return GemvShape(m, n, reduce_axis, split(m, rn), split(n, on))


def alloc_gemv(shape: GemvShape, mem: Allocator, name: str) -> None:
    shape.set_pitch()
    shape.weights = mem.alloc(name, shape.tile_bytes(), "weights")


def gemv_ops(shape: GemvShape, in_pos: int, out_pos: int, x: int, y: int, batch: int = 1,
             x_stride: int = 0, y_stride: int = 0) -> list:
    """The local FMACs of the PE at (in_pos along the reduce axis, out_pos along the other).

    For each of `batch` input vectors (at x + b * x_stride), one FMAC per input element
    accumulates a weight row into the output chunk at y + b * y_stride.
    """
    mt, nt = shape.in_chunks[in_pos], shape.out_chunks[out_pos]
    if nt == 0:
        return []
    low = shape.store != FP16
    # (everything the ops depend on: region builders ask for the same tile many times)
    key = (mt, nt, shape.store, shape.weights, shape.pitch, shape.dots, x, y, batch, x_stride, y_stride) \
        + ((shape.scratch, shape.scales, shape.block_rows(), shape.scratch_pitch()) if low else ())
    ops = _GEMV_OPS.get(key) if _GEMV_OPS_MAX > 0 else None
    if ops is None:
        ops = _gemv_ops(shape, mt, nt, x, y, batch, x_stride, y_stride)
        _GEMV_HELD[0] += len(ops)
        if _GEMV_HELD[0] > _GEMV_OPS_MAX:
            _GEMV_OPS.clear()
            _GEMV_HELD[0] = len(ops)
        _GEMV_OPS[key] = ops
    return list(ops)


_GEMV_OPS: dict[tuple, list] = {}
_GEMV_HELD = [0]  # ops _GEMV_OPS holds
_GEMV_OPS_MAX = 200_000  # ops remembered at most (~30 MB; a decode tile has tens to hundreds)


def _gemv_ops(shape: GemvShape, mt: int, nt: int, x: int, y: int, batch: int, x_stride: int, y_stride: int) -> list:
    stored = nt if shape.dots else mt  # the tile's stored rows: its outputs by output, its inputs by input

    def product(b: int, r: int, w: int):  # sequence b times stored row r (its 16-bit weights at w)
        if shape.dots:  # a DOT per output element: its weights . the input chunk
            return compute(isa.KIND_DOT, mt, dst=y + b * y_stride + r * ELEM, src0=w, src1=x + b * x_stride,
                           dtype=FP16)
        return compute(isa.KIND_FMAC, nt, dst=y + b * y_stride, src0=w, src1=x + b * x_stride + r * ELEM, dtype=FP16)
    if shape.store == FP16:
        return [product(b, r, shape.weights + r * shape.pitch) for b in range(batch) for r in range(stored)]
    k, sp = shape.block_rows(), shape.scratch_pitch()
    ops = []
    for r0 in range(0, stored if mt else 0, k):  # dequantize a block of stored rows, then their products
        rows = min(k, stored - r0)
        ops.append(compute(isa.KIND_SCALE, rows * shape.pitch, dst=shape.scratch,
                           src0=shape.weights + r0 * shape.pitch, src1=shape.scales, dtype=shape.store))
        ops += [product(b, r, shape.scratch + (r - r0) * sp) for b in range(batch) for r in range(r0, r0 + rows)]
    return ops


def tile_addr(shape: GemvShape, row, col, copy: int = 0):
    """Where element (row, col) of a PE's tile (copy `copy`) lies, in /tensors address units: a
    byte address, or for an int4 tile a nibble address (tensors.addr_units)."""
    run, at = (col, row) if shape.dots else (row, col)  # the stored row, the element in it
    base = shape.weights + copy * shape.tile_bytes() + run * shape.pitch
    if shape.store == FP16:
        return base + at * ELEM
    return 2 * base + at if shape.store == isa.DTYPE_INT4 else base + at


def tile_pieces(t, tensor: int, shape: GemvShape, pe, row, col, count, start, copy: int = 0, stride=1) -> None:
    """Tensor pieces of `count` elements of tile row `row` from column `col` (PE arrays broadcast
    together), holding the tensor's elements start, start + stride, ...: one piece per run by
    input; by output the run's elements lie a pitch apart, one piece each."""
    if not shape.dots:
        t.pieces(tensor, pe, tile_addr(shape, row, col, copy), count, start, stride)
        return
    pe, row, col, count, start, stride = np.broadcast_arrays(
        *(np.atleast_1d(np.asarray(v, np.int64)) for v in (pe, row, col, count, start, stride)))
    k = np.repeat(np.arange(len(pe)), count)  # a piece per element
    e = positions(count)  # its place in the run
    t.pieces(tensor, pe[k], tile_addr(shape, row[k], col[k] + e, copy), 1, start[k] + e * stride[k])


def record_scale(t, names: str, shape: GemvShape, pe, copies: dict[int, int], n: int) -> None:
    """The scale tensor of a low-precision tile's weights (`names`: the tensors it scales, joined
    by '+'; [n], copy c holding element copies[c]) on the PEs `pe`; nothing for fp16 tiles."""
    if shape.store == FP16:
        return
    k = weight_tensor(t, f"{names}.scale", (n,))
    for c, e in copies.items():
        t.pieces(k, pe, shape.scales + c * ELEM, 1, e)


def weight_tensor(t, name: str, shape: tuple, dtype: int = FP16) -> int:
    """The weight tensor `name`: added now, or by an earlier region of the step."""
    try:
        return t.index(name)
    except StopIteration:
        return t.add(name, "weight", shape, dtype)


def alloc_scales(mem: Allocator, shapes: dict[str, GemvShape], copies: dict[str, int]) -> None:
    """One fp16 scale per copy of each low-precision tile, last (no other buffer moves)."""
    low = [k for k, sh in shapes.items() if sh.store != FP16]
    at = mem.alloc("w_scales", sum(copies[k] for k in low) * ELEM, "constants")
    for k in low:
        shapes[k].scales, at = at, at + copies[k] * ELEM


def gemv_flops(shape: GemvShape, batch: int = 1) -> int:
    """Local FMAC FLOPs over the region: 2 M N per input vector."""
    return 2 * shape.m * shape.n * batch


def reduce_flops(shape: GemvShape, lines: int, batch: int = 1) -> int:
    """Adds of the all-reduce: (positions - 1) per output element per vector."""
    return (lines - 1) * shape.n * batch


def standalone(m: int, n: int, px: int, py: int, cfg, algo: str = "two-level", groups: int | None = None,
               batch: int = 1, weights: str = "bf16"):
    """A GEMV kernel trace on a px x py region, its weights stored at precision `weights`
    (dequantized block by block before the FMACs): (trace, facts) with analytic FLOPs and bytes."""
    from ..errors import WseError
    from .mesh import MeshBuilder, Region, tagged
    from .plan import AxisCollectives, fit_check

    if m < 1 or n < 1 or px < 1 or py < 1:
        raise WseError("gemv: --m, --n and the region sizes must be positive")
    if py > m or px > n:
        raise WseError(f"gemv: a {px}x{py} region needs m >= {py} and n >= {px} (every PE gets a tile)")
    if weights not in STORE:
        raise WseError(f"gemv: --weights {weights!r} is not one of {', '.join(STORE)}")
    region = Region(0, 0, px, py)
    shape, mem, (x, y, tmp) = _layout(m, n, px, py, cfg, batch, weights)
    fit_check(mem, cfg, f"gemv {m}x{n} on {px}x{py}" + (f" (batch {batch})" if batch > 1 else ""))
    b = MeshBuilder(px, py, 2, kernel="gemv", m=m, n=n, region=f"{px}x{py}", algo=algo, batch=batch,
                    weights=weights)
    coll = AxisCollectives(region, b, algo=algo, groups=groups, axes=(Y,))
    red = coll.reduce[Y]
    prog = RegionProgram(region, 2)
    prog.add_roles(X, [shape.out_chunks[i] for i in range(px)])
    prog.add_roles(Y, [(shape.in_chunks[j], red.role(j)) for j in range(py)])
    in_index = {c: shape.in_chunks.index(c) for c in shape.in_chunks}
    out_index = {c: shape.out_chunks.index(c) for c in shape.out_chunks}

    t_local, t_reduce = b.tag("gemv", -1, "gemv"), b.tag("allreduce", -1, "allreduce")

    def body(xr, yr, _sp):
        nt, (mt, role) = xr[0], yr[0]
        # the batch's output chunks back to back: the all-reduce takes them as one nt * batch vector
        ops = gemv_ops(shape, in_index[mt], out_index[nt], x, y, batch, max(shape.in_chunks) * ELEM, nt * ELEM)
        out = tagged(red.role_ops(role, nt * batch, y, tmp), t_reduce)
        out[0] = [with_tag(op, t_local) for op in ops] + out.get(0, [])
        return out

    prog.add(body)
    prog.program_ids(b)
    record_tensors(b, shape, px, py, x, y, batch)
    trace = b.build()
    facts = {
        "model_flops": gemv_flops(shape, batch),
        "reduce_flops": reduce_flops(shape, py, batch),
        "dequant_flops": shape.dequant_flops(),
        "weight_bytes": shape.weight_bytes(),
        "allocated_weight_bytes": shape.tile_bytes() * px * py,
        "sram_bytes_per_pe": mem.used,
    }
    return trace, facts


def record_tensors(b, shape: GemvShape, px: int, py: int, x: int, y: int, batch: int) -> None:
    """/tensors of a standalone GEMV (reduce axis Y): x [batch, m] (chunk j on every PE of row j),
    w [m, n] (PE (i, j): rows of chunk j, columns of chunk i, one piece per row; stored at the
    tile's precision, with `w.scale` where it is low) and y [batch, n] (chunk i, the batch's back
    to back, on every PE of column i once all-reduced)."""
    import numpy as np

    from .mesh import offsets
    mt, nt = np.array(shape.in_chunks), np.array(shape.out_chunks)
    i0, o0 = np.array(offsets(shape.in_chunks)), np.array(offsets(shape.out_chunks))
    jj, ii, bb = np.meshgrid(np.arange(py), np.arange(px), np.arange(batch), indexing="ij")
    pe = jj * px + ii
    xs = max(shape.in_chunks) * ELEM
    m, n = shape.m, shape.n
    t = b.tensors
    t.pieces(t.add("x", "input", (batch, m)), pe, x + bb * xs, mt[jj], bb * m + i0[jj])
    t.pieces(t.add("y", "output", (batch, n)), pe, y + bb * nt[ii] * ELEM, nt[ii], bb * n + o0[ii])
    w = t.add("w", "weight", (m, n), shape.store)
    for j in range(py):  # one piece per tile row
        r = np.arange(mt[j])
        jp, rr = np.meshgrid(np.arange(px), r, indexing="ij")
        t.pieces(w, j * px + jp, tile_addr(shape, rr, 0), nt[jp], (i0[j] + rr) * n + o0[jp])
    record_scale(t, "w", shape, np.arange(px * py), {0: 0}, 1)


def _layout(m: int, n: int, px: int, py: int, cfg, batch: int, weights: str):
    """A standalone GEMV's tile shape, its allocator and the x, y, tmp buffers."""
    shape = plan_gemv(m, n, Y, px, py)
    shape.precision = weights
    mem = Allocator(0, cfg.sram_bytes - cfg.sram_reserved_bytes)
    alloc_gemv(shape, mem, "w")
    if shape.scratch_bytes():
        shape.scratch = mem.alloc("dequant", shape.scratch_bytes(), "scratch")
    nt = max(shape.out_chunks) * batch
    x = mem.alloc("x", max(shape.in_chunks) * batch * ELEM, "activations")
    y = mem.alloc("y", nt * ELEM, "activations", bank_offset=4)
    tmp = mem.alloc("tmp", nt * ELEM, "scratch")
    if shape.store != FP16:
        shape.scales = mem.alloc("w_scale", ELEM, "constants")
    return shape, mem, (x, y, tmp)


def largest_batch(m: int, n: int, px: int, py: int, cfg, limit: int, weights: str = "bf16") -> int:
    """The most input vectors (at most `limit`) one standalone GEMV on a px x py region holds in
    SRAM beside its weight tile; 0 if not even one fits."""
    from .plan import usable_sram
    usable = usable_sram(cfg)
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _layout(m, n, px, py, cfg, mid, weights)[1].top <= usable:
            lo = mid
        else:
            hi = mid - 1
    return lo
