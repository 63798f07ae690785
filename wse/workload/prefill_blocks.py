"""A key block of chunked prefill attention with an online softmax (docs/workloads.md, "Chunked
prefill", key blocks): the kernel that folds one more block of keys into a chunk's softmax.

With `--prefill-keys blocked` a chunk's queries attend its keys block by block, one block per
chunk so far (C keys each): the scores GEMM and the weighted-values GEMM of a block are the
chunk's first block's, and between them this kernel turns the block's raw scores into
probabilities relative to the running maximum and sum and rescales the output so far, so that
after the last block the output is the softmax over all the keys (flash attention's merge,
with the output kept normalized). Per token and head, with s the block's scores:

    m' = max(m, max s / sqrt(d))          the running maximum (a row MAX all-reduce: keys over columns)
    e  = exp(s / sqrt(d) - m'),  b = sum e (a row all-reduce)
    l' = exp(m - m') l + b                the running sum
    p  = e / l'                           what the block's values GEMM multiplies (accumulating into o)
    o  = o (l' - b) / l'                  the output so far, rescaled: exp(m - m') l / l'

Layout as the elementwise kernel's (prefill_elementwise.Cut): tokens over the Q rows, the
block's keys over the P columns, the output's heads x v dims over the columns. Scratch is one
block, whatever the context.
"""
from __future__ import annotations

import numpy as np

from ..hardware import WaferConfig
from ..trace import Trace, compute, fill
from .attention import attn_scale
from .gemv import ELEM
from .mesh import X, Y, Allocator, MeshBuilder, Region, RegionProgram, head_runs, offsets, split, tagged
from .models import ModelSpec, model_meta
from .params import DecodeParams
from .plan import fit_check
from .prefill_elementwise import Cut
from .region import (ADD, EXP, EXP_FLOPS, MAX, MOV, MUL, RECIP, RECIP_FLOPS, RMAX, RSUM, SCALE, SUB, ZERO_BYTES,
                     merge, reducers)

K_ATTN = 0  # the `consts` buffer: the softmax scale


