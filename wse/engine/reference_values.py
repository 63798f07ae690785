"""Element values for the reference stepper's functional runs, written with numpy's types from
docs/model.md ("Values") and independently of values.py (which the Numba evaluator uses).

Operands are decoded to float64, the kind is applied, and the result is rounded once, to
nearest-even, into the destination type by numpy's casts. A wavelet's payload is an int: an fp16
value's 16 bits or an fp32 value's 32 bits.
"""
from __future__ import annotations

import numpy as np

from .. import isa

_F16, _F32 = np.dtype("<f2"), np.dtype("<f4")
_SRC = {isa.DTYPE_FP16: "f16", isa.DTYPE_FP32: "f32", isa.DTYPE_MIXED: "f16", isa.DTYPE_FP8: "fp8",
        isa.DTYPE_INT8: "i8", isa.DTYPE_INT4: "i4"}
_DST = {isa.DTYPE_FP32: "f32", isa.DTYPE_MIXED: "f32"}  # every other dtype writes fp16


def src_type(dtype: int) -> str:
    return _SRC[dtype]


def dst_type(dtype: int) -> str:
    return _DST.get(dtype, "f16")


def _e4m3(b: int) -> float:
    s, e, m = b >> 7, (b >> 3) & 15, b & 7
    if e == 15 and m == 7:
        return float("nan")
    v = m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -v if s else v


def load(mem: np.ndarray, addr: int, t: str) -> float:
    if t == "f16":
        return float(mem[addr:addr + 2].view(_F16)[0])
    if t == "f32":
        return float(mem[addr:addr + 4].view(_F32)[0])
    if t == "fp8":
        return _e4m3(int(mem[addr]))
    return float(mem[addr:addr + 1].view(np.int8)[0])  # i8


_NAN = {"f16": 0x7E00, "f32": 0x7FC00000}  # a NaN result is stored and sent as the canonical quiet NaN


def store(mem: np.ndarray, addr: int, t: str, x: float) -> None:
    if x != x:
        mem[addr:addr + (2 if t == "f16" else 4)] = np.array([_NAN[t]], np.uint16 if t == "f16" else np.uint32
                                                             ).view(np.uint8)
        return
    with np.errstate(over="ignore"):  # overflow rounds to infinity
        a = np.array([x], np.float64).astype(_F16 if t == "f16" else _F32)
    mem[addr:addr + a.itemsize] = a.view(np.uint8)


def payload(t: str, x: float) -> int:
    if x != x:
        return _NAN[t]
    a = np.array([x], np.float64)
    with np.errstate(over="ignore"):
        return int(a.astype(_F16).view(np.uint16)[0]) if t == "f16" else int(a.astype(_F32).view(np.uint32)[0])


def from_payload(t: str, p: int) -> float:
    if t == "f16":
        return float(np.array([p & 0xFFFF], np.uint16).view(_F16)[0])
    return float(np.array([p], np.uint32).view(_F32)[0])


def apply(kind: int, a: float, b: float, acc: float, e: int = 0) -> float:
    """FMAC: acc + a * b (b the scalar); MOV: a; SCALE: a * b (b the scalar); ADD, SUB, MUL, MAX of a, b;
    DOT: acc + a * b; RSUM: acc + a; RMAX: max(acc, a); RFIND: max(acc, -e) where a equals the scalar b
    (e: the element's index); EXP: exp(a - b), RSQRT: 1 / sqrt(a + b) (b the scalar); RECIP; SILU."""
    if kind == isa.KIND_FMAC:
        return acc + a * b
    if kind == isa.KIND_ADD:
        return a + b
    if kind == isa.KIND_SUB:
        return a - b
    if kind in (isa.KIND_MUL, isa.KIND_SCALE):
        return a * b
    if kind == isa.KIND_MAX:
        return a if (a >= b or a != a) else b
    if kind == isa.KIND_DOT:
        return acc + a * b
    if kind == isa.KIND_RSUM:
        return acc + a
    if kind == isa.KIND_RMAX:
        return acc if (acc >= a or acc != acc) else a
    if kind == isa.KIND_RFIND:
        return acc if (a != b or acc >= -e) else float(-e)
    if kind == isa.KIND_FILL:
        return b
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if kind == isa.KIND_EXP:
            return float(np.exp(np.float64(a) - b))
        if kind == isa.KIND_RSQRT:
            return float(np.float64(1.0) / np.sqrt(np.float64(a) + b))
        if kind == isa.KIND_RECIP:
            return float(np.float64(1.0) / np.float64(a))
        if kind == isa.KIND_SILU:
            return float(np.float64(a) / (1.0 + np.exp(-np.float64(a))))
    return a  # MOV


def element(mem: np.ndarray, op, e: int, w: float | None) -> float | None:
    """Element e of a compute-kind op (w: the received wavelet's value, replacing the kind's last
    source). Writes dst unless the op sends; returns the value to send, else None."""
    st, dt = src_type(op.dtype), dst_type(op.dtype)
    sb, db = isa.DTYPE_SRC_BYTES[op.dtype], isa.DTYPE_DST_BYTES[op.dtype]
    scalar_t = "f32" if op.dtype == isa.DTYPE_FP32 else "f16"
    k = op.kind
    if k == isa.KIND_SCALE and st == "i4":
        byte = int(mem[op.src0 + e])
        s = load(mem, op.src1, scalar_t)
        for half, nib in enumerate((byte & 15, byte >> 4)):
            store(mem, op.dst + e * db + 2 * half, "f16", (nib - 16 if nib >= 8 else nib) * s)
        return None
    acc = 0.0
    out = op.dst + e * db
    if k == isa.KIND_FMAC:
        acc = load(mem, op.dst + e * db, dt)
        a = w if w is not None else load(mem, op.src0 + e * sb, st)
        b = load(mem, op.src1, scalar_t)
    elif k == isa.KIND_FILL:  # no source: the scalar
        a, b = 0.0, load(mem, op.src1, scalar_t)
    elif isa.KIND_SOURCES[k] == 1:
        a = w if w is not None else load(mem, op.src0 + e * sb, st)
        b = load(mem, op.src1, scalar_t) if k in isa.KIND_SCALAR else 0.0
        if k in isa.KIND_REDUCES:  # the stride-0 accumulator
            out = op.dst
            acc = load(mem, out, dt)
    else:
        a = load(mem, op.src0 + e * sb, st)
        b = w if w is not None else load(mem, op.src1 + e * sb, st)
        if k == isa.KIND_DOT:  # the stride-0 accumulator
            out = op.dst
            acc = load(mem, out, dt)
    r = apply(k, a, b, acc, e)
    if op.opcode == isa.OP_RECV_COMPUTE_SEND:
        return r
    store(mem, out, dt, r)
    return None


def step(mem: np.ndarray, op, e: int, w_payload: int | None) -> int | None:
    """Element e of any data op; returns the payload it sends, if it sends."""
    in_t = "f32" if op.dtype == isa.DTYPE_FP32 else "f16"
    w = from_payload(in_t, w_payload) if w_payload is not None else None
    if op.opcode == isa.OP_SEND:
        st = src_type(op.dtype)
        return payload(st, load(mem, op.src0 + e * isa.DTYPE_SRC_BYTES[op.dtype], st))
    if op.opcode == isa.OP_RECV:
        store(mem, op.dst + e * isa.DTYPE_DST_BYTES[op.dtype], dst_type(op.dtype), w)
        return None
    r = element(mem, op, e, w)
    return None if r is None else payload(dst_type(op.dtype), r)
