"""Element values for functional runs (docs/model.md, "Values"): how an op's element types sit in
SRAM bytes and in a wavelet's 32-bit payload, and what each compute kind computes.

Numba-compiled and written from the bit layouts (IEEE binary16 / binary32, E4M3, two's
complement); the reference stepper computes the same with numpy's types, so the two are
independent. Arithmetic is done in float64 on the decoded operands and rounded once, to
nearest-even, into the destination type (an FMAC is fused).
"""
from __future__ import annotations

import math

import numba
import numpy as np

from .. import isa

# element kinds a stream is read or written as
E_F16, E_F32, E_FP8, E_I8, E_I4 = 0, 1, 2, 3, 4


@numba.njit(cache=True)
def decode_bits(bits: int, ebits: int, mbits: int) -> float:
    """The value of an IEEE-style binary float's bit pattern (sign, ebits exponent, mbits mantissa)."""
    s = (bits >> (ebits + mbits)) & 1
    e = (bits >> mbits) & ((1 << ebits) - 1)
    m = bits & ((1 << mbits) - 1)
    bias = (1 << (ebits - 1)) - 1
    if e == (1 << ebits) - 1:
        v = math.nan if m else math.inf
    elif e == 0:
        v = math.ldexp(float(m), 1 - bias - mbits)
    else:
        v = math.ldexp(float(m + (1 << mbits)), e - bias - mbits)
    return -v if s else v


def _f16_table() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)


F16_VALUES = _f16_table()  # every fp16 pattern's value (decode_bits(b, 5, 10), tested equal)


@numba.njit(cache=True)
def _round_even(q: float) -> float:
    r = math.floor(q)
    d = q - r
    if d > 0.5 or (d == 0.5 and r % 2 == 1):
        r += 1.0
    return r


@numba.njit(cache=True)
def encode_bits(x: float, ebits: int, mbits: int) -> int:
    """x rounded to nearest-even into an IEEE-style binary float's bit pattern (overflow: inf)."""
    bias = (1 << (ebits - 1)) - 1
    emax = (1 << ebits) - 1
    sign = (1 << (ebits + mbits)) if (x < 0 or (x == 0 and math.copysign(1.0, x) < 0)) else 0
    if math.isnan(x):
        return (emax << mbits) | (1 << (mbits - 1))
    a = abs(x)
    if math.isinf(a):
        return sign | (emax << mbits)
    if a < math.ldexp(1.0, 1 - bias):  # below the smallest normal
        q = _round_even(math.ldexp(a, bias - 1 + mbits))
        return sign | int(q)  # q == 2^mbits is the smallest normal's pattern
    f, k = math.frexp(a)  # a = f * 2^k, f in [0.5, 1)
    e = k - 1
    q = f * float(1 << (mbits + 1))  # a / 2^(e - mbits), exactly: in [2^mbits, 2^(mbits + 1))
    r = np.int64(q)
    d = q - r
    if d > 0.5 or (d == 0.5 and r & 1):
        r += 1
    if r == 1 << (mbits + 1):
        r = np.int64(1) << mbits
        e += 1
    if e + bias >= emax:
        return sign | (emax << mbits)
    return sign | ((e + bias) << mbits) | (r - (1 << mbits))


@numba.njit(cache=True)
def f16_bits(x: float) -> int:
    return encode_bits(x, 5, 10)


@numba.njit(cache=True)
def f32_bits(x: float) -> int:
    return encode_bits(x, 8, 23)


