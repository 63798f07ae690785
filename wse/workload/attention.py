"""Decode attention of a layer region over its shift-based KV cache (docs/workloads.md).

The KV cache of the context is split over the region's columns (tokens) and rows (K/V
dimensions, each row's query dimensions kept with the key/value dimensions they attend with).
Column 0 appends the new token and every column passes its oldest entry one column east (the
KV shift, threads 2 and 3); the last column drops it, so a sliding-window layer's cache of
its window is the same program. Per cached token a row computes a dot product over its query
dimensions; scores are all-reduced down the columns, softmax statistics and weighted values
along the rows. Attention sinks (a learned logit per head that takes part in the softmax
and weights no value) enter the row's maximum and sum at column 0.
"""
from __future__ import annotations

from ..trace import recv, send, signal, wait, compute
from .gemv import ELEM
from .plan import KV_SHIFT
from .region import (ADD, EXP_FMACS, FMAC, MAX, MOV, SCALE, SEM_KV_READY, SEM_KV_RECEIVED, SEM_KV_SENT, Ops,
                     merge)

SINK_FLOPS = 1 + 1 + 2 * EXP_FMACS + 1  # per head and sequence: max, subtract, exp, add to the sum


def attention_ops(ctx, first_col: bool, last_col: bool, parity: int, tc: int, qj: int, kv_len: int,
                  kv_src: int, oj: int, o_stride: int, hj: int, xrole: tuple, yrole: tuple) -> Ops:
    """Decode attention of the row's heads over the column's cached tokens: per token, a
    qj-long dot product and an oj-long weighted value; kv_len cached elements per token
    (`ctx` is the layer's LayerCtx)."""
    plan, rx, ry = ctx.plan, ctx.rx, ctx.ry
    B = plan.params.batch
    b_ = plan.buf
    kvc, dot, sc, scal, tmp, att = b_["kv"], b_["dot"], b_["sc"], b_["scal"], b_["tmp"], b_["att"]
    qkv = b_["qkv"]
    # KV cache, shift-based: column 0 appends the new token, every column passes its oldest east
    kv = kv_len * B
    t0 = [compute(MOV, kv, dst=kvc, src0=kv_src)] if first_col else []
    t0.append(signal(SEM_KV_READY))
    t2 = [wait(SEM_KV_READY)]
    t3 = []
    if not last_col:
        t2 += [send(KV_SHIFT[parity], kv, kvc), signal(SEM_KV_SENT)]
        t0.append(wait(SEM_KV_SENT))
    if not first_col:
        t3 += [recv(KV_SHIFT[1 - parity], kv, kvc + tc * kv * ELEM), signal(SEM_KV_RECEIVED)]
        t0.append(wait(SEM_KV_RECEIVED))
    out = {0: t0, 2: t2, 3: t3}
    # scores: per sequence and cached token, a dot product over the row's query dimensions
    out[0] += [compute(FMAC, qj, dst=dot, src0=qkv) for _ in range(B * tc)]
    ns = plan.spec.heads * tc * B
    merge(out, ry.role_ops(yrole, ns, sc, tmp))
    # softmax over the tokens of the heads this row owns
    e = hj * tc * B
    sink = "sinks" in b_ and first_col and hj
    if e:
        out[0].append(compute(MAX, e, dst=sc, src0=sc, src1=dot))
    if sink:  # each head's sink logit joins its maximum
        out[0] += [compute(MAX, hj, dst=scal + b * hj * ELEM, src0=scal + b * hj * ELEM, src1=b_["sinks"])
                   for b in range(B)]
    merge(out, rx.role_ops(xrole, hj * B, scal, tmp, MAX))
    if e:
        out[0].append(compute(SCALE, e, dst=sc, src0=sc))  # s - max
        out[0] += [compute(FMAC, e, dst=sc, src0=dot) for _ in range(EXP_FMACS)]
        out[0].append(compute(FMAC, e, dst=dot, src0=sc))  # sum
    if sink:  # exp(sink - max) joins the sum
        sx = b_["sink_exp"]
        out[0].append(compute(SCALE, hj * B, dst=sx, src0=scal))
        out[0] += [compute(FMAC, hj * B, dst=sx, src0=sx) for _ in range(EXP_FMACS)]
        out[0].append(compute(ADD, hj * B, dst=scal, src0=scal, src1=sx))
    merge(out, rx.role_ops(xrole, hj * B, scal, tmp))
    if e:
        out[0].append(compute(SCALE, e, dst=sc, src0=sc))  # / sum
    # every row needs every head's probabilities for its value dimensions
    merge(out, ry.role_ops(yrole, ns, sc, tmp))
    # weighted values: per sequence and token an FMAC over the row's output dimensions
    if oj:
        out[0] += [compute(FMAC, oj, dst=att + b * o_stride, src0=kvc) for b in range(B) for _ in range(tc)]
    return merge(out, rx.role_ops(xrole, oj * B, att, tmp))