def softmax_block(spec: ModelSpec, P: int, S: int, cfg: WaferConfig, algo: str = "two-level", Q: int | None = None,
                  keys: int | None = None, record: bool = False) -> tuple[Trace, dict[str, int]]:
    """The online-softmax kernel of one key block (module docstring): S tokens on a P x Q region,
    a block of `keys` keys (default S); record: with its /tensors."""
    Q = Q or P
    c = Cut(spec, P, Q, S, 1, keys)
    heads, oc = spec.heads, split(spec.attn_out_size, P)
    pieces = head_runs(heads, spec.attn_out_size // heads, P)
    sm, km, om = max(c.Sr), max(c.Kc), max(oc)
    n_max = sm * heads
    mem = Allocator(0, cfg.sram_bytes - cfg.sram_reserved_bytes)
    buf = {"sc": mem.alloc("scores", sm * heads * km * ELEM, "activations", 6),
           "att": mem.alloc("att", sm * om * ELEM, "activations", 4)}
    for k, g in (("m", 0), ("m2", 2), ("l", 4), ("bs", 6), ("al", 0), ("g", 2), ("be", 4), ("tmp", 6)):
        buf[k] = mem.alloc(k, n_max * ELEM, "scratch" if k in ("bs", "al", "g", "be", "tmp") else "activations", g)
    buf["zeros"] = mem.alloc("zeros", ZERO_BYTES, "constants", 0)  # FILL's scalar and EXP's zero
    buf["consts"] = mem.alloc("consts", ELEM, "constants", 0)
    fit_check(mem, cfg, f"{spec.name} prefill softmax block (S={S}, keys {c.K}) on {P}x{Q}")
    region = Region(0, 0, P, Q)
    b = MeshBuilder(P, Q, 2, kernel="prefill-softmax-block", **model_meta(spec), prompt=S, keys=c.K)
    rx = reducers(region, b, DecodeParams(algo=algo))[X]
    prog = RegionProgram(region, 2)
    prog.add_roles(X, [(c.Kc[i], oc[i], pieces[i], rx.role(i)) for i in range(P)])
    prog.add_roles(Y, [(c.Sr[j],) for j in range(Q)])

    def body(xr, yr, _sp):
        (ki, oi, pcs, role), (sj,) = xr[0], yr[0]
        return _block_ops(rx, role, buf, sj, heads, ki, oi, pcs)

    t_sb = b.tag("softmax_block", -1, "elementwise")
    prog.add(lambda xr, yr, sp: tagged(body(xr, yr, sp), t_sb))
    prog.program_ids(b)
    if record:
        _record(b.tensors, spec, c, buf, P, Q, oc, pieces)
    return b.build(), softmax_block_flops(spec, c, P)


def _block_ops(rx, role, buf: dict, sj: int, heads: int, ki: int, oi: int, pcs: tuple) -> dict[int, list]:
    """One PE's ops: its row's sj tokens x heads, its column's ki keys and oi output dims."""
    n = sj * heads
    sc, k, z = buf["sc"], buf["consts"], buf["zeros"]
    m, m2, l_, bs, al, g, be = (buf[x] for x in ("m", "m2", "l", "bs", "al", "g", "be"))
    out: dict[int, list] = {0: []}
    t0 = out[0]
    if n == 0:
        return out
    t0.append(compute(SCALE, n * ki, dst=sc, src0=sc, src1=k + K_ATTN * ELEM))
    t0.append(compute(MOV, n, dst=m2, src0=m))  # the block's maxima start from the running ones
    t0 += [compute(RMAX, ki, dst=m2 + r * ELEM, src0=sc + r * ki * ELEM) for r in range(n if ki else 0)]
    merge(out, rx.role_ops(role, n, m2, buf["tmp"], MAX))
    t0 = out[0]
    t0 += [compute(SUB, n, dst=al, src0=m, src1=m2), compute(EXP, n, dst=al, src0=al, src1=z)]
    t0 += [compute(EXP, ki, dst=sc + r * ki * ELEM, src0=sc + r * ki * ELEM, src1=m2 + r * ELEM)
           for r in range(n if ki else 0)]
    t0.append(fill(n, bs, z))
    t0 += [compute(RSUM, ki, dst=bs + r * ELEM, src0=sc + r * ki * ELEM) for r in range(n if ki else 0)]
    merge(out, rx.role_ops(role, n, bs, buf["tmp"]))
    t0 = out[0]
    t0 += [compute(MUL, n, dst=l_, src0=l_, src1=al), compute(ADD, n, dst=l_, src0=l_, src1=bs),
           compute(RECIP, n, dst=g, src0=l_), compute(SUB, n, dst=be, src0=l_, src1=bs),
           compute(MUL, n, dst=be, src0=be, src1=g)]
    t0 += [compute(SCALE, ki, dst=sc + r * ki * ELEM, src0=sc + r * ki * ELEM, src1=g + r * ELEM)
           for r in range(n if ki else 0)]
    t0 += [compute(SCALE, ln, dst=buf["att"] + (t * oi + pos) * ELEM, src0=buf["att"] + (t * oi + pos) * ELEM,
                   src1=be + (t * heads + h) * ELEM)
           for t in range(sj) for h, pos, ln in pcs]
    return out


def softmax_block_flops(spec: ModelSpec, c: Cut, P: int) -> dict[str, int]:
    """Executed and model FLOPs in closed form: per score a scale, a max, an exp, a sum and a
    scale; per output element a scale; per token and head the rescale factors (a subtraction
    and an exp, the sum's update, 1/l', the output's factor), taken on every column: executed,
    not model; the two row all-reduces."""
    S, K, heads, o = c.S, c.K, spec.heads, spec.attn_out_size
    once = (1 + 1 + EXP_FLOPS + 1 + 1) * S * heads * K + S * o
    per = (1 + EXP_FLOPS + 2 + RECIP_FLOPS + 2) * S * heads
    return {"executed_flops": once + P * per + (P - 1) * 2 * S * heads, "model_flops": once + per}


def _record(t, spec: ModelSpec, c: Cut, buf: dict, P: int, Q: int, oc: list[int], pieces: list) -> None:
    """/tensors: inputs the block's raw scores, the running maxima and sums, the output so far;
    outputs the probabilities, the new maxima and sums, the rescaled output."""
    S, heads = c.S, spec.heads
    ii, jj = np.meshgrid(np.arange(P), np.arange(Q))
    pe, col, row = (jj * P + ii).reshape(-1), ii.reshape(-1), jj.reshape(-1)
    sr, s0 = np.array(c.Sr), np.array(c.s0)
    kc, k0 = np.array(c.Kc), np.array(c.k0)
    sc_in, sc_out = t.add("scores", "input", (S, heads, c.K)), t.add("probs", "output", (S, heads, c.K))
    stats = [(t.add(name, role, (S, heads)), key) for name, role, key in (
        ("m", "input", "m"), ("l", "input", "l"), ("m_new", "output", "m2"), ("l_new", "output", "l"))]
    o_in, o_out = t.add("o", "input", (S, spec.attn_out_size)), t.add("o_new", "output", (S, spec.attn_out_size))
    ocs, o0 = np.array(oc), np.array(offsets(oc))
    for tt in range(max(c.Sr)):
        m = sr[row] > tt
        tok = s0[row[m]] + tt
        for hh in range(heads):
            r = tt * heads + hh
            for k in (sc_in, sc_out):
                t.pieces(k, pe[m], buf["sc"] + r * kc[col[m]] * ELEM, kc[col[m]], (tok * heads + hh) * c.K + k0[col[m]])
            for k, key in stats:
                t.pieces(k, pe[m], buf[key] + r * ELEM, 1, tok * heads + hh)
        mo = m & (ocs[col] > 0)
        for k in (o_in, o_out):
            t.pieces(k, pe[mo], buf["att"] + tt * ocs[col[mo]] * ELEM, ocs[col[mo]],
                     (s0[row[mo]] + tt) * spec.attn_out_size + o0[col[mo]])
    z = t.add("zeros", "zero", (ZERO_BYTES // ELEM,))
    t.pieces(z, pe, buf["zeros"], ZERO_BYTES // ELEM, 0)
    t.pieces(t.add("attn_scale", "constant", (1,), value=attn_scale(spec)), pe, buf["consts"] + K_ATTN * ELEM, 1, 0)


def reference(meta: dict, x: dict) -> dict:
    """The block's update in float64 (module docstring)."""
    from .models import spec_of
    spec = spec_of(meta)
    s = x["scores"] * attn_scale(spec)
    m_new = np.maximum(x["m"], s.max(axis=-1))
    e = np.exp(s - m_new[..., None])
    b = e.sum(axis=-1)
    l_new = np.exp(x["m"] - m_new) * x["l"] + b
    vd = spec.attn_out_size // spec.heads
    factor = np.repeat((l_new - b) / l_new, vd, axis=1)
    return {"probs": e / l_new[..., None], "m_new": m_new, "l_new": l_new, "o_new": x["o"] * factor}
