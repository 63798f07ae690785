"""Where a trace's tensors live: the `/tensors` table (docs/trace-format.md).

A tensor (weights, an input, an output, or padding the kernel expects zeroed) is named, has a
role, an element type and a shape; its elements sit in *pieces*: runs of `count` consecutive
SRAM elements on one PE starting at byte `addr` (int4 weights: at nibble `addr`, two a byte,
low first), holding the tensor's elements `start`, `start + stride`, ... in row-major flat
order. Weights may be stored in fp8, int8 or int4 (dequantized by the kernel's SCALE ops).
An element held by several PEs (a replicated input, an all-reduced output) appears in several
pieces. Functional runs fill inputs and weights through the pieces and read outputs back.
"""
from __future__ import annotations

import dataclasses

import h5py
import numpy as np

from . import isa
from .errors import TraceError

# zero: SRAM the kernel expects zeroed (padding, a zero source); constant: SRAM holding `value`;
# index: SRAM holding each element's own flat index (a PE's position in a cut, e.g. its vocab offset)
ROLES = ("input", "weight", "output", "zero", "constant", "index")
LOW = (isa.DTYPE_FP8, isa.DTYPE_INT8, isa.DTYPE_INT4)  # stored weights only (a SCALE op dequantizes them)
DTYPES = (isa.DTYPE_FP16, isa.DTYPE_FP32) + LOW


def addr_units(dtype: int) -> int:
    """Address units per element of a piece: bytes (fp16 2, fp32 4, fp8 and int8 1), or for int4
    one nibble (an int4 piece's addr counts nibbles: 2 x byte, + 1 for the high nibble)."""
    return {isa.DTYPE_FP16: 2, isa.DTYPE_FP32: 4}.get(dtype, 1)


def end_byte(dtype: int, addr, count):
    """The byte after a piece's last element."""
    if dtype == isa.DTYPE_INT4:
        return (addr + count + 1) // 2
    return addr + count * addr_units(dtype)
PIECE_COLUMNS = (("tensor", np.int32), ("pe", np.int32), ("addr", np.int32), ("count", np.int32),
                 ("start", np.int64), ("stride", np.int64))


@dataclasses.dataclass
class Tensor:
    name: str
    role: str  # input, weight or output
    dtype: int  # isa.DTYPE_* of its elements in SRAM (fp16, fp32; weights also fp8, int8, int4)
    shape: tuple[int, ...]
    value: float = 0.0  # a constant's value (every element)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass
class TensorTable:
    tensors: list[Tensor]
    pieces: dict[str, np.ndarray]  # columns of PIECE_COLUMNS

    def index(self, name: str) -> int:
        for i, t in enumerate(self.tensors):
            if t.name == name:
                return i
        raise KeyError(name)

    def of(self, i: int) -> dict[str, np.ndarray]:
        """The pieces of tensor i."""
        sel = self.pieces["tensor"] == i
        return {k: v[sel] for k, v in self.pieces.items()}

    def digest_arrays(self) -> list[bytes]:
        return [repr([dataclasses.astuple(t) for t in self.tensors]).encode()] + \
            [np.ascontiguousarray(self.pieces[k]).tobytes() for k, _ in PIECE_COLUMNS]


