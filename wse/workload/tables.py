"""The embedding lookup and the LM head: the chain's first and last regions (docs/workloads.md)."""
from __future__ import annotations

import bisect

from .. import isa
from ..trace import compute, recv, send, fill
from .gemv import ELEM, GemvShape, gemv_ops
from .collectives import LineBroadcast
from .mesh import HI, LO, RAMP, X, Y, Allocator, MeshBuilder, Region, RegionProgram, offsets, split, tagged
from .models import ModelSpec
from .params import DecodeParams
from .plan import DIAG_BCAST, KV_SHIFT, ROW_BCAST, TRANSFER, fit_check
from .region import (C_EPS, C_INV_H, G0, G1, G2, G3, MAX, MOV, N_CONSTS, RMAX, RSQRT_FLOPS, SUB, THREADS,
                     ZERO_BYTES, Lanes, RegionBuild, anchor_of, handoff, handoff_flops, i_chunk, mean_square_ops,
                     merge, reducers, rms_apply_ops)
from ..errors import WseError

RFIND, FP32, MIXED = isa.KIND_RFIND, isa.DTYPE_FP32, isa.DTYPE_MIXED
GATHER = KV_SHIFT  # the embedding's gather along its rows: colors an embedding region leaves free
# table strips (placement.strip_rows): colors each leaves free
RELAY = (DIAG_BCAST, ROW_BCAST)  # embedding: a row's lane parts from the token's column to their lanes' columns
HOP = TRANSFER[1]  # embedding: a lane's first part one row down (the embedding sends on TRANSFER[0])
HEAD_GATHER = KV_SHIFT  # LM head: a row's parts gathered east to the last column holding one
HEAD_HOP = DIAG_BCAST  # LM head: a lane's second part one row down
F32 = 4  # bytes of an fp32 element (the token ids)
NOT_FOUND = -float(1 << 24)  # `none`: below -(every vocab id), exact in fp32


