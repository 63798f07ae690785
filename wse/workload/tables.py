"""The embedding lookup and the LM head: the chain's first and last regions (docs/workloads.md)."""
from __future__ import annotations

import bisect

from .. import isa
from ..trace import compute, recv, send
from .gemv import ELEM, GemvShape, gemv_ops
from .mesh import HI, LO, RAMP, X, Y, Allocator, MeshBuilder, Region, RegionProgram, offsets, split, tagged
from .models import ModelSpec
from .params import DecodeParams
from .plan import KV_SHIFT, fit_check
from .region import (C_EPS, C_INV_H, G0, G1, G2, G3, MAX, MOV, N_CONSTS, RMAX, RSQRT_FLOPS, SUB, THREADS, Lanes,
                     RegionBuild, anchor_of, handoff, handoff_flops, i_chunk, mean_square_ops, merge, reducers,
                     rms_apply_ops)
from ..errors import WseError

RFIND, FP32, MIXED = isa.KIND_RFIND, isa.DTYPE_FP32, isa.DTYPE_MIXED
GATHER = KV_SHIFT  # the embedding's gather along its rows: colors an embedding region leaves free
F32 = 4  # bytes of an fp32 element (the token ids)
NOT_FOUND = -float(1 << 24)  # `none`: below -(every vocab id), exact in fp32


