"""Functional runs' data: inputs in through a trace's /tensors, outputs back out, and the check
against the numpy references (docs/model.md, "Values"; docs/trace-format.md, /tensors).

SRAM starts as a poison pattern (every byte 0xFF: NaN as fp16, fp32 and E4M3), so a mapping
that reads memory no input, weight or earlier op wrote shows up as NaN in its outputs. Output
tensors and padding ('zero' tensors) start at zero (the kernels accumulate into outputs and
read padding as zeros, as their callers provide); inputs and weights are written last, so an
in-place output keeps its input.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .. import isa
from ..errors import WseError
from ..runs import positions
from ..tensors import LOW, TensorTable, addr_units, end_byte
from ..trace import Trace

POISON = 0xFF
FP16_TOLERANCE = 0.05  # largest error over the largest reference magnitude, per tensor [U]


def _table(trace: Trace, where: str) -> TensorTable:
    if trace.tensors is None:
        raise WseError(f"{where}: the trace has no /tensors table: functional runs need to know where inputs, "
                       "weights and outputs live (the gemv, allreduce and gemm kernels record it)")
    return trace.tensors


def _np_dtype(dtype: int):
    return np.dtype("<f2") if dtype == isa.DTYPE_FP16 else np.dtype("<f4")


# Stored low-precision weights (tensors.LOW): random codes are N(0, SPREAD) rounded to the type, and
# the weight's `<name>.scale` makes code x scale N(0, 1 / fan_in) as the 16-bit weights are [U]
SPREAD = {isa.DTYPE_FP8: 16.0, isa.DTYPE_INT8: 32.0, isa.DTYPE_INT4: 2.5}


def _fp8_values() -> np.ndarray:
    """The value of each E4M3 code (bias 7, no infinities, S.1111.111 NaN)."""
    c = np.arange(256)
    e, m = (c >> 3) & 15, c & 7
    v = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    v = np.where(c & 0x80, -v, v)
    v[(c & 0x7F) == 0x7F] = np.nan
    return v


FP8_VALUES = _fp8_values()


def _levels(dtype: int) -> tuple[np.ndarray, np.ndarray]:
    """(values ascending, their codes) a low-precision type can hold (int4: a nibble 0..15)."""
    if dtype == isa.DTYPE_FP8:
        ok = ~np.isnan(FP8_VALUES) & ~((FP8_VALUES == 0) & (np.arange(256) >= 128))  # (one zero)
        codes = np.flatnonzero(ok)
        order = np.argsort(FP8_VALUES[codes])
        return FP8_VALUES[codes][order], codes[order]
    lo, bits = (-128, 8) if dtype == isa.DTYPE_INT8 else (-8, 4)
    v = np.arange(lo, -lo)
    return v.astype(np.float64), v & ((1 << bits) - 1)


def quantize(dtype: int, x: np.ndarray) -> np.ndarray:
    """x rounded to the nearest value the low-precision type holds (ties: the lower one)."""
    vals, _ = _levels(dtype)
    i = np.clip(np.searchsorted(vals, x), 1, len(vals) - 1)
    return np.where(np.abs(x - vals[i - 1]) <= np.abs(vals[i] - x), vals[i - 1], vals[i])


def encode(dtype: int, x: np.ndarray) -> np.ndarray | None:
    """The codes (uint8; int4: nibbles) of values a low-precision type holds exactly, or None."""
    vals, codes = _levels(dtype)
    i = np.clip(np.searchsorted(vals, x), 0, len(vals) - 1)
    if not np.array_equal(vals[i], x):
        return None
    return codes[i].astype(np.uint8)


BLOCK_ELEMENTS = 1 << 22  # pieces are expanded to elements in blocks of about this many (bounded memory)


def _spots(table: TensorTable, i: int):
    """Per element of tensor i's pieces, in blocks: (PE, SRAM address, flat index in the tensor);
    addresses in bytes, or nibbles for int4 (tensors.addr_units)."""
    p = table.of(i)
    eb = addr_units(table.tensors[i].dtype)
    counts = p["count"].astype(np.int64)
    ends = np.cumsum(counts)
    a = 0
    while a < len(counts):
        b = max(a + 1, int(np.searchsorted(ends, (ends[a - 1] if a else 0) + BLOCK_ELEMENTS, "right")))
        n = counts[a:b]
        k = positions(n)
        yield (np.repeat(p["pe"][a:b].astype(np.int64), n), np.repeat(p["addr"][a:b].astype(np.int64), n) + k * eb,
               np.repeat(p["start"][a:b], n) + k * np.repeat(p["stride"][a:b], n))
        a = b


def random_inputs(trace: Trace, seed: int) -> dict[str, np.ndarray]:
    """Inputs and weights drawn from a seeded normal distribution, rounded to their element type:
    N(0, 1), but a weight matrix [..., fan_in, fan_out] N(0, 1 / fan_in), as initialized models are,
    so activations stay of order one through a layer (N(0, 1) weights would grow them by sqrt(fan_in)
    per projection, past fp16's range in a norm's sums)."""
    table = _table(trace, "--functional")
    rng = np.random.default_rng(seed)
    out = {}
    for t in table.tensors:
        if t.role in ("input", "weight"):
            std = t.shape[-2] ** -0.5 if t.role == "weight" and len(t.shape) >= 2 else 1.0  # [..., fan_in, fan_out]
            if t.dtype in LOW:  # codes; their scale (below) gives them the 16-bit weights' spread
                out[t.name] = quantize(t.dtype, SPREAD[t.dtype] * rng.standard_normal(t.shape))
            else:
                out[t.name] = (std * rng.standard_normal(t.shape)).astype(_np_dtype(t.dtype)).astype(np.float64)
    for t in table.tensors:  # (each scale a little different, so a tile read with another's shows)
        base = _quantized(table, t.name)
        if base is not None:
            scale = rng.uniform(0.7, 1.4, t.shape) / (SPREAD[base.dtype] * base.shape[-2] ** 0.5)
            out[t.name] = scale.astype(np.float16).astype(np.float64)
    return out


def _quantized(table: TensorTable, name: str):
    """The (first) low-precision weight whose scale tensor `name` is (`<weight>[+<weight>].scale`),
    or None."""
    if not name.endswith(".scale"):
        return None
    first = name[:-len(".scale")].split("+")[0]
    base = next((t for t in table.tensors if t.name == first), None)
    return base if base is not None and base.dtype in LOW else None


def load_inputs(path: str | Path, trace: Trace) -> dict[str, np.ndarray]:
    """Inputs and weights from an .npz holding one array per input / weight tensor, by name and shape."""
    table = _table(trace, str(path))
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as e:
        raise WseError(f"{path}: not a readable .npz file ({e})") from None
    out = {}
    for t in table.tensors:
        if t.role not in ("input", "weight"):
            continue
        if t.name not in data:
            raise WseError(f"{path}: no array {t.name!r} (the trace's inputs and weights: "
                           f"{', '.join(u.name for u in table.tensors if u.role in ('input', 'weight'))})")
        a = data[t.name]
        if a.shape != t.shape or not np.issubdtype(a.dtype, np.number):
            raise WseError(f"{path}: array {t.name!r} has shape {a.shape} ({a.dtype}); the trace needs "
                           f"{t.shape} of numbers")
        if t.dtype in LOW and encode(t.dtype, a.astype(np.float64).reshape(-1)) is None:
            raise WseError(f"{path}: array {t.name!r} holds values {isa.DTYPE_NAMES[t.dtype]} cannot store (its "
                           f"weights are stored codes; their scale is the array {t.name + '.scale'!r})")
        out[t.name] = a.astype(np.float64)
    return out


def fill(trace: Trace, inputs: dict[str, np.ndarray], extent: int) -> np.ndarray:
    """Every PE's initial SRAM (uint8 [P, extent]): poison, outputs and padding zeroed, inputs and weights."""
    table = _table(trace, "--functional")
    p = table.pieces
    top = max((int(end_byte(t.dtype, p["addr"][sel].astype(np.int64), p["count"][sel].astype(np.int64)).max())
               for i, t in enumerate(table.tensors) for sel in [p["tensor"] == i] if sel.any()), default=0)
    sram = np.full((trace.n_pes, -(-max(extent, top) // 4) * 4), POISON, np.uint8)
    order = sorted(range(len(table.tensors)), key=lambda i: table.tensors[i].role not in ("output", "zero"))
    for i in order:
        t = table.tensors[i]
        src = inputs[t.name].reshape(-1) if t.role in ("input", "weight") else None
        if t.dtype in LOW:
            _fill_codes(sram, table, i, src)
            continue
        for pe, addr, flat in _spots(table, i):
            if src is not None:
                vals = src[flat].astype(_np_dtype(t.dtype))
            elif t.role == "index":
                vals = flat.astype(_np_dtype(t.dtype))
            else:
                vals = np.full(len(flat), t.value if t.role == "constant" else 0.0, _np_dtype(t.dtype))
            b = vals.view(np.uint8).reshape(len(flat), -1)
            for k in range(b.shape[1]):
                sram[pe, addr + k] = b[:, k]
    return sram


def _fill_codes(sram: np.ndarray, table: TensorTable, i: int, src: np.ndarray) -> None:
    """Write a low-precision weight's codes (int4: each into its nibble, the other kept)."""
    t = table.tensors[i]
    for pe, addr, flat in _spots(table, i):
        codes = encode(t.dtype, src[flat])
        if codes is None:
            raise WseError(f"{t.name}: values {isa.DTYPE_NAMES[t.dtype]} cannot store")
        if t.dtype != isa.DTYPE_INT4:
            sram[pe, addr] = codes
            continue
        for half in (0, 1):  # low nibbles, then high ones (a byte's two nibbles: two passes)
            k = (addr & 1) == half
            b = addr[k] >> 1
            sram[pe[k], b] = (sram[pe[k], b] & (0xF0 if half == 0 else 0x0F)) | (codes[k] << (4 * half))


@dataclasses.dataclass
class Output:
    name: str
    values: np.ndarray  # the tensor, each element from its first copy (NaN where no piece holds it)
    copies_disagree: int  # elements whose copies on different PEs differ


def read_outputs(trace: Trace, sram: np.ndarray) -> list[Output]:
    table = _table(trace, "--functional")
    out = []
    for i, t in enumerate(table.tensors):
        if t.role != "output":
            continue
        dt = _np_dtype(t.dtype)
        res = np.full(t.size, np.nan)
        held = np.zeros(t.size, bool)
        disagree = np.zeros(t.size, bool)
        for pe, addr, flat in _spots(table, i):
            raw = np.stack([sram[pe, addr + k] for k in range(dt.itemsize)], axis=1)
            vals = raw.view(dt).reshape(-1).astype(np.float64)
            new = ~held[flat]
            first = np.zeros(len(flat), bool)  # the first piece element of each new flat index
            idx = np.flatnonzero(new)
            _, pos = np.unique(flat[idx], return_index=True)
            first[idx[pos]] = True
            res[flat[first]] = vals[first]
            held[flat[first]] = True
            ref = res[flat]
            disagree[flat[~((vals == ref) | (np.isnan(vals) & np.isnan(ref)))]] = True
        out.append(Output(t.name, res.reshape(t.shape), int(disagree.sum())))
    return out


@dataclasses.dataclass
class Check:
    name: str
    error: float  # max |out - ref| over max |ref| (inf: NaN or an element no PE holds)
    tolerance: float
    copies_disagree: int

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance and self.copies_disagree == 0


def check(outputs: list[Output], expected: dict[str, np.ndarray], tolerance: float = FP16_TOLERANCE) -> list[Check]:
    """Each output's largest error over the reference's largest magnitude. An index output with
    `<name>@scores` in `expected` (an argmax over the last axis of those scores) is checked by
    the score it picks: how far below the row's best, over the largest score magnitude (a valid
    index into a near-tie is right; anything else is inf)."""
    rows = []
    for o in outputs:
        if o.name + "@scores" in expected:
            rows.append(Check(o.name, _index_error(o.values, np.asarray(expected[o.name + "@scores"], np.float64)),
                              tolerance, o.copies_disagree))
            continue
        ref = np.asarray(expected[o.name], np.float64).reshape(o.values.shape)
        scale = max(float(np.abs(ref).max(initial=0.0)), np.finfo(np.float16).tiny)
        diff = np.abs(o.values - ref)
        err = float("inf") if not np.isfinite(diff).all() else float(diff.max(initial=0.0)) / scale
        rows.append(Check(o.name, err, tolerance, o.copies_disagree))
    return rows


def _index_error(picked: np.ndarray, scores: np.ndarray) -> float:
    n = scores.shape[-1]
    idx, rows = picked.reshape(-1), scores.reshape(-1, n)
    if not (np.isfinite(idx).all() and (idx == np.round(idx)).all() and ((idx >= 0) & (idx < n)).all()):
        return float("inf")
    scale = max(float(np.abs(rows).max(initial=0.0)), np.finfo(np.float16).tiny)
    gap = rows.max(axis=1) - rows[np.arange(len(idx)), idx.astype(np.int64)]
    return float(gap.max(initial=0.0)) / scale


def format_checks(rows: list[Check], raced: list[tuple[int, int]]) -> str:
    w = max([12] + [len(r.name) for r in rows])
    lines = [f"{'tensor':{w}} {'max error':>10} {'tolerance':>10} {'copies differ':>14}  result"]
    for r in rows:
        lines.append(f"{r.name:{w}} {r.error:>10.3g} {r.tolerance:>10.3g} {r.copies_disagree:>14,}  "
                     f"{'ok' if r.ok else 'WRONG'}")
    if raced:
        shown = ", ".join(f"({x}, {y})" for x, y in raced[:8])
        lines.append(f"values depend on the schedule (threads race on SRAM or a semaphore) at {len(raced)} "
                     f"PE(s): {shown}")
    return "\n".join(lines)


def tables(outputs: list[Output], rows: list[Check], raced: list[tuple[int, int]]) -> dict[str, dict[str, np.ndarray]]:
    """Run-file groups: /functional (one row per output tensor) and /functional_outputs (values, flat)."""
    return {
        "functional": {
            "tensor": np.array([r.name for r in rows], dtype=object),
            "shape": np.array(["x".join(map(str, o.values.shape)) for o in outputs], dtype=object),
            "max_rel_error": np.array([r.error for r in rows]),
            "tolerance": np.array([r.tolerance for r in rows]),
            "copies_disagree": np.array([r.copies_disagree for r in rows], np.int64),
            "raced_pes": np.array([len(raced)] * len(rows), np.int64),
        },
        "functional_outputs": {o.name: o.values.reshape(-1) for o in outputs},
    }


class FunctionalRun:
    """A functional run's inputs and its check: what `wse run --functional` and `wse check` do
    around the engine. prepare() gives simulate()'s extra arguments for a trace; finish() reads
    the outputs back and compares them with the kernel's numpy reference."""

    def __init__(self, inputs: str | None = None, seed: int = 0, tolerance: float = FP16_TOLERANCE):
        if not tolerance > 0:
            raise WseError(f"--tolerance {tolerance}: must be above 0")
        self.inputs_path, self.seed, self.tolerance = inputs, seed, tolerance
        self.inputs: dict[str, np.ndarray] = {}

    def prepare(self, trace: Trace, where: str) -> dict:
        from ..engine.functional import check_supported, sram_extent
        _table(trace, where)
        check_supported(trace)
        self.inputs = load_inputs(self.inputs_path, trace) if self.inputs_path else random_inputs(trace, self.seed)
        return {"functional": True, "sram": fill(trace, self.inputs, sram_extent(trace))}

    def finish(self, trace: Trace, res) -> tuple[list[Check], dict, dict]:
        """(checks, run-file tables, /summary figures) of a completed functional run."""
        from ..workload.references import expected
        outputs = read_outputs(trace, res.sram)
        rows = check(outputs, expected(trace, self.inputs), self.tolerance)
        worst = max((r.error for r in rows), default=0.0)
        figures = {"functional_max_error": (worst, "fraction", "largest output error over the largest reference "
                                                                "magnitude, over the output tensors"),
                   "functional_ok": (int(all(r.ok for r in rows) and not res.raced), "",
                                     "1: every output within tolerance, copies agree, no race")}
        return rows, tables(outputs, rows, res.raced), figures
