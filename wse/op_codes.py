"""Exact integer codes for table rows: the distinct ops of a trace, and one code per row of
integer columns (equal rows equal codes, in the rows' lexicographic order).

Traces repeat a few ops on thousands of PEs and the engine's state, checks and stage keys do
per-op work once per distinct op, so these run on tables of up to hundreds of millions of rows
and must stay a few bytes a row.
"""
from __future__ import annotations

import numpy as np

from .engine.tables import distinct_rows, or_column
from .trace import OP_COLUMNS, Trace


DISTINCT_BLOCK_OPS = 1 << 22  # ops coded at a time by distinct_ops: its temporaries stay bounded


def distinct_ops(t: Trace, idx: np.ndarray | None = None, tag: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Ops that differ in any column but the tag (tag=True: in any column): (representatives, inverse).

    representatives[u] is the first op index (in `idx` order; default all ops) with distinct
    content u, the contents ranked in the columns' lexicographic order; inverse[j] is the content
    of op idx[j]. Traces repeat the same few ops on thousands of PEs, so per-op work done once
    per distinct op is exact and fast. Each op's columns are packed into one or more 64-bit words
    by the columns' value ranges and the ops are coded a block at a time (each block's distinct
    words found by hashing, then merged and ranked over the blocks), so a trace of hundreds of
    millions of ops needs a few bytes an op, not a sort of all of them."""
    n = len(t.ops["opcode"]) if idx is None else len(idx)
    if not n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cols = [t.ops[name] for name, _ in OP_COLUMNS if tag or name != "tag"]
    words: list[list[tuple[np.ndarray, int, int]]] = [[]]  # per word: (column, lowest value, bits)
    bits = 0
    for c in cols:
        lo = int(c.min())
        width = max(1, (int(c.max()) - lo).bit_length())
        if bits + width > 63:
            words.append([])
            bits = 0
        words[-1].append((c, lo, width))
        bits += width

    none = np.zeros(0, dtype=np.int64)
    sel = None if idx is None else np.ascontiguousarray(idx, dtype=np.int64)

    def keys(a: int, b: int) -> np.ndarray:
        """The block's words [word, op] (compiled: one pass a column, no temporaries)."""
        out = np.zeros((len(words), b - a), dtype=np.uint64)
        for k, word in enumerate(words):
            for c, lo, width in word:
                if sel is None:
                    or_column(out[k], np.ascontiguousarray(c[a:b]), none, lo, width)
                else:
                    or_column(out[k], c, sel[a:b], lo, width)
        return out
    spans = [(a, min(n, a + DISTINCT_BLOCK_OPS)) for a in range(0, n, DISTINCT_BLOCK_OPS)]
    inverse = np.empty(n, dtype=np.int64)
    found: list[np.ndarray] = []
    firsts, offsets = [], []
    at = 0
    for a, b in spans:  # each block's distinct ops (their local ids into inverse for now)
        kw = keys(a, b)
        first, inverse[a:b] = distinct_rows(kw)
        found.append(kw[:, first])
        firsts.append(first + a)
        offsets.append(at)
        at += len(first)
    # merged over the blocks, in block order: the earliest op of each content wins
    merged = [np.concatenate([f[k] for f in found]) for k in range(len(words))]
    pos, ginv = _unique_rows(merged)
    reps = np.concatenate(firsts)[pos]
    for (a, b), off in zip(spans, offsets):
        inverse[a:b] = ginv[off + inverse[a:b]]
    return (reps if idx is None else np.asarray(idx)[reps]).astype(np.int64), inverse


def _unique_rows(words: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of the uint64 key columns `words` (the first most significant): (the first
    index of each, in the rows' lexicographic order; each row's rank among them). A stable
    lexsort: several times faster than np.unique on a structured array of the same words."""
    order = np.lexsort(words[::-1])
    new = np.zeros(len(order), dtype=bool)
    new[0] = True
    for w in words:
        ws = w[order]
        new[1:] |= ws[1:] != ws[:-1]
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.cumsum(new) - 1
    return order[new], ranks


def row_codes(columns: list[np.ndarray]) -> np.ndarray:
    """One int64 code per row of the given integer columns: equal rows get equal codes, and
    codes order rows lexicographically (as np.unique(..., axis=0) would), computed exactly.

    Columns are packed into 64-bit keys by their value ranges; keys that would not fit in one
    word are combined by ranking (np.unique), which keeps every intermediate below the row count
    squared."""
    n = len(columns[0]) if columns else 0
    code = np.zeros(n, dtype=np.uint64)
    bits = 0
    for col in columns:
        c = np.asarray(col, dtype=np.int64)
        lo = int(c.min()) if n else 0
        width = max(1, (int(c.max()) - lo).bit_length()) if n else 1
        if bits + width > 63:  # rank what is packed so far, then keep packing
            _, code = np.unique(code, return_inverse=True)
            code = code.reshape(-1).astype(np.uint64)
            bits = max(1, (n - 1).bit_length())
            if bits + width > 63:
                raise ValueError("row_codes: a column spans more than 62 bits of range")
        code = (code << np.uint64(width)) | (c - lo).astype(np.uint64)
        bits += width
    return code.astype(np.int64) if bits < 64 else code