def embedding_memory(spec: ModelSpec, width: int, height: int, cfg, params: DecodeParams
                     ) -> tuple[Allocator, list[int], dict[str, int]]:
    """SRAM of the embedding table on a width x height region: vocab over columns, hidden
    over rows (FitError if it does not fit)."""
    mem = Allocator(0, cfg.sram_bytes - cfg.sram_reserved_bytes)
    Vc, Hr = split(spec.vocab_size, width), split(spec.hidden_size, height)
    buf = {"table": mem.alloc("table", max(Vc) * (-(-max(Hr) * ELEM // 8) * 8), "weights", G0),
           "out": mem.alloc("out", max(Hr) * params.batch * ELEM, "activations", G3),
           "scal": mem.alloc("scalars", 16 * ELEM, "scratch", G1),
           "tmp": mem.alloc("tmp", 16 * ELEM, "scratch", G0)}
    fit_check(mem, cfg, f"{spec.name} embedding on a {width}x{height} region")
    return mem, Hr, buf


def embedding(spec: ModelSpec, region: Region, builder: MeshBuilder, cfg, params: DecodeParams,
              lanes: Lanes) -> RegionBuild:
    """Embedding lookup: sequence b looks up token + b; each column holding some of those rows
    copies chunk d of them from row d's table tile. The lanes leave from the last such column
    (the east-most: the first layer lies east); columns west of it hand theirs on along the row
    first (a gather, each column's receive then its sends on alternating colors), so the lane
    column holds every sequence's chunk, in sequence order, before the hand-off barrier."""
    B = params.batch
    mem, Hr, buf = embedding_memory(spec, region.width, region.height, cfg, params)
    cols = token_columns(spec, region.width, params.token, B)
    first_row = offsets(split(spec.vocab_size, region.width))  # each column's first vocab row
    pitch = -(-max(Hr) * ELEM // 8) * 8
    red = reducers(region, builder, params, spec)
    prog = RegionProgram(region, THREADS)
    k_of = {c: k for k, (c, _, _) in enumerate(cols)}
    prog.add_roles(X, [(red[X].role(i), k_of.get(i, -1)) for i in range(region.width)])
    prog.add_roles(Y, [(red[Y].role(j), Hr[j]) for j in range(region.height)])
    lanes.install(builder, prog)
    for k in range(len(cols) - 1):  # column k hands sequences [0, its last) to column k + 1
        c0, c1 = cols[k][0], cols[k + 1][0]
        per = {c0: (RAMP, (HI,)), c1: (LO, (RAMP,))}
        per.update({c: (LO, (HI,)) for c in range(c0 + 1, c1)})
        builder.line_routes(region, X, GATHER[k % 2], per)

    t_emb = builder.tag("embedding", -1, "embedding")

    def body(xr, yr, sp):
        n, k = yr[0][1], xr[0][1]
        out: dict[int, list] = {0: []}
        if k >= 0:  # a column holding some of the batch's rows (the lookup before the hand-off barrier,
            # so what follows the anchor is the lane sends alone: stages stand in for a sending region so)
            c, b0, b1 = cols[k]
            if k > 0:
                out[0].append(recv(GATHER[(k - 1) % 2], b0 * n, buf["out"]))
            out[0] += [compute(MOV, n, dst=buf["out"] + b * n * ELEM,
                               src0=buf["table"] + (params.token + b - first_row[c]) * pitch) for b in range(b0, b1)]
            if k < len(cols) - 1:
                out[0].append(send(GATHER[k % 2], b1 * n, buf["out"]))
        merge(out, handoff(red, xr[0][0], yr[0][0], buf["scal"], buf["tmp"]))
        return tagged(merge(out, lanes.send(sp, n * B, buf["out"])), t_emb)

    prog.add(body)
    prog.program_ids(builder)
    return RegionBuild("embedding", region, mem, {"allreduce": handoff_flops(region)}, 0,
                       spec.embedding_params() * ELEM, 0, anchor_of(red))


def token_column(spec: ModelSpec, width: int, token: int) -> int:
    """Column of the embedding region whose vocab slice holds `token`."""
    if not 0 <= token < spec.vocab_size:
        raise WseError(f"--token {token} is outside the vocabulary [0, {spec.vocab_size})")
    return bisect.bisect_right(offsets(split(spec.vocab_size, width)), token) - 1


def token_columns(spec: ModelSpec, width: int, token: int, batch: int) -> list[tuple[int, int, int]]:
    """(column, first sequence, end sequence) of each embedding column holding some of the
    batch's rows (sequence b looks up token + b), west to east."""
    if 0 <= token < spec.vocab_size < token + batch:
        raise WseError(f"--token {token} with --batch {batch}: sequence b looks up token + b, so the tokens "
                       f"{token}..{token + batch - 1} must lie in the vocabulary [0, {spec.vocab_size})")
    out: list[tuple[int, int, int]] = []
    for b in range(batch):
        c = token_column(spec, width, token + b)
        if out and out[-1][0] == c:
            out[-1] = (c, out[-1][1], b + 1)
        else:
            out.append((c, b, b + 1))
    return out


def lm_memory(spec: ModelSpec, width: int, height: int, cfg, params: DecodeParams
              ) -> tuple[Allocator, GemvShape, list[int], list[int], dict[str, int]]:
    """SRAM of the LM head on a width x height region (FitError if it does not fit)."""
    B, H, V = params.batch, spec.hidden_size, spec.vocab_size
    mem = Allocator(0, cfg.sram_bytes - cfg.sram_reserved_bytes)
    Hr, Vc = split(H, height), split(V, width)
    shape = GemvShape(H, V, Y, Hr, Vc)
    shape.pitch = -(-max(Vc) * ELEM // 8) * 8
    shape.weights = mem.alloc("w_lm", shape.tile_bytes(), "weights", G0)
    buf = {"g": mem.alloc("g", max(Hr) * ELEM, "weights", G0),
           "h": mem.alloc("h", max(Hr) * B * ELEM, "activations", G3),
           "xn": mem.alloc("xn", max(Hr) * B * ELEM, "activations", G3),
           "logits": mem.alloc("logits", max(Vc) * B * ELEM, "activations", G2),
           "zeros": mem.alloc("zeros", max(max(Hr), max(Vc)) * B * ELEM, "constants", G1),
           "consts": mem.alloc("consts", N_CONSTS * ELEM, "constants", G0),
           "scal": mem.alloc("scalars", 16 * B * ELEM, "scratch", G1),
           "best": mem.alloc("best", B * ELEM, "activations", G2),
           "token": mem.alloc("token", B * F32, "activations", G2),  # (fp32: 4-byte aligned groups)
           "vocab0": mem.alloc("vocab0", F32, "constants", G0),  # the column's first vocab row (index)
           "none": mem.alloc("none", F32, "constants", G0),  # below every -token: nothing found yet
           "zero32": mem.alloc("zero32", B * F32, "constants", G0),
           "tmp": mem.alloc("tmp", max(Vc) * B * ELEM, "scratch", G0)}
    fit_check(mem, cfg, f"{spec.name} LM head on a {width}x{height} region")
    return mem, shape, Hr, Vc, buf


def lm_head(spec: ModelSpec, region: Region, builder: MeshBuilder, cfg, params: DecodeParams,
            lanes: Lanes) -> RegionBuild:
    """Final RMSNorm, logits (a GEMV reducing along Y, vocab over columns) and the greedy
    token: its logit and its id.

    Lane d arrives on row d and is spread along the row; the maximum ends with a row all-reduce
    of each sequence's column maxima; then each column finds the first of its logits equal to
    it (RFIND: -index, in fp32, offset by the column's first vocab row) and a row MAX
    all-reduce of those keeps the lowest id among ties, negated back into `token`.
    """
    B, H, V = params.batch, spec.hidden_size, spec.vocab_size
    W_, H_ = region.width, region.height
    mem, shape, Hr, Vc, buf = lm_memory(spec, W_, H_, cfg, params)
    g, h, xn, logits, scal, tmp, z = (buf[k] for k in ("g", "h", "xn", "logits", "scal", "tmp", "zeros"))
    red = reducers(region, builder, params, spec)
    rx, ry = red[X], red[Y]
    prog = RegionProgram(region, THREADS)
    prog.add_roles(X, [(i_chunk(Vc, i), rx.role(i)) for i in range(W_)])
    prog.add_roles(Y, [(i_chunk(Hr, j), ry.role(j)) for j in range(H_)])
    lanes.install(builder, prog)
    t_head = builder.tag("lm_head", -1, "lm_head")

    def body(xr, yr, sp):
        return tagged(head_body(xr, yr, sp), t_head)

    def head_body(xr, yr, sp):
        i, xrole = xr[0]
        j, yrole = yr[0]
        hj, vi = Hr[j], Vc[i]
        hs = hj * ELEM  # the row's chunk per sequence, back to back
        out = lanes.receive(sp, hj * B, h, W_)
        # the final RMSNorm: mean squares (h . h / H), down the column, 1/RMS, scale, weight
        out[0].append(compute(MOV, B, dst=scal, src0=z))
        out[0] += mean_square_ops(B, h, xn, hs, hj, scal, buf["consts"] + C_INV_H * ELEM)
        merge(out, ry.role_ops(yrole, B, scal, tmp))
        out[0] += rms_apply_ops(B, h, xn, hs, hj, scal, g, buf["consts"] + C_EPS * ELEM)
        out[0].append(compute(MOV, vi * B, dst=logits, src0=z))
        out[0] += gemv_ops(shape, j, i, xn, logits, B, hs, vi * ELEM)
        merge(out, ry.role_ops(yrole, vi * B, logits, tmp))
        # the greedy token's logit: each sequence's maximum over the column's slice, then along the row
        mx = buf["best"]
        out[0] += [compute(MOV, 1, dst=mx + b * ELEM, src0=logits + b * vi * ELEM) for b in range(B)]
        out[0] += [compute(RMAX, vi, dst=mx + b * ELEM, src0=logits + b * vi * ELEM) for b in range(B)]
        merge(out, rx.role_ops(xrole, B, mx, tmp, MAX))
        # its id: -(vocab0 + the first matching index) per column, the row's largest, negated
        tok = buf["token"]
        for b in range(B):
            out[0] += [compute(MOV, 1, dst=tok + b * F32, src0=buf["none"], dtype=FP32),
                       compute(RFIND, vi, dst=tok + b * F32, src0=logits + b * vi * ELEM, src1=mx + b * ELEM,
                               dtype=MIXED),
                       compute(SUB, 1, dst=tok + b * F32, src0=tok + b * F32, src1=buf["vocab0"], dtype=FP32)]
        merge(out, rx.role_ops(xrole, B, tok, tmp, MAX, FP32))
        out[0].append(compute(SUB, B, dst=tok, src0=buf["zero32"], src1=tok, dtype=FP32))
        return out

    prog.add(body)
    prog.program_ids(builder)
    # the norm is repeated by every PE of a row, the argmax by every PE of a column
    # (the argmax: RMAX and RFIND over every logit, the offset and the negation on every PE)
    flops = {"norm": W_ * 5 * H * B + W_ * H_ * RSQRT_FLOPS * B, "lm_head": 2 * H * V * B,
             "argmax": 2 * H_ * V * B + 2 * W_ * H_ * B,
             "allreduce": W_ * (H_ - 1) * B + (H_ - 1) * V * B + 2 * H_ * (W_ - 1) * B}
    weights = (spec.lm_head_params() or spec.embedding_params()) * ELEM + H * ELEM
    model = 5 * H * B + RSQRT_FLOPS * B + 2 * H * V * B + V * B
    return RegionBuild("lm_head", region, mem, flops, model, weights, 0, anchor_of(red))
