"""Region programs of a decode step: decoder layers, the embedding lookup and the LM head.

Layout on a layer region of P columns and Q >= P rows (docs/workloads.md; square: Q = P): the
hidden vector is split into P chunks, chunk i living on every PE of column i ("column layout");
vectors split over rows are cut into Q chunks. GEMVs alternate their reduction axis:
QKV and gate/up reduce along X and leave their outputs split over rows ("row layout"); O and
down reduce along Y and return to column layout, so no transpose crosses the mesh. The KV cache
of the context is split over columns (tokens) and rows (K/V dimensions, each row's query
dimensions kept with the key/value dimensions they attend with); scores are all-reduced down
the columns, softmax statistics and weighted values along the rows.

A region receives its input at one PE per lane (lane d carries hidden chunk d) and hands its
output on at one PE per lane after a hand-off barrier: a region-wide all-reduce of one element
whose single anchor PE (the root of the column all-reduce nested at the row all-reduces' root
column) makes everything after it a pure time shift of the anchor's send. That is what lets a
token's stages compose exactly (placement.py).

Operand placement avoids SRAM bank conflicts the way a compiler would: weights in bank group 0,
a dot-product scratch in group 1, GEMV outputs in group 2, the residual stream and caches in
group 3 (byte offsets 0, 2, 4, 6 from 16-byte boundaries).
"""
from __future__ import annotations

import dataclasses

from .. import isa
from ..errors import WseError
from ..trace import Op, compute, recv, send, signal, wait
from .collectives import LineAllReduce, LineBroadcast, ReduceColors
from .gemv import ELEM, GemvShape, gemv_ops
from .mesh import HI, LO, RAMP, X, Y, Allocator, MeshBuilder, Region, RegionProgram, split, tagged
from .mla import MlaSplit, mla_split, pe_moves
from .models import ModelSpec
from .plan import DIAG_BCAST, KV_SHIFT, REDUCE_BASE, FitError, fit_check

FP16 = isa.DTYPE_FP16
MUL, ADD, FMAC, MAX, MOV, SCALE = (isa.KIND_MUL, isa.KIND_ADD, isa.KIND_FMAC, isa.KIND_MAX, isa.KIND_MOV,
                                   isa.KIND_SCALE)
# Elementwise functions without a SIMD instruction, as vector FMACs per element [assumption]:
EXP_FMACS = 4  # exp by range reduction and a polynomial
SILU_FMACS = 4  # x * sigmoid(x): the exp plus the reciprocal folded in
SOFTMAX_FLOPS = 1 + 1 + 2 * EXP_FMACS + 2 + 1  # max, subtract, exp, sum, scale per element
SILU_MUL_FLOPS = 2 * SILU_FMACS + 1  # SiLU(gate) * up per element
G0, G1, G2, G3 = 0, 2, 4, 6  # byte offsets selecting bank groups 0..3
# semaphores (0 is the all-reduce's)
SEM_KV_READY, SEM_KV_RECEIVED, SEM_KV_SENT = 1, 2, 3
THREADS = 4  # 0 main, 1 all-reduce upper-side receives, 2 KV shift send, 3 KV shift receive


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    batch: int = 1
    context: int = 128  # cached tokens attended to, the current one included
    token: int = 1  # token id looked up in the embedding (all sequences of a batch: adjacent ids)
    algo: str = "two-level"  # all-reduce algorithm: two-level or chain
    groups: int | None = None  # two-level group count (default: divisor of P nearest sqrt P)
    expert_skew: float = 0.0  # MoE expert choice: 0 uniform, s > 0 Zipf-skewed popularity (moe_experts)
    moe_mapping: str = "auto"  # routed experts: "local" (in the layer region), "regions" (expert regions), "auto"
    experts_per_region: int = 0  # expert regions hold at most this many routed experts (0: as many as fit)
    slot_shape: str = "tall"  # layer and expert slots: "tall" (P x Q, Q >= P, the largest area) or "square"
    uniform_slots: bool = False  # a multi-wafer system: every wafer on one slot shape (system/wafers.py)

    def __post_init__(self) -> None:
        if self.moe_mapping not in MOE_MAPPINGS:
            raise WseError(f"--moe-mapping {self.moe_mapping!r} is not one of {', '.join(MOE_MAPPINGS)}")
        if self.slot_shape not in SLOT_SHAPES:
            raise WseError(f"--slot-shape {self.slot_shape!r} is not one of {', '.join(SLOT_SHAPES)}")
        if self.experts_per_region < 0:
            raise WseError(f"--experts-per-region {self.experts_per_region} must be at least 0")


MOE_MAPPINGS = ("auto", "local", "regions")
SLOT_SHAPES = ("square", "tall")


@dataclasses.dataclass
class RegionBuild:
    """What a region generator produced besides the programs and routes in the builder."""

    kind: str
    region: Region
    memory: Allocator
    flops: dict[str, int]  # analytic executed FLOPs by component; "allreduce": the collectives' adds
    model_flops: int  # FLOPs of the computation itself, each operation counted once
    weight_bytes: int  # real weight bytes resident (no padding)
    kv_bytes: int  # real KV-cache bytes resident
    anchor: tuple[int, int]  # local (x, y) of the hand-off anchor PE


def reducers(region: Region, builder: MeshBuilder | None, params: DecodeParams) -> dict:
    """The all-reduce of each axis of a region (routes added to the builder when given)."""
    out = {}
    for axis in (X, Y):
        n = region.size(axis)
        colors = ReduceColors.from_base(REDUCE_BASE[axis])
        if params.algo == "chain":
            red = LineAllReduce(n, colors, groups=1, root="end")
        elif params.algo == "two-level":
            red = LineAllReduce(n, colors, groups=min(params.groups, n) if params.groups else None)
        else:
            raise WseError(f"unknown all-reduce algorithm {params.algo!r} (two-level, chain)")
        if builder is not None:
            for color, per in red.routes().items():
                builder.line_routes(region, axis, color, per)
        out[axis] = red
    return out


def anchor_of(red: dict) -> tuple[int, int]:
    """Local (x, y) of the hand-off anchor: the column all-reduce root on the row roots' column."""
    return red[X].final_root, red[Y].final_root


def _merge(out: dict[int, list[Op]], *parts: dict[int, list[Op]]) -> dict[int, list[Op]]:
    for p in parts:
        for t, ops in p.items():
            out.setdefault(t, []).extend(ops)
    return out


def _mark(out: dict[int, list[Op]]) -> dict[int, int]:
    return {t: len(ops) for t, ops in out.items()}


def _retag(out: dict[int, list[Op]], mark: dict[int, int], tag: int) -> None:
    """Label the ops added to `out` since `mark` with `tag`."""
    for t, ops in out.items():
        start = mark.get(t, 0)
        ops[start:] = [op._replace(tag=tag) for op in ops[start:]]


def handoff(red: dict, xrole: tuple, yrole: tuple, buf: int, tmp: int) -> dict[int, list[Op]]:
    """The hand-off barrier: a one-element all-reduce over the region with a single anchor."""
    inner = red[Y].role_ops(yrole, 1, buf, tmp) if xrole[-1] else None
    return red[X].role_ops(xrole, 1, buf, tmp, ADD, FP16, at_root=inner)


def handoff_flops(region: Region) -> int:
    return region.height * (region.width - 1) + (region.height - 1)