class TensorRecorder:
    """Collects tensors and their pieces while a trace is built (MeshBuilder.tensors)."""

    def __init__(self):
        self.tensors: list[Tensor] = []
        self._pieces: list[np.ndarray] = []  # each [n, 6] int64

    def add(self, name: str, role: str, shape: tuple[int, ...], dtype: int = isa.DTYPE_FP16,
            value: float = 0.0) -> int:
        assert role in ROLES and dtype in DTYPES and (dtype not in LOW or role == "weight"), (role, dtype)
        assert all(t.name != name for t in self.tensors), name
        self.tensors.append(Tensor(name, role, int(dtype), tuple(int(s) for s in shape), float(value)))
        return len(self.tensors) - 1

    def index(self, name: str) -> int:
        """The tensor called `name` (added earlier)."""
        return next(k for k, t in enumerate(self.tensors) if t.name == name)

    def pieces(self, tensor: int, pe, addr, count, start, stride=1) -> None:
        """Pieces of `tensor` (arrays broadcast together): count elements at SRAM byte addr of PE
        pe hold the tensor's flat elements start, start + stride, ..."""
        vals = (tensor, pe, addr, count, start, stride)
        lens = {len(v) for v in vals if np.ndim(v) == 1 and len(v) != 1}
        if len(lens) <= 1 and all(np.ndim(v) <= 1 for v in vals):  # (builders call this per PE: fast path)
            a = np.empty((lens.pop() if lens else 1, 6), np.int64)
            for k, v in enumerate(vals):
                a[:, k] = v
        else:
            cols = np.broadcast_arrays(*(np.asarray(v, np.int64) for v in vals))
            a = np.stack([c.reshape(-1) for c in cols], axis=1)
        self._pieces.append(a)

    def build(self) -> TensorTable | None:
        if not self.tensors:
            return None
        a = np.concatenate(self._pieces) if self._pieces else np.zeros((0, 6), np.int64)
        return TensorTable(list(self.tensors), {k: a[:, i].astype(dt) for i, (k, dt) in enumerate(PIECE_COLUMNS)})


def save(f: h5py.File, table: TensorTable) -> None:
    g = f.create_group("tensors")
    g.create_dataset("name", data=np.array([t.name for t in table.tensors], dtype=h5py.string_dtype()))
    g.create_dataset("role", data=np.array([t.role for t in table.tensors], dtype=h5py.string_dtype()))
    g.create_dataset("dtype", data=np.array([t.dtype for t in table.tensors], np.int8))
    g.create_dataset("shape", data=np.array(["x".join(map(str, t.shape)) for t in table.tensors],
                                            dtype=h5py.string_dtype()))
    g.create_dataset("value", data=np.array([t.value for t in table.tensors], np.float64))
    p = g.create_group("pieces")
    for name, dt in PIECE_COLUMNS:
        p.create_dataset(name, data=table.pieces[name].astype(dt), compression="gzip", shuffle=True)


def load(f: h5py.File, path: str, n_pes: int) -> TensorTable | None:
    """The /tensors table of an open trace file, checked (TraceError naming the file)."""
    if "tensors" not in f:
        return None
    g = f["tensors"]
    try:
        names = [_s(v) for v in g["name"][()]]
        roles = [_s(v) for v in g["role"][()]]
        dtypes = [int(v) for v in g["dtype"][()]]
        shapes = [tuple(int(s) for s in _s(v).split("x")) for v in g["shape"][()]]
        values = [float(v) for v in g["value"][()]] if "value" in g else [0.0] * len(names)
        pieces = {k: np.asarray(g["pieces"][k][()]).astype(dt) for k, dt in PIECE_COLUMNS}
    except (KeyError, ValueError, TypeError) as e:
        raise TraceError(f"{path}: /tensors is malformed ({type(e).__name__}: {e})") from None
    if not len(names) == len(roles) == len(dtypes) == len(shapes) == len(values) or len(set(names)) != len(names):
        raise TraceError(f"{path}: /tensors columns differ in length or repeat a name")
    tensors = [Tensor(n, r, d, s, v) for n, r, d, s, v in zip(names, roles, dtypes, shapes, values)]
    for t in tensors:
        if t.role not in ROLES or t.dtype not in DTYPES or (t.dtype in LOW and t.role != "weight") \
                or min(t.shape, default=0) < 1:
            raise TraceError(f"{path}: /tensors entry {t.name!r} has a bad role, dtype or shape")
    table = TensorTable(tensors, pieces)
    p = pieces
    if len({len(v) for v in p.values()}) != 1:
        raise TraceError(f"{path}: /tensors/pieces columns differ in length")
    size = np.array([t.size for t in tensors] + [0], np.int64)
    tid = np.where((p["tensor"] >= 0) & (p["tensor"] < len(tensors)), p["tensor"], len(tensors))
    last = p["start"] + (p["count"].astype(np.int64) - 1) * p["stride"]
    bad = (tid == len(tensors)) | (p["pe"] < 0) | (p["pe"] >= n_pes) | (p["addr"] < 0) | (p["count"] < 1) \
        | (p["start"] < 0) | (last < 0) | (last >= size[tid])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TraceError(f"{path}: /tensors/pieces row {i} lies outside its tensor or the mesh")
    return table


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