def embedding_memory(spec: ModelSpec, width: int, height: int, cfg, params: DecodeParams, lanes: int = 0
                     ) -> tuple[Allocator, list[int], dict[str, int]]:
    """SRAM of the embedding table on a width x height region: vocab over columns, hidden
    over rows (FitError if it does not fit); `lanes` > 0: a strip sending that many lanes (a
    lane's chunk and a relay's buffer more)."""
    mem = Allocator(0, cfg.sram_bytes - cfg.sram_reserved_bytes)
    Vc, Hr = split(spec.vocab_size, width), split(spec.hidden_size, height)
    buf = {"table": mem.alloc("table", max(Vc) * (-(-max(Hr) * ELEM // 8) * 8), "weights", G0),
           "out": mem.alloc("out", max(Hr) * params.batch * ELEM, "activations", G3),
           "scal": mem.alloc("scalars", 16 * ELEM, "scratch", G1),
           "tmp": mem.alloc("tmp", 16 * ELEM, "scratch", G0)}
    if lanes:
        buf["lane"] = mem.alloc("lane", max(split(spec.hidden_size, lanes)) * params.batch * ELEM, "activations", G2)
        buf["fwd"] = mem.alloc("fwd", max(Hr) * params.batch * ELEM, "scratch", G1)
    fit_check(mem, cfg, f"{spec.name} embedding on a {width}x{height} region")
    return mem, Hr, buf


def embedding(spec: ModelSpec, region: Region, builder: MeshBuilder, cfg, params: DecodeParams,
              lanes: Lanes, strip: tuple | None = None) -> RegionBuild:
    """Embedding lookup: sequence b looks up token + b; each column holding some of those rows
    copies chunk d of them from row d's table tile. The lanes leave from the last such column
    (the east-most: the first layer lies east); columns west of it hand theirs on along the row
    first (a gather, each column's receive then its sends on alternating colors), so the lane
    column holds every sequence's chunk, in sequence order, before the hand-off barrier.

    A strip (`strip`: each lane's first and last row, placement.strip_rows) sends lane d south
    from column d: each row's parts of its lanes go from the lane column along the row to
    their lanes' columns (strip_relays), a lane's first part one row down to its second, all
    before the barrier."""
    B = params.batch
    mem, Hr, buf = embedding_memory(spec, region.width, region.height, cfg, params, len(strip) if strip else 0)
    cols = token_columns(spec, region.width, params.token, B)
    first_row = offsets(split(spec.vocab_size, region.width))  # each column's first vocab row
    pitch = -(-max(Hr) * ELEM // 8) * 8
    red = reducers(region, builder, params, spec, cfg)
    prog = RegionProgram(region, THREADS)
    k_of = {c: k for k, (c, _, _) in enumerate(cols)}
    prog.add_roles(X, [(red[X].role(i), k_of.get(i, -1)) for i in range(region.width)])
    prog.add_roles(Y, [(red[Y].role(j), Hr[j]) for j in range(region.height)])
    lanes.install(builder, prog)
    for k in range(len(cols) - 1):  # column k hands sequences [0, its last) to column k + 1
        _hop_routes(builder, region, X, None, cols[k][0], cols[k + 1][0], GATHER[k % 2])
    if strip:
        if lanes.color_out not in (None, TRANSFER[0]):  # (the chain's first transfer: HOP stays free)
            raise WseError(f"an embedding strip sends on color {TRANSFER[0]}, not {lanes.color_out}")
        strip_relays(spec, region, builder, prog, strip, cols[-1][0], B, buf)

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
        if strip:
            out[0] += relay_ops(sp, n, B, buf)
        merge(out, handoff(red, xr[0][0], yr[0][0], buf["scal"], buf["tmp"]))
        if strip:
            return tagged(merge(out, lanes.send(sp, sp.get("chunk", 0) * B, buf["lane"])), t_emb)
        return tagged(merge(out, lanes.send(sp, n * B, buf["out"])), t_emb)

    prog.add(body)
    prog.program_ids(builder)
    return RegionBuild("embedding", region, mem, {"allreduce": handoff_flops(region)}, 0,
                       spec.embedding_params() * ELEM, 0, anchor_of(red))


def strip_pieces(hidden: int, strip: tuple) -> list[list[tuple[int, int, int, int]]]:
    """Per row of a table strip: (lane d, first element in the row's chunk, elements, first
    element in the lane's chunk) of each lane part it holds, in order."""
    rows, P = max(last for _, last in strip) + 1, len(strip)
    Lc, Hr = split(hidden, P), split(hidden, rows)
    lo, ro = offsets(Lc), offsets(Hr)
    out: list[list[tuple[int, int, int, int]]] = [[] for _ in range(rows)]
    for d, (j1, j2) in enumerate(strip):
        for j in range(j1, j2 + 1):
            a, b = max(lo[d], ro[j]), min(lo[d] + Lc[d], ro[j] + Hr[j])
            out[j].append((d, a - ro[j], b - a, a - lo[d]))
    return out


def _hop_routes(builder: MeshBuilder, region: Region, axis, line: int | None, a: int, b: int, color: int) -> None:
    """A route on `line` of the region (None: on every line) from position a to position b
    (a != b), delivering at b."""
    way, back = (HI, LO) if b > a else (LO, HI)
    per = {a: (RAMP, (way,)), b: (back, (RAMP,))}
    per.update({p: (back, (way,)) for p in range(min(a, b) + 1, max(a, b))})
    builder.line_routes(region, axis, color, per, lines=None if line is None else [line])


def strip_relays(spec: ModelSpec, region: Region, builder: MeshBuilder, prog: RegionProgram, strip: tuple,
                 c: int, B: int, buf: dict[str, int]) -> None:
    """Routes and roles of an embedding strip's relays. Row j's lane parts go from the token's
    column c (every sequence's row chunk, after the gather) to their lanes' columns, nearest
    first, one chain west and one east of c: c sends the parts in chain order (each part of
    every sequence), each column keeps its own and hands the rest on (colors alternating hop
    by hop). A lane's part on its first row then goes one row down on HOP, so the lane's last
    row holds its whole chunk (sequence after sequence) in `lane`."""
    Lc = split(spec.hidden_size, len(strip))
    for j, parts in enumerate(strip_pieces(spec.hidden_size, strip)):
        west = sorted((p for p in parts if p[0] < c), key=lambda p: -p[0])
        east = sorted((p for p in parts if p[0] > c), key=lambda p: p[0])
        local = tuple((d, pos, n, lpos, Lc[d]) for d, pos, n, lpos in parts if d == c)
        chains = []
        for first, chain in ((0, west), (1, east)):
            x = c
            for i, (d, pos, n, lpos) in enumerate(chain):
                color = RELAY[(first + i) % 2]
                _hop_routes(builder, region, X, j, x, d, color)
                rest = sum(q[2] for q in chain[i + 1:]) * B
                prog.mark(d, j, "relay", (color, RELAY[(first + i + 1) % 2] if rest else -1, n, lpos, Lc[d], rest))
                x = d
            chains.append(tuple((pos, n) for _, pos, n, _ in chain))
        prog.mark(c, j, "source", (local, chains[0], chains[1]))
    row0, lane0 = offsets(split(spec.hidden_size, region.height)), offsets(Lc)
    for d, (j1, j2) in enumerate(strip):
        prog.mark(d, j2, "chunk", Lc[d])
        if j2 > j1:
            first = row0[j2] - lane0[d]  # elements of the lane on its first row
            _hop_routes(builder, region, Y, d, j1, j2, HOP)
            prog.mark(d, j1, "hop_send", (first, Lc[d]))
            prog.mark(d, j2, "hop_recv", (first, Lc[d]))


def relay_ops(sp: dict, n: int, B: int, buf: dict[str, int]) -> list:
    """An embedding strip PE's relay ops (strip_relays): as the token's column of its row, its
    own parts moved and the others sent; as a relay, its part received and the rest handed on;
    a lane's first part sent or received one row down."""
    out, lane, row = [], buf["lane"], buf["out"]
    if "source" in sp:
        local, west, east = sp["source"]
        for _, pos, m, lpos, chunk in local:
            out += [compute(MOV, m, dst=lane + (b * chunk + lpos) * ELEM, src0=row + (b * n + pos) * ELEM)
                    for b in range(B)]
        for color, chain in ((RELAY[0], west), (RELAY[1], east)):
            out += [send(color, m, row + (b * n + pos) * ELEM) for pos, m in chain for b in range(B)]
    if "relay" in sp:
        c_in, c_out, m, lpos, chunk, rest = sp["relay"]
        out += [recv(c_in, m, lane + (b * chunk + lpos) * ELEM) for b in range(B)]
        if rest:
            out += [recv(c_in, rest, buf["fwd"]), send(c_out, rest, buf["fwd"])]
    if "hop_send" in sp:
        m, chunk = sp["hop_send"]
        out += [send(HOP, m, lane + b * chunk * ELEM) for b in range(B)]
    if "hop_recv" in sp:
        m, chunk = sp["hop_recv"]
        out += [recv(HOP, m, lane + b * chunk * ELEM) for b in range(B)]
    return out


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


def lm_memory(spec: ModelSpec, width: int, height: int, cfg, params: DecodeParams, lanes: int = 0
              ) -> tuple[Allocator, GemvShape, list[int], list[int], dict[str, int]]:
    """SRAM of the LM head on a width x height region (FitError if it does not fit); `lanes` > 0:
    a strip receiving that many lanes (a lane's second part more)."""
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
           "zeros": mem.alloc("zeros", ZERO_BYTES, "constants", G1),
           "consts": mem.alloc("consts", N_CONSTS * ELEM, "constants", G0),
           "scal": mem.alloc("scalars", 16 * B * ELEM, "scratch", G1),
           "best": mem.alloc("best", B * ELEM, "activations", G2),
           "token": mem.alloc("token", B * F32, "activations", G2),  # (fp32: 4-byte aligned groups)
           "vocab0": mem.alloc("vocab0", F32, "constants", G0),  # the column's first vocab row (index)
           "none": mem.alloc("none", F32, "constants", G0),  # below every -token: nothing found yet
           "zero32": mem.alloc("zero32", B * F32, "constants", G0),
           "tmp": mem.alloc("tmp", max(Vc) * B * ELEM, "scratch", G0)}
    if lanes:
        buf["lane"] = mem.alloc("lane", max(split(H, lanes)) * B * ELEM, "scratch", G1)
    fit_check(mem, cfg, f"{spec.name} LM head on a {width}x{height} region")
    return mem, shape, Hr, Vc, buf


def lm_head(spec: ModelSpec, region: Region, builder: MeshBuilder, cfg, params: DecodeParams,
            lanes: Lanes, strip: tuple | None = None) -> RegionBuild:
    """Final RMSNorm, logits (a GEMV reducing along Y, vocab over columns) and the greedy
    token: its logit and its id.

    Lane d arrives on row d and is spread along the row; the maximum ends with a row all-reduce
    of each sequence's column maxima; then each column finds the first of its logits equal to
    it (RFIND: -index, in fp32, offset by the column's first vocab row) and a row MAX
    all-reduce of those keeps the lowest id among ties, negated back into `token`.

    A strip (`strip`: each lane's first and last row, placement.strip_rows) takes lane d from
    the north on its column, at its first row: a second part goes one row down, each row's parts
    are gathered east to the last column holding one, which spreads the row's chunk along the
    row (strip_gathers).
    """
    B, H, V = params.batch, spec.hidden_size, spec.vocab_size
    W_, H_ = region.width, region.height
    mem, shape, Hr, Vc, buf = lm_memory(spec, W_, H_, cfg, params, len(strip) if strip else 0)
    g, h, xn, logits, scal, tmp, z = (buf[k] for k in ("g", "h", "xn", "logits", "scal", "tmp", "zeros"))
    red = reducers(region, builder, params, spec, cfg)
    rx, ry = red[X], red[Y]
    prog = RegionProgram(region, THREADS)
    prog.add_roles(X, [(i_chunk(Vc, i), rx.role(i)) for i in range(W_)])
    prog.add_roles(Y, [(i_chunk(Hr, j), ry.role(j)) for j in range(H_)])
    strip = strip if lanes.color_in is not None else None  # (no input: nothing to gather)
    lanes.install(builder, prog, spread=not strip)
    if strip:
        strip_gathers(spec, region, builder, prog, strip, lanes)
    t_head = builder.tag("lm_head", -1, "lm_head")

    def body(xr, yr, sp):
        return tagged(head_body(xr, yr, sp), t_head)

    def head_body(xr, yr, sp):
        i, xrole = xr[0]
        j, yrole = yr[0]
        hj, vi = Hr[j], Vc[i]
        hs = hj * ELEM  # the row's chunk per sequence, back to back
        out = {0: gather_ops(sp, lanes.color_in, hj, B, h, buf["lane"], W_)} if strip \
            else lanes.receive(sp, hj * B, h, W_)
        # the final RMSNorm: mean squares (h . h / H), down the column, 1/RMS, scale, weight
        out[0].append(fill(B, scal, z))
        out[0] += mean_square_ops(B, h, xn, hs, hj, scal, buf["consts"] + C_INV_H * ELEM)
        merge(out, ry.role_ops(yrole, B, scal, tmp))
        out[0] += rms_apply_ops(B, h, xn, hs, hj, scal, g, buf["consts"] + C_EPS * ELEM)
        out[0].append(fill(vi * B, logits, z))
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


def strip_gathers(spec: ModelSpec, region: Region, builder: MeshBuilder, prog: RegionProgram, strip: tuple,
                  lanes: Lanes) -> None:
    """Routes and roles of an LM head strip's input: lane d arrives at (its column, its first
    row); a part of it for the next row goes one row down on HEAD_HOP; each row's parts, at
    consecutive columns, are gathered east hop by hop (colors alternating) to the last, the
    row's root, which spreads the row's chunk along the row on ROW_BCAST."""
    cols = {d: x for d, (x, _) in lanes.in_lanes.items()}
    bc = LineBroadcast(region.width, ROW_BCAST)
    size: dict[tuple[int, int], int] = {}
    for j, parts in enumerate(strip_pieces(spec.hidden_size, strip)):
        xs = [cols[d] for d, *_ in parts]
        for i, (d, pos, n, _) in enumerate(parts):
            size[d, j] = n
            c_in = HEAD_GATHER[(i - 1) % 2] if i else -1
            c_out = HEAD_GATHER[i % 2] if i < len(parts) - 1 else -1
            if c_out >= 0:
                _hop_routes(builder, region, X, j, xs[i], xs[i + 1], c_out)
            prog.mark(xs[i], j, "gather", (pos, n, c_in, c_out))
        if region.width > 1:
            builder.line_routes(region, X, ROW_BCAST, bc.routes_for_root(xs[-1]), lines=[j])
        prog.mark(xs[-1], j, "root", True)
    for d, (j1, j2) in enumerate(strip):
        second = size[d, j2] if j2 > j1 else 0
        prog.mark(cols[d], j1, "lane", (size[d, j1], second))
        if second:
            _hop_routes(builder, region, Y, cols[d], j1, j2, HEAD_HOP)
            prog.mark(cols[d], j2, "hop_recv", second)


def gather_ops(sp: dict, color_in: int, hj: int, B: int, h: int, lane: int, width: int) -> list:
    """An LM head strip PE's input ops (strip_gathers): its lane received (the first part into
    the row's chunk, a second part sent one row down), or that part received; the row's parts
    before its own received and handed on with its own; the row's chunk spread from the root."""
    out = []
    if "lane" in sp:  # (a lane's first row holds its first part: a gather mark there too)
        pos, first, second = sp["gather"][0], *sp["lane"]
        for b in range(B):
            out.append(recv(color_in, first, h + (b * hj + pos) * ELEM))
            if second:
                out.append(recv(color_in, second, lane + b * second * ELEM))
        if second:
            out.append(send(HEAD_HOP, second * B, lane))
    if "hop_recv" in sp:
        out += [recv(HEAD_HOP, sp["hop_recv"], h + b * hj * ELEM) for b in range(B)]
    if "gather" in sp:
        pos, n, c_in, c_out = sp["gather"]
        if c_in >= 0:
            out += [recv(c_in, pos, h + b * hj * ELEM) for b in range(B)]
        if c_out >= 0:
            out += [send(c_out, pos + n, h + b * hj * ELEM) for b in range(B)]
    if width > 1:
        out.append(send(ROW_BCAST, hj * B, h) if "root" in sp else recv(ROW_BCAST, hj * B, h))
    return out