class Lanes:
    """Input and output lanes of a region: lane d carries hidden chunk d.

    in_lanes / out_lanes map lane -> local (x, y). Input lanes are spread along `spread` (Y:
    down the receiver's column, X: along its row) on `bcast_color`.
    """

    def __init__(self, color_in: int | None, in_lanes: dict[int, tuple[int, int]], color_out: int | None,
                 out_lanes: dict[int, tuple[int, int]], spread=Y, bcast_color: int = DIAG_BCAST):
        self.color_in, self.in_lanes = color_in, dict(in_lanes) if color_in is not None else {}
        self.color_out, self.out_lanes = color_out, dict(out_lanes) if color_out is not None else {}
        self.spread, self.bcast_color = spread, bcast_color

    def install(self, builder: MeshBuilder, prog: RegionProgram) -> None:
        R = prog.region
        for d, (x, y) in self.in_lanes.items():
            prog.mark(x, y, "in", d)
        for d, (x, y) in self.out_lanes.items():
            prog.mark(x, y, "out", d)
        n = R.size(self.spread)
        if not self.in_lanes or n == 1:
            return
        bc = LineBroadcast(n, self.bcast_color)
        for x, y in self.in_lanes.values():
            line, root = (x, y) if self.spread is Y else (y, x)
            builder.line_routes(R, self.spread, self.bcast_color, bc.routes_for_root(root), lines=[line])

    def receive(self, sp: dict, m: int, buf: int, n_line: int) -> dict[int, list[Op]]:
        """Receive a lane at its receiver and spread it along the line."""
        return self.receive_parts(sp, [(m, buf)], n_line)

    def receive_parts(self, sp: dict, parts: list[tuple[int, int]], n_line: int) -> dict[int, list[Op]]:
        """Receive a lane's payload, (elements, buffer) parts in order, and spread each along the line."""
        if self.color_in is None:
            return {}
        ops: list[Op] = []
        for m, buf in parts:
            if "in" in sp:
                ops.append(recv(self.color_in, m, buf))
                if n_line > 1:
                    ops.append(send(self.bcast_color, m, buf))
            elif n_line > 1:
                ops.append(recv(self.bcast_color, m, buf))
        return {0: ops} if ops else {}

    def send(self, sp: dict, m: int, buf: int) -> dict[int, list[Op]]:
        return self.send_parts(sp, [(m, buf)])

    def send_parts(self, sp: dict, parts: list[tuple[int, int]]) -> dict[int, list[Op]]:
        if self.color_out is None or "out" not in sp:
            return {}
        return {0: [send(self.color_out, m, buf) for m, buf in parts]}


# ---- decoder layer ------------------------------------------------------------------------------


@dataclasses.dataclass
class LayerPlan:
    """Sizes and buffers of one decoder layer on a region of P columns and Q rows."""

    spec: ModelSpec
    layer: int
    P: int
    params: DecodeParams
    mem: Allocator
    Hc: list[int]
    q_r: list[int]
    k_r: list[int]
    qkv_r: list[int]
    o_r: list[int]
    f_r: list[int]
    e_r: list[int]
    T_c: list[int]
    heads_r: list[int]
    shapes: dict[str, GemvShape]
    buf: dict[str, int]
    routed: bool = True  # a MoE layer's routed experts live in this region (else in expert regions)
    mla: MlaSplit | None = None  # latent attention's cut over the region (mla.py)
    Q: int = 0  # rows (0: P, a square region)

    def __post_init__(self) -> None:
        self.Q = self.Q or self.P

    @property
    def moe(self) -> bool:
        return self.spec.is_moe_layer(self.layer)

    def local_experts(self) -> dict[int, int]:
        """Experts this region computes (index of its tile copy -> sequences using it)."""
        m = self.spec.moe
        use = moe_experts(self.spec, self.layer, self.params.batch, self.params.expert_skew)
        if self.routed:
            return use
        return {e - m.experts: u for e, u in use.items() if e >= m.experts}