@numba.njit(cache=True)
def fp8_value(b: int) -> float:
    """E4M3 (bias 7, no infinities; S.1111.111 is NaN): the fp8 weights' format."""
    s = (b >> 7) & 1
    e = (b >> 3) & 15
    m = b & 7
    if e == 15 and m == 7:
        return math.nan
    v = m * 2.0 ** -9 if e == 0 else (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return -v if s else v


@numba.njit(cache=True)
def load(sram: np.ndarray, pe: int, addr: int, kind: int) -> float:
    """The element of `kind` at byte `addr` of PE `pe`'s SRAM (little-endian)."""
    if kind == E_F16:
        return F16_VALUES[sram[pe, addr] | (np.int64(sram[pe, addr + 1]) << 8)]
    if kind == E_F32:
        b = (sram[pe, addr] | (np.int64(sram[pe, addr + 1]) << 8) | (np.int64(sram[pe, addr + 2]) << 16)
             | (np.int64(sram[pe, addr + 3]) << 24))
        return decode_bits(b, 8, 23)
    if kind == E_FP8:
        return fp8_value(sram[pe, addr])
    v = np.int64(sram[pe, addr])
    return float(v - 256 if v >= 128 else v)  # E_I8


@numba.njit(cache=True)
def store(sram: np.ndarray, pe: int, addr: int, kind: int, x: float) -> None:
    """Round x into `kind` (fp16 or fp32) and write it at byte `addr`."""
    if kind == E_F16:
        b = f16_bits(x)
        sram[pe, addr] = b & 255
        sram[pe, addr + 1] = (b >> 8) & 255
    else:
        b = f32_bits(x)
        for i in range(4):
            sram[pe, addr + i] = (b >> (8 * i)) & 255


@numba.njit(cache=True)
def to_payload(kind: int, x: float) -> np.uint32:
    """A wavelet's 32-bit payload carrying x as `kind` (fp16 in the low half)."""
    return np.uint32(f16_bits(x) if kind == E_F16 else f32_bits(x))


@numba.njit(cache=True)
def from_payload(kind: int, p: np.uint32) -> float:
    if kind == E_F16:
        return F16_VALUES[np.int64(p) & 0xFFFF]
    return decode_bits(np.int64(p), 8, 23)


@numba.njit(cache=True)
def apply(kind: int, a: float, b: float, acc: float, e: int) -> float:
    """A compute kind on decoded operands: a, b are its two sources (one-source kinds: a, and b
    the scalar), acc the FMAC accumulator (FMAC: acc + a * b, b the scalar) or DOT's; e the
    element's index in the op (RFIND keeps -e of the first element equal to the scalar)."""
    if kind == isa.KIND_FMAC:
        return acc + a * b
    if kind == isa.KIND_ADD:
        return a + b
    if kind == isa.KIND_SUB:
        return a - b
    if kind == isa.KIND_MUL:
        return a * b
    if kind == isa.KIND_MAX:
        return a if a >= b or math.isnan(a) else b
    if kind == isa.KIND_MOV:
        return a
    if kind == isa.KIND_FILL:
        return b
    if kind == isa.KIND_DOT:
        return acc + a * b
    if kind == isa.KIND_RSUM:
        return acc + a
    if kind == isa.KIND_RMAX:
        return acc if acc >= a or math.isnan(acc) else a
    if kind == isa.KIND_RFIND:
        return acc if a != b or acc >= -e else -e
    if kind == isa.KIND_EXP:
        return _exp(a - b)
    if kind == isa.KIND_RSQRT:
        x = a + b
        if x == 0:
            return math.copysign(math.inf, x)
        return 1.0 / math.sqrt(x) if x > 0 else math.nan  # (NaN stays NaN)
    if kind == isa.KIND_RECIP:
        return math.copysign(math.inf, a) if a == 0 else 1.0 / a
    if kind == isa.KIND_SILU:
        return a / (1.0 + _exp(-a))
    return a * b  # SCALE


@numba.njit(cache=True)
def _exp(x: float) -> float:
    if x > 709.0:
        return math.inf
    return math.exp(x)


def element_kinds(dtype: int) -> tuple[int, int]:
    """(source element kind, destination element kind) of an op's dtype."""
    return {isa.DTYPE_FP16: (E_F16, E_F16), isa.DTYPE_FP32: (E_F32, E_F32), isa.DTYPE_MIXED: (E_F16, E_F32),
            isa.DTYPE_FP8: (E_FP8, E_F16), isa.DTYPE_INT8: (E_I8, E_F16), isa.DTYPE_INT4: (E_I4, E_F16)}[dtype]