def plan_layer(spec: ModelSpec, layer: int, P: int, cfg, params: DecodeParams, routed: bool = True,
               Q: int | None = None) -> LayerPlan:
    """Split the layer over a region of P columns and Q rows (default P) and allocate its SRAM
    (FitError if it does not fit).

    routed=False: a MoE layer keeps only its router and shared experts; the routed experts
    live in expert regions that follow it in the chain (plan_experts). Q >= P: lanes enter
    and leave on the diagonal, which needs a row for every column."""
    H, B, T = spec.hidden_size, params.batch, params.context
    Q = Q or P
    if P > H:
        raise WseError(f"a {P}x{Q} region is larger than the hidden size {H}")
    if Q < P:
        raise WseError(f"a {P}x{Q} region has fewer rows than columns (lanes enter on the diagonal)")
    if Q > most_rows(spec):
        raise FitError(f"{spec.name}: a layer region has at most {most_rows(spec)} rows (one per row-split "
                       f"dimension), not {Q}")
    moe = spec.is_moe_layer(layer)
    if moe and spec.moe.expert_bias:
        raise WseError(f"{spec.name}: experts with biases have no decode mapping yet")
    Hc = split(H, P)
    ms = None
    if spec.mla:  # rows own the latent cache's dims: q_r, k_r, o_r are the per-token lengths
        ms = mla_split(spec, P, Q)
        q_r, k_r, qkv_r = [spec.heads * c for c in ms.c_r], ms.c_r, ms.a_r
        o_r = [spec.heads * v for v in ms.v_r]
    else:
        q_r, k_r = split(spec.q_size, Q), split(spec.kv_size, Q)
        qkv_r = [q + 2 * k for q, k in zip(q_r, k_r)]
        o_r = split(spec.attn_out_size, Q)
    ffn = spec.moe.expert_ffn_size if moe else spec.ffn_size
    f_r = split(ffn, Q)
    e_r = split(spec.moe.experts, Q) if moe else [0] * Q
    T_c = split(T, P)
    heads_r = split(spec.heads, Q)
    mem = Allocator(0, cfg.sram_bytes - cfg.sram_reserved_bytes)
    shapes: dict[str, GemvShape] = {}

    def weights(name: str, m: int, n: int, axis, ins: list[int], outs: list[int], copies: int = 1) -> None:
        s = GemvShape(m, n, axis, ins, outs)
        s.pitch = -(-max(outs) * ELEM // 8) * 8
        s.weights = mem.alloc(f"w_{name}", s.tile_bytes() * copies, "weights", G0)
        shapes[name] = s

    if ms:
        m_ = spec.mla
        weights("a", H, m_.q_lora_rank + sum(ms.c_r), X, Hc, qkv_r)
        weights("qb", m_.q_lora_rank, spec.q_size, Y, ms.qa_r, ms.qn_r)
        # block-diagonal absorbed up-projections: a PE's tile covers its column's heads only
        weights("uk", spec.heads * m_.qk_nope_head_dim, m_.kv_lora_rank, X, ms.nope_n, ms.v_r)
        weights("uv", m_.kv_lora_rank, spec.heads * m_.v_head_dim, Y, ms.v_r, ms.oh_r)
        weights("o", spec.attn_out_size, H, X, ms.oh_r, Hc + [0] * (Q - P))  # rows j >= P: none
    else:
        weights("qkv", H, spec.q_size + 2 * spec.kv_size, X, Hc, qkv_r)
        weights("o", spec.attn_out_size, H, Y, o_r, Hc)
    if moe:
        n_exp = (spec.moe.experts if routed else 0) + spec.moe.shared_experts
        weights("router", H, spec.moe.experts, X, Hc, e_r)
        weights("gate_up", H, 2 * ffn, X, Hc, [2 * f for f in f_r], n_exp)
        weights("down", ffn, H, Y, f_r, Hc, n_exp)
    else:
        weights("gate_up", H, 2 * ffn, X, Hc, [2 * f for f in f_r])
        weights("down", ffn, H, Y, f_r, Hc)
    buf: dict[str, int] = {}
    buf["g1"] = mem.alloc("g1", max(Hc) * ELEM, "weights", G0)
    buf["g2"] = mem.alloc("g2", max(Hc) * ELEM, "weights", G0)
    if spec.qkv_bias:
        buf["b_qkv"] = mem.alloc("b_qkv", max(qkv_r) * ELEM, "weights", G0)
    if spec.o_bias:
        buf["b_o"] = mem.alloc("b_o", max(Hc) * ELEM, "weights", G0)
    if moe and spec.moe.router_bias:
        buf["b_router"] = mem.alloc("b_router", max(e_r) * ELEM, "weights", G0)
    if ms:
        buf["g_qa"] = mem.alloc("g_qa", max(ms.qa_r) * ELEM, "weights", G0)
        buf["g_kv"] = mem.alloc("g_kv", max(ms.v_r) * ELEM, "weights", G0)
    kv_tok = max(k_r) if ms else 2 * max(k_r)
    buf["kv"] = mem.alloc("kv_cache", max((max(T_c) + 1) * kv_tok, max(o_r)) * B * ELEM, "kv_cache", G3)
    buf["h"] = mem.alloc("h", max(Hc) * B * ELEM, "activations", G3)
    buf["xn"] = mem.alloc("xn", max(Hc) * B * ELEM, "activations", G3)
    buf["sc"] = mem.alloc("scores", max(spec.heads * max(T_c), 1) * B * ELEM, "activations", G3)
    buf["qkv"] = mem.alloc("qkv", max(max(qkv_r), max(e_r)) * B * ELEM, "activations", G2)
    buf["att"] = mem.alloc("att", max(o_r) * B * ELEM, "activations", G2)
    buf["gu"] = mem.alloc("gate_up", 2 * max(f_r) * B * ELEM, "activations", G2)
    buf["y"] = mem.alloc("y", max(Hc) * B * ELEM, "activations", G2)
    if ms:
        buf["q"] = mem.alloc("q", max(ms.qn_r) * B * ELEM, "activations", G2)
        buf["qabs"] = mem.alloc("q_absorbed", max(q_r) * B * ELEM, "activations", G2)
        buf["oh"] = mem.alloc("o_heads", max(ms.oh_r) * B * ELEM, "activations", G2)
    longest = max(max(qkv_r), spec.heads * max(T_c), max(o_r), max(Hc), 2 * max(f_r), max(e_r),
                  max(ms.qn_r) if ms else 0, max(q_r) if ms else 0, max(ms.oh_r) if ms else 0) * B
    buf["dot"] = mem.alloc("dot", longest * ELEM, "scratch", G1)
    buf["scal"] = mem.alloc("scalars", 16 * B * ELEM, "scratch", G1)
    buf["tmp"] = mem.alloc("tmp", longest * ELEM, "scratch", G0)
    if moe and not routed:
        buf["gates"] = mem.alloc("gates", spec.moe.experts_per_token * B * ELEM, "activations", G2)
    fit_check(mem, cfg, f"{spec.name} layer {layer} on a {P}x{Q} region (batch {B}, context {T})")
    return LayerPlan(spec, layer, P, params, mem, Hc, q_r, k_r, qkv_r, o_r, f_r, e_r, T_c, heads_r, shapes, buf,
                     routed or not moe, ms, Q)


def most_rows(spec: ModelSpec) -> int:
    """The most rows a layer region may have: every row-split vector needs an element per row
    (the KV slice, or MLA's cache dimension, is the shortest)."""
    return min(spec.kv_cache_width // (1 if spec.mla else 2), spec.hidden_size)


def ffn_ops(S: dict[str, GemvShape], f_r: list[int], Hc: list[int], red: dict, buf: dict[str, int], i: int,
            j: int, xrole: tuple, yrole: tuple, expert: int, batch: int) -> dict[int, list[Op]]:
    """Gated FFN of PE (i, j) on `batch` sequences: gate/up (reduce X), SiLU * up, down (reduce Y).

    Reads xn, leaves the output chunk in y; `expert` selects the expert's copy of the tiles.
    """
    s_gu = dataclasses.replace(S["gate_up"], weights=S["gate_up"].weights + expert * S["gate_up"].tile_bytes())
    s_dn = dataclasses.replace(S["down"], weights=S["down"].weights + expert * S["down"].tile_bytes())
    gu, yb, dot, tmp = buf["gu"], buf["y"], buf["dot"], buf["tmp"]
    fj = f_r[j]
    out = {0: gemv_ops(s_gu, i, j, buf["xn"], gu, batch, max(Hc) * ELEM, 2 * max(f_r) * ELEM)}
    _merge(out, red[X].role_ops(xrole, 2 * fj * batch, gu, tmp))
    act = fj * batch
    if act:  # (a row with no FFN dims when there are more rows than FFN dims)
        out[0] += [compute(FMAC, act, dst=gu, src0=dot) for _ in range(SILU_FMACS)]
        out[0].append(compute(MUL, act, dst=gu, src0=gu, src1=dot))
    out[0] += gemv_ops(s_dn, j, i, gu, yb, batch, max(f_r) * ELEM, max(Hc) * ELEM)
    return _merge(out, red[Y].role_ops(yrole, Hc[i] * batch, yb, tmp))


PARTS = ("norm1", "qkv", "attention", "o", "norm2", "ffn", "handoff")


def decode_layer(plan: LayerPlan, region: Region, builder: MeshBuilder, lanes: Lanes,
                 parts: tuple[str, ...] = PARTS) -> RegionBuild:
    """Programs and routes of one decoder layer's decode step on `region` (or some `parts`)."""
    spec, P, Q, prm = plan.spec, plan.P, plan.Q, plan.params
    B, H = prm.batch, spec.hidden_size
    b_ = plan.buf
    S = plan.shapes
    Hc, qkv_r, o_r, f_r, e_r = plan.Hc, plan.qkv_r, plan.o_r, plan.f_r, plan.e_r
    red = reducers(region, builder, prm)
    rx, ry = red[X], red[Y]
    tmp, dot, scal, h, xn = b_["tmp"], b_["dot"], b_["scal"], b_["h"], b_["xn"]
    qkv, att, gu, yb, sc, kvc = b_["qkv"], b_["att"], b_["gu"], b_["y"], b_["sc"], b_["kv"]
    hstride = max(Hc) * ELEM
    prog = RegionProgram(region, THREADS)
    prog.add_roles(X, [(i_chunk(Hc, i), i % 2, rx.role(i), plan.T_c[i], i == 0, i == P - 1) for i in range(P)])
    prog.add_roles(Y, [(i_chunk(qkv_r, j), plan.q_r[j], plan.k_r[j], i_chunk(o_r, j), i_chunk(f_r, j),
                        i_chunk(e_r, j), plan.heads_r[j], ry.role(j)) for j in range(Q)])
    lanes.install(builder, prog)
    ms = plan.mla
    if ms:
        prog.add_roles(X, [(i_chunk(ms.qn_r, i), ms.qn_r[i], ms.nope_runs[i], ms.pe_runs[i], i_chunk(ms.oh_r, i),
                            ms.oh_r[i], ms.oh_runs[i]) for i in range(P)])
        hc_rows = Hc + [0] * (Q - P)  # the O projection's rows: column chunks on the first P
        prog.add_roles(Y, [(i_chunk(ms.qa_r, j), ms.qa_r[j], ms.c_r[j], ms.v_r[j], ms.rope_lo[j], ms.r_r[j],
                            i_chunk(hc_rows, j), hc_rows[j]) for j in range(Q)])
        if Q > 1:  # the transpose back to column layout: each diagonal PE broadcasts down its column
            bc = LineBroadcast(Q, DIAG_BCAST)
            for d in range(P):
                prog.mark(d, d, "diag", 1)
                if lanes.in_lanes.get(d) != (d, d):  # (lanes entering on the diagonal already route it)
                    builder.line_routes(region, Y, DIAG_BCAST, bc.routes_for_root(d), lines=[d])
    for i in range(P - 1):  # KV shift: column i sends east on KV_SHIFT[i % 2]
        builder.line_routes(region, X, KV_SHIFT[i % 2], {i: (RAMP, (HI,)), i + 1: (LO, (RAMP,))})

    def norm(hi: int, xrole: tuple, g: int) -> dict[int, list[Op]]:
        """RMSNorm of h into xn: sum of squares, row all-reduce, scale, weight."""
        out = {0: [compute(FMAC, hi, dst=dot, src0=h + b * hstride) for b in range(B)]}
        _merge(out, rx.role_ops(xrole, B, scal, tmp))
        out[0].append(compute(SCALE, hi * B, dst=xn, src0=h))
        out[0] += [compute(MUL, hi, dst=xn + b * hstride, src0=xn + b * hstride, src1=g) for b in range(B)]
        return out

    def ffn(i: int, j: int, xrole: tuple, yrole: tuple, expert: int, batch: int) -> dict[int, list[Op]]:
        return ffn_ops(S, f_r, Hc, red, b_, i, j, xrole, yrole, expert, batch)

    L_ = plan.layer
    tag = {name: builder.tag(f"layer {L_} {name}", L_, kind) for name, kind in (
        ("input", "transfer"), ("norm1", "norm"), ("qkv", "gemv"), ("attention", "attention"), ("o", "gemv"),
        ("norm2", "norm"), ("ffn", "ffn"), ("handoff", "barrier"), ("output", "transfer"))}

    def body(xr, yr, sp):
        i, parity, xrole, tc, first_col, last_col = xr[0]
        jq, qj, kj, jo, jf, je, hj, yrole = yr[0]
        hi, qkvj, oj = Hc[i], qkv_r[jq], o_r[jo]
        out: dict[int, list[Op]] = {0: []}
        m = _mark(out)
        _merge(out, lanes.receive(sp, hi * B, h, Q))
        _retag(out, m, tag["input"])
        if "norm1" in parts:
            m = _mark(out)
            _merge(out, norm(hi, xrole, b_["g1"]))
            _retag(out, m, tag["norm1"])
        if "qkv" in parts and ms:
            m = _mark(out)
            _merge(out, mla_project(i, jq, xr[1], yr[1], xrole, yrole))
            _retag(out, m, tag["qkv"])
        elif "qkv" in parts:
            m = _mark(out)
            # QKV projection (reduce X): slice j of q|k|v on every PE of row j
            out[0] += gemv_ops(S["qkv"], i, jq, xn, qkv, B, hstride, max(qkv_r) * ELEM)
            _merge(out, rx.role_ops(xrole, qkvj * B, qkv, tmp))
            if "b_qkv" in b_:
                out[0] += [compute(ADD, qkvj, dst=qkv + b * max(qkv_r) * ELEM, src0=qkv + b * max(qkv_r) * ELEM,
                                   src1=b_["b_qkv"]) for b in range(B)]
            # RoPE on the slice's q and k dimensions: x * cos + rotate(x) * sin
            rope = (qj + kj) * B
            out[0] += [compute(MUL, rope, dst=qkv, src0=qkv, src1=dot), compute(FMAC, rope, dst=qkv, src0=dot)]
            _retag(out, m, tag["qkv"])
        if "attention" in parts:
            m = _mark(out)
            if ms:  # multi-query attention over the latent cache: kv_len = the row's cache dims
                _merge(out, attention(first_col, last_col, parity, tc, qj, kj, qkv + yr[1][1] * ELEM, oj,
                                      max(o_r) * ELEM, hj, xrole, yrole))
            else:
                _merge(out, attention(first_col, last_col, parity, tc, qj, 2 * kj, qkv, oj, max(o_r) * ELEM, hj,
                                      xrole, yrole))
            _retag(out, m, tag["attention"])
        if "o" in parts and ms:
            m = _mark(out)
            _merge(out, mla_output(i, jo, xr[1], yr[1], xrole, yrole, sp))
            out[0].append(compute(ADD, hi * B, dst=h, src0=h, src1=yb))
            _retag(out, m, tag["o"])
        elif "o" in parts:
            m = _mark(out)
            # O projection (reduce Y) back to column layout, bias, residual
            out[0] += gemv_ops(S["o"], jo, i, att, yb, B, max(o_r) * ELEM, hstride)
            _merge(out, ry.role_ops(yrole, hi * B, yb, tmp))
            if "b_o" in b_:
                out[0] += [compute(ADD, hi, dst=yb + b * hstride, src0=yb + b * hstride, src1=b_["b_o"])
                           for b in range(B)]
            out[0].append(compute(ADD, hi * B, dst=h, src0=h, src1=yb))
            _retag(out, m, tag["o"])
        if "norm2" in parts:
            m = _mark(out)
            _merge(out, norm(hi, xrole, b_["g2"]))
            _retag(out, m, tag["norm2"])
        if "ffn" in parts:
            m = _mark(out)
            if plan.moe:
                _merge(out, moe_ffn(i, jf, je, xrole, yrole))
            else:
                _merge(out, ffn(i, jf, xrole, yrole, 0, B))
            out[0].append(compute(ADD, hi * B, dst=h, src0=h, src1=yb))
            _retag(out, m, tag["ffn"])
        if "handoff" in parts:
            m = _mark(out)
            _merge(out, handoff(red, xrole, yrole, scal, tmp))
            _retag(out, m, tag["handoff"])
        m = _mark(out)
        if plan.routed:
            _merge(out, lanes.send(sp, hi * B, h))
        else:  # on to the expert regions: the FFN input, the residual stream and the gate values
            _merge(out, lanes.send_parts(sp, dispatch_parts(spec, hi, B, b_)))
        _retag(out, m, tag["output"])
        return out

    def attention(first_col, last_col, parity, tc, qj, kv_len, kv_src, oj, o_stride, hj, xrole, yrole
                  ) -> dict[int, list[Op]]:
        """Decode attention of the row's heads over the column's cached tokens: per token, a
        qj-long dot product and an oj-long weighted value; kv_len cached elements per token."""
        # KV cache, shift-based: column 0 appends the new token, every column passes its oldest east
        kv = kv_len * B
        t0 = [compute(MOV, kv, dst=kvc, src0=kv_src)] if first_col else []
        t0.append(signal(SEM_KV_READY))
        t2 = [wait(SEM_KV_READY)]
        t3: list[Op] = []
        if not last_col:
            t2 += [send(KV_SHIFT[parity], kv, kvc), signal(SEM_KV_SENT)]
            t0.append(wait(SEM_KV_SENT))
        if not first_col:
            t3 += [recv(KV_SHIFT[1 - parity], kv, kvc + tc * kv * ELEM), signal(SEM_KV_RECEIVED)]
            t0.append(wait(SEM_KV_RECEIVED))
        out = {0: t0, 2: t2, 3: t3}
        # scores: per sequence and cached token, a dot product over the row's query dimensions
        out[0] += [compute(FMAC, qj, dst=dot, src0=qkv) for _ in range(B * tc)]
        ns = spec.heads * tc * B
        _merge(out, ry.role_ops(yrole, ns, sc, tmp))
        # softmax over the tokens of the heads this row owns
        e = hj * tc * B
        if e:
            out[0].append(compute(MAX, e, dst=sc, src0=sc, src1=dot))
        _merge(out, rx.role_ops(xrole, hj * B, scal, tmp, MAX))
        if e:
            out[0].append(compute(SCALE, e, dst=sc, src0=sc))  # s - max
            out[0] += [compute(FMAC, e, dst=sc, src0=dot) for _ in range(EXP_FMACS)]
            out[0].append(compute(FMAC, e, dst=dot, src0=sc))  # sum
        _merge(out, rx.role_ops(xrole, hj * B, scal, tmp))
        if e:
            out[0].append(compute(SCALE, e, dst=sc, src0=sc))  # / sum
        # every row needs every head's probabilities for its value dimensions
        _merge(out, ry.role_ops(yrole, ns, sc, tmp))
        # weighted values: per sequence and token an FMAC over the row's output dimensions
        if oj:
            out[0] += [compute(FMAC, oj, dst=att + b * o_stride, src0=kvc) for b in range(B) for _ in range(tc)]
        return _merge(out, rx.role_ops(xrole, oj * B, att, tmp))

    def mla_project(i: int, ja: int, xm: tuple, ym: tuple, xrole: tuple, yrole: tuple) -> dict[int, list[Op]]:
        """Latent attention's projections (mla.py): q_a | c, their norms, RoPE on k_pe, q, RoPE on
        q_pe, and the absorbed query q_abs over the row's cache dims."""
        iq, qn, nope_runs, pe_runs = xm[:4]
        jqa, qa, c, v, rope_lo, r = ym[:6]
        ast, qst, cst = max(qkv_r) * ELEM, max(ms.qn_r) * ELEM, max(plan.q_r) * ELEM
        aj = qkv_r[ja]
        out = {0: gemv_ops(S["a"], i, ja, xn, qkv, B, hstride, ast)}
        _merge(out, rx.role_ops(xrole, aj * B, qkv, tmp))
        # RMSNorm of q_a and of c_kv: sums of squares, one column all-reduce for both
        for b in range(B):
            out[0].append(compute(FMAC, qa, dst=dot, src0=qkv + b * ast))
            if v:
                out[0].append(compute(FMAC, v, dst=dot, src0=qkv + b * ast + qa * ELEM))
        _merge(out, ry.role_ops(yrole, 2 * B, scal, tmp))
        out[0].append(compute(SCALE, (qa + v) * B, dst=qkv, src0=qkv))
        for b in range(B):
            out[0].append(compute(MUL, qa, dst=qkv + b * ast, src0=qkv + b * ast, src1=b_["g_qa"]))
            if v:
                out[0].append(compute(MUL, v, dst=qkv + b * ast + qa * ELEM, src0=qkv + b * ast + qa * ELEM,
                                      src1=b_["g_kv"]))
        if r:  # RoPE on the row's k_pe dims
            out[0] += [compute(MUL, r * B, dst=qkv, src0=qkv, src1=dot), compute(FMAC, r * B, dst=qkv, src0=dot)]
        # q = q_a . W_qb (reduce Y): column chunks of every head's nope | rope dims
        out[0] += gemv_ops(S["qb"], jqa, iq, qkv, b_["q"], B, ast, qst)
        _merge(out, ry.role_ops(yrole, qn * B, b_["q"], tmp))
        pe = qn - sum(n for _, _, n in nope_runs)
        if pe:  # RoPE on the column's q_pe dims
            out[0] += [compute(MUL, pe * B, dst=b_["q"], src0=b_["q"], src1=dot),
                       compute(FMAC, pe * B, dst=b_["q"], src0=dot)]
        # q_abs = [q_nope . W_uk^T | q_pe] on the row's cache dims (reduce X)
        qa_ = b_["qabs"]
        for b in range(B):
            row = 0
            for hd, pos, n in nope_runs:
                for t in range(n):
                    if v:
                        out[0].append(compute(FMAC, v, dst=qa_ + b * cst + hd * c * ELEM,
                                              src0=S["uk"].weights + row * S["uk"].pitch,
                                              src1=b_["q"] + b * qst + (pos + t) * ELEM))
                    row += 1
            for hd, off, n, pos in pe_moves(pe_runs, rope_lo, r, v):
                out[0].append(compute(MOV, n, dst=qa_ + b * cst + (hd * c + off) * ELEM,
                                      src0=b_["q"] + b * qst + pos * ELEM))
        return _merge(out, rx.role_ops(xrole, spec.heads * c * B, qa_, tmp))

    def mla_output(i: int, jo: int, xm: tuple, ym: tuple, xrole: tuple, yrole: tuple, sp: dict
                   ) -> dict[int, list[Op]]:
        """o = o_lat . W_uv (reduce Y), out = o . W_o (reduce X), transposed back to column layout
        by a broadcast from the diagonal; leaves the column's chunk in y."""
        io, ohn, oh_runs = xm[4:7]
        v, jh, hj_ = ym[3], ym[6], ym[7]
        ost, ohs = max(o_r) * ELEM, max(ms.oh_r) * ELEM
        ops: list[Op] = []
        for b in range(B):
            for cc in range(v):
                for hd, pos, n in oh_runs:
                    ops.append(compute(FMAC, n, dst=b_["oh"] + b * ohs + pos * ELEM,
                                       src0=S["uv"].weights + cc * S["uv"].pitch + pos * ELEM,
                                       src1=att + b * ost + (hd * v + cc) * ELEM))
        out = {0: ops}
        _merge(out, ry.role_ops(yrole, ohn * B, b_["oh"], tmp))
        out[0] += gemv_ops(S["o"], io, jh, b_["oh"], yb, B, ohs, hstride)
        _merge(out, rx.role_ops(xrole, hj_ * B, yb, tmp))
        if Q > 1:
            if "diag" in sp:
                out[0].append(send(DIAG_BCAST, hj_ * B, yb))
            else:
                out[0].append(recv(DIAG_BCAST, Hc[i] * B, yb))
        return out

    def moe_ffn(i: int, jf: int, je: int, xrole: tuple, yrole: tuple) -> dict[int, list[Op]]:
        m = spec.moe
        ej = e_r[je]
        out = {0: gemv_ops(S["router"], i, je, xn, qkv, B, hstride, max(e_r) * ELEM)}
        _merge(out, rx.role_ops(xrole, ej * B, qkv, tmp))
        if "b_router" in b_ and ej:
            out[0] += [compute(ADD, ej, dst=qkv + b * max(e_r) * ELEM, src0=qkv + b * max(e_r) * ELEM,
                               src1=b_["b_router"]) for b in range(B)]
        if ej:  # top-k: k max passes over the row's logits, merged down the columns
            out[0] += [compute(MAX, ej * B, dst=qkv, src0=qkv, src1=dot) for _ in range(m.experts_per_token)]
        _merge(out, ry.role_ops(yrole, m.experts_per_token * B, b_.get("gates", scal), tmp, MAX))
        for e, users in plan.local_experts().items():
            _merge(out, ffn(i, jf, xrole, yrole, e, users))
            out[0].append(compute(FMAC, Hc[i] * users, dst=h, src0=yb))  # gate-weighted sum into h
        return out

    prog.add(body)
    prog.program_ids(builder)
    executed, model = layer_flops(plan, parts)
    return RegionBuild("layer", region, plan.mem, executed, model, layer_weight_bytes(plan),
                       spec.kv_cache_width * prm.context * B * ELEM, anchor_of(red))


def dispatch_parts(spec: ModelSpec, hi: int, batch: int, buf: dict[str, int]) -> list[tuple[int, int]]:
    """Payload of a lane into an expert region: (elements, buffer) of the FFN input chunk, the
    residual-stream chunk and the batch's top-k gate values."""
    return [(hi * batch, buf["xn"]), (hi * batch, buf["h"]), (spec.moe.experts_per_token * batch, buf["gates"])]


# ---- expert regions (expert parallelism) --------------------------------------------------------


@dataclasses.dataclass
class ExpertPlan:
    """Routed experts first..last-1 of a MoE layer on an expert region of P columns and Q rows."""

    spec: ModelSpec
    layer: int
    experts: tuple[int, int]
    P: int
    params: DecodeParams
    mem: Allocator
    Hc: list[int]
    f_r: list[int]
    shapes: dict[str, GemvShape]
    buf: dict[str, int]
    Q: int = 0  # rows (0: P)

    def __post_init__(self) -> None:
        self.Q = self.Q or self.P

    @property
    def last(self) -> bool:
        """The layer's last expert region: it hands only the residual stream on."""
        return self.experts[1] == self.spec.moe.experts

    def local_experts(self) -> dict[int, int]:
        """Experts this region computes (index of its tile copy -> sequences using it)."""
        return chosen_experts(self.spec, self.layer, self.experts, self.params)


def chosen_experts(spec: ModelSpec, layer: int, experts: tuple[int, int], params: DecodeParams) -> dict[int, int]:
    """Of routed experts [first, last) of a MoE layer, those the batch chose this step
    (index from first -> sequences using it)."""
    e0, e1 = experts
    use = moe_experts(spec, layer, params.batch, params.expert_skew)
    return {e - e0: u for e, u in use.items() if e0 <= e < e1}


def plan_experts(spec: ModelSpec, layer: int, experts: tuple[int, int], P: int, cfg, params: DecodeParams,
                 Q: int | None = None) -> ExpertPlan:
    """Tiles of routed experts [first, last) of a MoE layer on a P x Q region, laid out as in the
    layer region (gate/up reduce X, down reduce Y), with the buffers of the dispatched payload
    (FitError if they do not fit)."""
    H, B, m = spec.hidden_size, params.batch, spec.moe
    e0, e1 = experts
    if not spec.is_moe_layer(layer) or not 0 <= e0 < e1 <= m.experts:
        raise WseError(f"{spec.name} layer {layer}: no routed experts {e0}..{e1 - 1}")
    Q = Q or P
    if P > H or Q < P:
        raise WseError(f"a {P}x{Q} expert region: at most {H} columns, at least as many rows as columns")
    Hc, f_r = split(H, P), split(m.expert_ffn_size, Q)
    mem = Allocator(0, cfg.sram_bytes - cfg.sram_reserved_bytes)
    # the payload buffers first, so their addresses do not depend on how many experts the
    # region holds (decode.region_key relies on it)
    buf = {"xn": mem.alloc("xn", max(Hc) * B * ELEM, "activations", G3),
           "h": mem.alloc("h", max(Hc) * B * ELEM, "activations", G3),
           "gates": mem.alloc("gates", m.experts_per_token * B * ELEM, "activations", G2),
           "gu": mem.alloc("gate_up", 2 * max(f_r) * B * ELEM, "activations", G2),
           "y": mem.alloc("y", max(Hc) * B * ELEM, "activations", G2)}
    longest = max(max(Hc), 2 * max(f_r)) * B
    buf["dot"] = mem.alloc("dot", longest * ELEM, "scratch", G1)
    buf["scal"] = mem.alloc("scalars", 16 * ELEM, "scratch", G1)
    buf["tmp"] = mem.alloc("tmp", longest * ELEM, "scratch", G0)
    shapes = {}
    for name, (mm, n, axis, ins, outs) in {"gate_up": (H, 2 * m.expert_ffn_size, X, Hc, [2 * f for f in f_r]),
                                           "down": (m.expert_ffn_size, H, Y, f_r, Hc)}.items():
        sh = GemvShape(mm, n, axis, ins, outs)
        sh.pitch = -(-max(outs) * ELEM // 8) * 8
        sh.weights = mem.alloc(f"w_{name}", sh.tile_bytes() * (e1 - e0), "weights", G0)
        shapes[name] = sh
    fit_check(mem, cfg, f"{spec.name} layer {layer} experts {e0}..{e1 - 1} on a {P}x{Q} region (batch {B})")
    return ExpertPlan(spec, layer, experts, P, params, mem, Hc, f_r, shapes, buf, Q)


def most_experts(spec: ModelSpec, layer: int, P: int, cfg, params: DecodeParams, Q: int | None = None) -> int:
    """The most routed experts of a MoE layer one P x Q expert region holds (0: not even one)."""
    lo, hi = 0, spec.moe.experts
    while lo < hi:  # the largest n whose tiles fit (fitting is monotone in n)
        n = (lo + hi + 1) // 2
        try:
            plan_experts(spec, layer, (0, n), P, cfg, params, Q)
            lo = n
        except FitError:
            hi = n - 1
    return lo


def decode_experts(plan: ExpertPlan, region: Region, builder: MeshBuilder, lanes: Lanes) -> RegionBuild:
    """An expert region's decode step: receive the dispatched payload (FFN input, residual
    stream, gate values) on its lanes, run the routed experts the batch chose among its own,
    add their gate-weighted outputs into the residual stream, hand off, and pass the payload on
    (only the residual stream after the layer's last expert region).

    An expert region none of the batch chose still receives, hands off and passes on: the
    mapping is static, the choice is per token.
    """
    spec, P, Q, B = plan.spec, plan.P, plan.Q, plan.params.batch
    Hc, f_r, b_ = plan.Hc, plan.f_r, plan.buf
    red = reducers(region, builder, plan.params)
    prog = RegionProgram(region, THREADS)
    prog.add_roles(X, [(i_chunk(Hc, i), red[X].role(i)) for i in range(P)])
    prog.add_roles(Y, [(i_chunk(f_r, j), red[Y].role(j)) for j in range(Q)])
    lanes.install(builder, prog)
    L_, (e0, e1) = plan.layer, plan.experts
    use = plan.local_experts()
    tag = {name: builder.tag(f"layer {L_} experts {e0}-{e1 - 1} {name}", L_, kind) for name, kind in (
        ("input", "transfer"), ("ffn", "ffn"), ("handoff", "barrier"), ("output", "transfer"))}
    h, yb = b_["h"], b_["y"]

    def body(xr, yr, sp):
        i, xrole = xr[0]
        jf, yrole = yr[0]
        hi = Hc[i]
        out: dict[int, list[Op]] = {0: []}
        m = _mark(out)
        _merge(out, lanes.receive_parts(sp, dispatch_parts(spec, hi, B, b_), Q))
        _retag(out, m, tag["input"])
        m = _mark(out)
        for e, users in use.items():
            _merge(out, ffn_ops(plan.shapes, f_r, Hc, red, b_, i, jf, xrole, yrole, e, users))
            out[0].append(compute(FMAC, hi * users, dst=h, src0=yb))  # gate-weighted sum into h
        _retag(out, m, tag["ffn"])
        m = _mark(out)
        _merge(out, handoff(red, xrole, yrole, b_["scal"], b_["tmp"]))
        _retag(out, m, tag["handoff"])
        m = _mark(out)
        parts = [(hi * B, h)] if plan.last else dispatch_parts(spec, hi, B, b_)
        _merge(out, lanes.send_parts(sp, parts))
        _retag(out, m, tag["output"])
        return out

    prog.add(body)
    prog.program_ids(builder)
    executed, model = experts_flops(plan)
    return RegionBuild("experts", region, plan.mem, executed, model, experts_weight_bytes(plan), 0, anchor_of(red))


def experts_weight_bytes(plan: ExpertPlan) -> int:
    return (plan.experts[1] - plan.experts[0]) * (plan.shapes["gate_up"].weight_bytes()
                                                  + plan.shapes["down"].weight_bytes())


def experts_flops(plan: ExpertPlan) -> tuple[dict[str, int], int]:
    """Analytic FLOPs of an expert region's decode step: (executed by component, model FLOPs)."""
    spec, P, Q, H = plan.spec, plan.P, plan.Q, plan.spec.hidden_size
    f = spec.moe.expert_ffn_size
    u = sum(plan.local_experts().values())
    model = {"ffn": u * (2 * H * 2 * f + 2 * f * H)}
    row, col = u * SILU_MUL_FLOPS * f, u * 2 * H  # SiLU . up on rows; gate-weighted sums down columns
    executed = {"ffn": model["ffn"] + P * row + Q * col,
                "allreduce": u * ((P - 1) * 2 * f + (Q - 1) * H) + handoff_flops(Region(0, 0, P, Q))}
    return executed, model["ffn"] + row + col


def i_chunk(chunks: list[int], i: int) -> int:
    """Index of the first position with the same chunk size (positions with equal sizes share ops)."""
    return chunks.index(chunks[i])


def moe_experts(spec: ModelSpec, layer: int, batch: int, skew: float = 0.0) -> dict[int, int]:
    """Experts computed in a MoE layer's decode step -> how many sequences use each.

    skew = 0 (default): uniform and deterministic, sequence b uses experts (b*k + layer + i)
    mod E, i < k, so a batch spreads over the experts evenly. skew = s > 0: expert popularity
    follows a Zipf law, the r-th most popular expert of the layer (a fixed per-layer order)
    drawing weight 1 / (r + 1)^s; each sequence picks k distinct experts by weighted sampling
    without replacement from a generator seeded by (layer, sequence), so runs are reproducible.
    Shared experts serve every sequence.
    """
    m = spec.moe
    assert m
    if skew < 0:
        raise WseError(f"--expert-skew {skew} must be at least 0")
    use: dict[int, int] = {}
    if skew == 0:
        for b in range(batch):
            for i in range(m.experts_per_token):
                e = (b * m.experts_per_token + layer + i) % m.experts
                use[e] = use.get(e, 0) + 1
    else:
        import numpy as np
        order = np.random.default_rng([layer, 7919]).permutation(m.experts)
        weight = np.empty(m.experts)
        weight[order] = 1.0 / np.arange(1, m.experts + 1) ** skew
        for b in range(batch):
            rng = np.random.default_rng([layer, b, 104729])
            for e in rng.choice(m.experts, size=m.experts_per_token, replace=False, p=weight / weight.sum()):
                use[int(e)] = use.get(int(e), 0) + 1
    for s in range(m.shared_experts):
        use[m.experts + s] = batch
    return dict(sorted(use.items()))


def layer_weight_bytes(plan: LayerPlan) -> int:
    spec, H = plan.spec, plan.spec.hidden_size
    S = plan.shapes
    if plan.mla:  # the absorbed GEMVs' shapes count their blocks only; plus the two latent norms
        n = sum(S[k].weight_bytes() for k in ("a", "qb", "uk", "uv", "o")) + 2 * H * ELEM
        n += (sum(plan.mla.qa_r) + sum(plan.mla.v_r)) * ELEM
    else:
        n = S["qkv"].weight_bytes() + S["o"].weight_bytes() + 2 * H * ELEM
    n += (S["qkv"].n if spec.qkv_bias else 0) * ELEM + (H if spec.o_bias else 0) * ELEM
    if plan.moe:
        m = spec.moe
        n += S["router"].weight_bytes() + (m.experts if m.router_bias else 0) * ELEM
        n += ((m.experts if plan.routed else 0) + m.shared_experts) * (S["gate_up"].weight_bytes()
                                                                        + S["down"].weight_bytes())
    else:
        n += S["gate_up"].weight_bytes() + S["down"].weight_bytes()
    return n


def layer_flops(plan: LayerPlan, parts: tuple[str, ...] = PARTS) -> tuple[dict[str, int], int]:
    """Analytic FLOPs of one layer's decode step (or its `parts`): (executed by component,
    model FLOPs).

    Executed FLOPs include the elementwise work every PE of a line repeats on its replicated
    chunk (column-layout vectors: the Q PEs of a column; row-layout vectors: the P PEs of a
    row) and the all-reduces' adds ("allreduce"); model FLOPs count each operation once.
    """
    spec, P, Q, prm = plan.spec, plan.P, plan.Q, plan.params
    B, T, H = prm.batch, prm.context, spec.hidden_size
    qkv_n = spec.q_size + 2 * spec.kv_size
    nx, ny = P - 1, Q - 1  # combining stages of an all-reduce along a row / a column
    model: dict[str, int] = {}
    col: dict[str, int] = {}  # elementwise work on column-layout vectors, repeated down each column
    row: dict[str, int] = {}  # ... on row-layout vectors, repeated along each row

    def add(d: dict[str, int], k: str, v: int) -> None:
        d[k] = d.get(k, 0) + v

    ar = 0
    for part in ("norm1", "norm2"):
        if part in parts:
            add(col, "norm", 4 * H * B)  # sum of squares (2), scale (1), weight (1)
            ar += Q * nx * B
    ml = spec.mla
    if "qkv" in parts and ml:
        width, heads = spec.kv_cache_width, spec.heads
        a_n = ml.q_lora_rank + width
        model["qkv"] = 2 * H * a_n * B + 2 * ml.q_lora_rank * spec.q_size * B \
            + 2 * heads * ml.qk_nope_head_dim * ml.kv_lora_rank * B
        add(row, "norm", 4 * (ml.q_lora_rank + ml.kv_lora_rank) * B)
        add(row, "rope", 3 * ml.qk_rope_head_dim * B)
        add(col, "rope", 3 * heads * ml.qk_rope_head_dim * B)
        ar += nx * a_n * B + P * ny * 2 * B + ny * spec.q_size * B + nx * heads * width * B
    elif "qkv" in parts:
        model["qkv"] = 2 * H * qkv_n * B
        add(row, "rope", 3 * (spec.q_size + spec.kv_size) * B)
        add(row, "bias", qkv_n * B if spec.qkv_bias else 0)
        ar += nx * qkv_n * B
    if "attention" in parts:
        # MLA: scores over the whole cached latent, values over its c_kv part, for every head
        q_len = spec.heads * spec.kv_cache_width if ml else spec.q_size
        o_len = spec.heads * ml.kv_lora_rank if ml else spec.attn_out_size
        model.update(scores=2 * q_len * T * B, softmax=SOFTMAX_FLOPS * spec.heads * T * B, values=2 * o_len * T * B)
        ar += 2 * ny * spec.heads * T * B + 2 * nx * spec.heads * B + nx * o_len * B
    if "o" in parts:
        model["o"] = 2 * spec.attn_out_size * H * B
        if ml:  # W_uv reduces along Y, then W_o along X
            model["o"] += 2 * spec.heads * ml.kv_lora_rank * ml.v_head_dim * B
            ar += ny * spec.attn_out_size * B + nx * H * B
        else:
            ar += ny * H * B
        add(col, "bias", H * B if spec.o_bias else 0)
        add(col, "residual", H * B)
    if "ffn" in parts:
        add(col, "residual", H * B)
        if plan.moe:
            m = spec.moe
            u = sum(plan.local_experts().values())
            f = m.expert_ffn_size
            model["ffn"] = 2 * H * m.experts * B + u * (2 * H * 2 * f + 2 * f * H)
            add(row, "ffn", (m.experts * B if m.router_bias else 0) + m.experts_per_token * m.experts * B
                + u * SILU_MUL_FLOPS * f)
            add(col, "ffn", u * 2 * H)  # the gate-weighted sums into the residual stream
            ar += nx * m.experts * B + P * ny * m.experts_per_token * B + u * (nx * 2 * f + ny * H)
        else:
            f = spec.ffn_size
            model["ffn"] = B * (2 * H * 2 * f + 2 * f * H)
            add(row, "ffn", B * SILU_MUL_FLOPS * f)
            ar += nx * 2 * f * B + ny * H * B
    if "handoff" in parts:
        ar += handoff_flops(Region(0, 0, P, Q))
    executed = dict(model)
    for reps, d in ((Q, col), (P, row)):
        for k, v in d.items():
            executed[k] = executed.get(k, 0) + reps * v
    executed["allreduce"] = ar
    return executed, sum(model.values()) + sum(col.values()) + sum(row.values())


# ---- embedding and LM head ----------------------------------------------------------------------


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
    """Embedding lookup: the column holding the token's row sends chunk d from row d (lane d)."""
    B = params.batch
    mem, Hr, buf = embedding_memory(spec, region.width, region.height, cfg, params)
    red = reducers(region, builder, params)
    prog = RegionProgram(region, THREADS)
    prog.add_roles(X, [(red[X].role(i),) for i in range(region.width)])
    prog.add_roles(Y, [(red[Y].role(j), Hr[j]) for j in range(region.height)])
    lanes.install(builder, prog)

    t_emb = builder.tag("embedding", -1, "embedding")

    def body(xr, yr, sp):
        out = handoff(red, xr[0][0], yr[0][0], buf["scal"], buf["tmp"])
        return tagged(_merge(out, lanes.send(sp, yr[0][1] * B, buf["out"])), t_emb)

    prog.add(body)
    prog.program_ids(builder)
    return RegionBuild("embedding", region, mem, {"allreduce": handoff_flops(region)}, 0,
                       spec.embedding_params() * ELEM, 0, anchor_of(red))


def token_column(spec: ModelSpec, width: int, token: int) -> int:
    """Column of the embedding region whose vocab slice holds `token`."""
    if not 0 <= token < spec.vocab_size:
        raise WseError(f"--token {token} is outside the vocabulary [0, {spec.vocab_size})")
    bounds = [0]
    for v in split(spec.vocab_size, width):
        bounds.append(bounds[-1] + v)
    return max(c for c in range(width) if bounds[c] <= token)


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
           "dot": mem.alloc("dot", max(max(Hr), max(Vc)) * B * ELEM, "scratch", G1),
           "scal": mem.alloc("scalars", 16 * B * ELEM, "scratch", G1),
           "tmp": mem.alloc("tmp", max(Vc) * B * ELEM, "scratch", G0)}
    fit_check(mem, cfg, f"{spec.name} LM head on a {width}x{height} region")
    return mem, shape, Hr, Vc, buf


def lm_head(spec: ModelSpec, region: Region, builder: MeshBuilder, cfg, params: DecodeParams,
            lanes: Lanes) -> RegionBuild:
    """Final RMSNorm, logits (a GEMV reducing along Y, vocab over columns) and the argmax.

    Lane d arrives on row d and is spread along the row; the argmax ends with a row all-reduce
    of each sequence's maximum.
    """
    B, H, V = params.batch, spec.hidden_size, spec.vocab_size
    W_, H_ = region.width, region.height
    mem, shape, Hr, Vc, buf = lm_memory(spec, W_, H_, cfg, params)
    g, h, xn, logits, dot, scal, tmp = (buf[k] for k in ("g", "h", "xn", "logits", "dot", "scal", "tmp"))
    red = reducers(region, builder, params)
    rx, ry = red[X], red[Y]
    prog = RegionProgram(region, THREADS)
    prog.add_roles(X, [(i_chunk(Vc, i), rx.role(i)) for i in range(W_)])
    prog.add_roles(Y, [(i_chunk(Hr, j), ry.role(j)) for j in range(H_)])
    lanes.install(builder, prog)
    hs = max(Hr) * ELEM

    t_head = builder.tag("lm_head", -1, "lm_head")

    def body(xr, yr, sp):
        return tagged(head_body(xr, yr, sp), t_head)

    def head_body(xr, yr, sp):
        i, xrole = xr[0]
        j, yrole = yr[0]
        hj, vi = Hr[j], Vc[i]
        out = lanes.receive(sp, hj * B, h, W_)
        _merge(out, {0: [compute(FMAC, hj, dst=dot, src0=h + b * hs) for b in range(B)]})
        _merge(out, ry.role_ops(yrole, B, scal, tmp))
        out[0].append(compute(SCALE, hj * B, dst=xn, src0=h))
        out[0] += [compute(MUL, hj, dst=xn + b * hs, src0=xn + b * hs, src1=g) for b in range(B)]
        out[0] += gemv_ops(shape, j, i, xn, logits, B, hs, max(Vc) * ELEM)
        _merge(out, ry.role_ops(yrole, vi * B, logits, tmp))
        out[0].append(compute(MAX, vi * B, dst=logits, src0=logits, src1=dot))
        return _merge(out, rx.role_ops(xrole, B, scal, tmp, MAX))

    prog.add(body)
    prog.program_ids(builder)
    # the norm is repeated by every PE of a row, the argmax by every PE of a column
    flops = {"norm": W_ * 4 * H * B, "lm_head": 2 * H * V * B, "argmax": H_ * V * B,
             "allreduce": W_ * (H_ - 1) * B + (H_ - 1) * V * B + H_ * (W_ - 1) * B}
    weights = (spec.lm_head_params() or spec.embedding_params()) * ELEM + H * ELEM
    return RegionBuild("lm_head", region, mem, flops, 4 * H * B + 2 * H * V * B + V * B, weights, 0,
                       anchor_of(red))
