"""Expert regions (expert parallelism): routed experts of a MoE layer in slots of their own
after the layer's region (docs/workloads.md, "Expert regions").

An expert region holds the tiles of experts [e0, e1) in the layer region's layout (gate/up
reducing along X, down along Y), receives the dispatch payload on its lanes, runs the experts
the batch chose among its own, adds their gate-weighted outputs into the residual stream, hands
off, and passes the payload on.
"""
from __future__ import annotations

import dataclasses

from ..errors import WseError
from ..hardware import WaferConfig
from ..trace import Op, compute, recv, recv_compute_send, send, signal, wait, fill
from .collectives import LineBroadcast
from .dispatch import ExpertRole
from .ffn import chosen_experts, expert_sequences, ffn_parts, moe_choices
from .gemv import ELEM, GemvShape, alloc_scales, choose_form, tile_form
from .mesh import X, Y, Allocator, MeshBuilder, Region, RegionProgram, split
from .models import ModelSpec
from .params import DecodeParams
from .precision import weights_of
from .plan import FitError, fit_check, usable_sram
from .plan import DIAG_BCAST
from .region import (ADD, FMAC, G0, G1, G2, G3, MOV, SILU_MUL_FLOPS, THREADS, ZERO_BYTES, Ops, PartCache,
                     RegionBuild, anchor_of, handoff, handoff_flops, i_chunk, reducers)

SEM_COMBINE = 1  # an expert region's collector: the combine has arrived


def dispatch_parts(spec: ModelSpec, hi: int, batch: int, buf: dict[str, int], d0: int, c0: int
                   ) -> list[tuple[int, int, int]]:
    """What a layer region's lane PE sends to its expert regions, (elements, buffer, color): the
    dispatch (FFN input chunk, then the batch's gate values) on d0, then the combine's start (the
    residual-stream chunk, shared experts already added) on c0."""
    return [(hi * batch, buf["xn"], d0), (spec.moe.experts_per_token * batch, buf["gates"], d0),
            (hi * batch, buf["h"], c0)]


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
    cfg: WaferConfig | None = None  # the wafer (the auto all-reduce's latencies, region.reducers)

    def __post_init__(self) -> None:
        self.Q = self.Q or self.P

    @property
    def last(self) -> bool:
        """The layer's last expert region: it hands only the residual stream on."""
        return self.experts[1] == self.spec.moe.experts

    def local_experts(self) -> dict[int, int]:
        """Experts this region computes (index of its tile copy -> sequences using it)."""
        return chosen_experts(self.spec, self.layer, self.experts, self.params)


def plan_experts(spec: ModelSpec, layer: int, experts: tuple[int, int], P: int, cfg, params: DecodeParams,
                 Q: int | None = None) -> ExpertPlan:
    """Tiles of routed experts [first, last) of a MoE layer on a P x Q region, laid out as in the
    layer region (gate/up reduce X, down reduce Y), with the buffers of the dispatch and the
    combine (FitError if they do not fit)."""
    H, B, m = spec.hidden_size, params.batch, spec.moe
    e0, e1 = experts
    if not spec.is_moe_layer(layer) or not 0 <= e0 < e1 <= m.experts:
        raise WseError(f"{spec.name} layer {layer}: no routed experts {e0}..{e1 - 1}")
    Q = Q or P
    if P > H or Q < P:
        raise WseError(f"a {P}x{Q} expert region: at most {H} columns, at least as many rows as columns")
    Hc, f_r = split(H, P), split(m.expert_ffn_size, Q)
    mem = Allocator(0, cfg.sram_bytes - cfg.sram_reserved_bytes)
    # activations first, so their addresses do not depend on how many experts the region holds
    # (decode.region_key relies on it); the dispatch payload is the FFN input then the gates
    hb = max(Hc) * B * ELEM
    payload = mem.alloc("payload", hb + m.experts_per_token * B * ELEM, "activations", G3)
    buf = {"xn": payload,  # (a column's gates follow its own chunks: decode_experts)
           "acc": mem.alloc("acc", hb, "activations", G3),
           "hin": mem.alloc("h_in", hb, "activations", G1),
           "h": mem.alloc("h", hb, "activations", G2),
           "zeros": mem.alloc("zeros", ZERO_BYTES, "constants", G0),
           "gu": mem.alloc("gate_up", 2 * max(f_r) * B * ELEM, "activations", G2),
           "y": mem.alloc("y", hb, "activations", G2)}
    longest = max(max(Hc), 2 * max(f_r)) * B
    buf["dot"] = mem.alloc("dot", longest * ELEM, "scratch", G1)
    buf["scal"] = mem.alloc("scalars", 16 * ELEM, "scratch", G1)
    buf["tmp"] = mem.alloc("tmp", longest * ELEM, "scratch", G0)
    shapes = {name: GemvShape(mm, n, axis, ins, outs, precision=weights_of(spec, params.weights)[1])
              for name, (mm, n, axis, ins, outs) in {
                  "gate_up": (H, 2 * m.expert_ffn_size, X, Hc, [2 * f for f in f_r]),
                  "down": (m.expert_ffn_size, H, Y, f_r, Hc)}.items()}
    for name, sh in shapes.items():  # (by input under gemv_form "axpy": expert regions as they were built)
        choose_form(sh, "axpy" if params.gemv_form == "axpy" else tile_form(params, name, sh.precision), cfg)
        sh.set_pitch()
    dequant = max(sh.scratch_bytes() for sh in shapes.values())
    if dequant:  # (a scratch the size of the tiles', not of their number: below the weights too)
        buf["dequant"] = mem.alloc("dequant", dequant, "scratch", G0)
    for name, sh in shapes.items():
        sh.scratch = buf.get("dequant", 0)
        sh.weights = mem.alloc(f"w_{name}", sh.tile_bytes() * (e1 - e0), "weights", G0)
    if m.expert_bias:  # each expert's gate/up and down biases, a copy per PE's chunk
        buf["b_gu"] = mem.alloc("b_gate_up", (e1 - e0) * 2 * max(f_r) * ELEM, "weights", G0)
        buf["b_dn"] = mem.alloc("b_down", (e1 - e0) * max(Hc) * ELEM, "weights", G0)
    if dequant:
        alloc_scales(mem, shapes, {k: e1 - e0 for k in shapes})
    fit_check(mem, cfg, f"{spec.name} layer {layer} experts {e0}..{e1 - 1} on a {P}x{Q} region (batch {B})")
    return ExpertPlan(spec, layer, experts, P, params, mem, Hc, f_r, shapes, buf, Q, cfg)


def most_experts(spec: ModelSpec, layer: int, P: int, cfg, params: DecodeParams, Q: int | None = None) -> int:
    """The most routed experts of a MoE layer one P x Q expert region holds (0: not even one).

    Remembered per region (every MoE layer's experts have the same shapes): placement searches
    ask for the same regions many times."""
    if not spec.is_moe_layer(layer):
        return _most_experts(spec, layer, P, cfg, params, Q)  # (raises the error)
    key = (spec, P, cfg.key(), params, Q)
    if key not in _MOST:
        if len(_MOST) > 65536:
            _MOST.clear()
        _MOST[key] = _most_experts(spec, layer, P, cfg, params, Q)
    return _MOST[key]


_MOST: dict[tuple, int] = {}


def _most_experts(spec: ModelSpec, layer: int, P: int, cfg, params: DecodeParams, Q: int | None) -> int:
    """The largest n whose tiles fit (fitting is monotone in n): a binary search, its bounds first
    narrowed by the guess two experts' SRAM use gives (usually right: four plans, not nine)."""

    def top(n: int) -> int | None:
        try:
            return plan_experts(spec, layer, (0, n), P, cfg, params, Q).mem.top
        except FitError:
            return None

    lo, hi = 0, spec.moe.experts
    one = top(1)
    if one is None:
        return 0
    lo = 1
    two = top(2) if hi >= 2 else None
    if two is None:
        return 1
    lo = 2
    guess = min(hi, max(2, 2 + (usable_sram(cfg) - two) // max(1, two - one)))
    for n in (guess, guess + 1):  # the guess, then one more
        if lo < n <= hi:
            if top(n) is None:
                hi = n - 1
                break
            lo = n
    while lo < hi:
        n = (lo + hi + 1) // 2
        if top(n) is None:
            hi = n - 1
        else:
            lo = n
    return lo


def decode_experts(plan: ExpertPlan, region: Region, builder: MeshBuilder, role: ExpertRole,
                   name: str | None = None) -> RegionBuild:
    """An expert region's decode step in its layer's parallel dispatch (dispatch.py).

    Every lane PE (the diagonal) takes its copy of the dispatch payload (FFN input chunk and gate
    values) as it passes, resending it on another color where a turn needs one (`role.d_out`).
    A region the batch chose spreads the payload down its columns and runs its chosen experts,
    each over the sequences routed to it; its lane PEs accumulate their gate-weighted outputs
    and then forward the combine adding them. A region none of the batch chose only relays the
    combine (a receive-and-send from the start, no other work). The layer's last region on the
    wafer receives the combine and adds its own experts' outputs; the collector then hands off
    (its barrier is the composition's anchor) and sends the layer's output on `role.t_out`.
    Tags are named after `name` (default: the layer and its experts).
    """
    spec, P, Q, B = plan.spec, plan.P, plan.Q, plan.params.batch
    Hc, f_r, b_ = plan.Hc, plan.f_r, plan.buf
    k = spec.moe.experts_per_token
    red = reducers(region, builder, plan.params, plan.spec, plan.cfg)
    prog = RegionProgram(region, THREADS)
    prog.add_roles(X, [(i_chunk(Hc, i), red[X].role(i)) for i in range(P)])
    prog.add_roles(Y, [(i_chunk(f_r, j), red[Y].role(j)) for j in range(Q)])
    for d in range(P):
        prog.mark(d, d, "lane", d)
    use = plan.local_experts()
    L_, (e0, e1) = plan.layer, plan.experts
    seqs_of = {e - e0: seqs for e, seqs in expert_sequences(spec, L_, B, plan.params.expert_skew).items()
               if e0 <= e < e1}  # (use's experts, with the sequences that chose each)
    choices = moe_choices(spec, L_, B, plan.params.expert_skew)
    if use and Q > 1:  # the payload spread down each column from its lane PE
        bc = LineBroadcast(Q, DIAG_BCAST)
        for d in range(P):
            builder.line_routes(region, Y, DIAG_BCAST, bc.routes_for_root(d), lines=[d])
    name = name or f"layer {L_} experts {e0}-{e1 - 1}"
    tag = {part: builder.tag(f"{name} {part}", L_, kind) for part, kind in (
        ("input", "transfer"), ("ffn", "ffn"), ("combine", "transfer"), ("handoff", "barrier"),
        ("output", "transfer"))}
    pay, acc, yb = b_["xn"], b_["acc"], b_["y"]

    part = PartCache(tag).add  # (a lane PE's programs differ from its column's only in being a lane)

    def body(xr, yr, sp):
        i, xrole = xr[0]
        jf, yrole = yr[0]
        hi = Hc[i]
        hs, lane = hi * ELEM, "lane" in sp
        md, mc = (hi + k) * B, hi * B
        gates = pay + mc * ELEM  # the payload: the FFN input chunk per sequence, then the gates
        out: dict[int, list[Op]] = {0: []}

        def payload() -> Ops:
            ops: list[Op] = []
            if lane:
                ops.append(recv(role.d_in, md, pay))
                if role.d_out is not None:  # a turn: resend the stored payload on the other color
                    ops.append(send(role.d_out, md, pay))
                if use and Q > 1:
                    ops.append(send(DIAG_BCAST, md, pay))
            elif use and Q > 1:
                ops.append(recv(DIAG_BCAST, md, pay))
            return {0: ops}
        part(out, "input", (lane, hi), payload)
        if use:  # each chosen expert over the sequences that chose it, a step at a time
            if lane:
                part(out, "ffn", ("zero", hi), lambda: {0: [fill(mc, acc, b_["zeros"])]})
            for c, seqs in seqs_of.items():
                for key, make in ffn_parts(plan.shapes, f_r, Hc, red, b_, i, jf, xrole, yrole, c, len(seqs), seqs=seqs):
                    part(out, "ffn", key, make)
                if lane:  # its gate-weighted outputs into each sequence's sum
                    part(out, "ffn", ("gates", hi, c, tuple(seqs)), lambda c=c, seqs=seqs: {0: [
                        compute(FMAC, hi, dst=acc + b * hs, src0=yb + n * hs,
                                src1=gates + (b * k + choices[b].index(e0 + c)) * ELEM) for n, b in enumerate(seqs)]})
        if not role.last:
            if lane:
                if use:
                    part(out, "combine", hi, lambda: {0: [recv_compute_send(role.c_in, role.c_out, ADD, mc, src0=acc)]})
                else:  # a relay from the start: the combine never waits here
                    part(out, "combine", hi, lambda: {2: [recv_compute_send(role.c_in, role.c_out, MOV, mc)]})
            return out
        h = b_["h"] if use else b_["hin"]
        if lane:
            def combine() -> Ops:
                comb = {2: [recv(role.c_in, mc, b_["hin"]), signal(SEM_COMBINE)], 0: [wait(SEM_COMBINE)]}
                if use:
                    comb[0].append(compute(ADD, mc, dst=h, src0=b_["hin"], src1=acc))
                return comb
            part(out, "combine", hi, combine)
        if role.barrier:
            part(out, "handoff", (xrole, yrole), lambda: handoff(red, xrole, yrole, b_["scal"], b_["tmp"]))
        if lane and role.t_out is not None:
            part(out, "output", hi, lambda: {0: [send(role.t_out, mc, h)]})
        return out

    prog.add(body)
    prog.program_ids(builder)
    executed, model = experts_flops(plan, role.collector)
    return RegionBuild("experts", region, plan.mem, executed, model, experts_weight_bytes(plan), 0, anchor_of(red))


def decode_relays(region: Region, builder: MeshBuilder, Hc: list[int], batch: int, c_in: int, c_out: int,
                  name: str, d_in: int, dispatch_extra: int, pay: int) -> None:
    """A relay stand-in of a compressed stage (compose.py): one PE per lane taking its copy of
    the dispatch ((hi + dispatch_extra) x batch elements on d_in, into `pay`) and forwarding
    the combine exactly as the lane PE of an expert region none of the batch chose does (the
    copy shares the PE's ramp with the combine passing through)."""
    vertical = region.width == 1
    t_in, t_comb = builder.tag(f"{name} input", -1, "transfer"), builder.tag(f"{name} combine", -1, "transfer")
    builder.ensure_threads(3)
    for d, hi in enumerate(Hc):
        x, y = (region.x0, region.y0 + d) if vertical else (region.x0 + d, region.y0)
        builder.pe_program[y, x, 0] = builder.program([recv(d_in, (hi + dispatch_extra) * batch, pay)
                                                       ._replace(tag=t_in)])
        builder.pe_program[y, x, 2] = builder.program([recv_compute_send(c_in, c_out, MOV, hi * batch)
                                                       ._replace(tag=t_comb)])


def experts_weight_bytes(plan: ExpertPlan) -> int:
    m = plan.spec.moe
    bias = (2 * m.expert_ffn_size + plan.spec.hidden_size) * ELEM if m.expert_bias else 0
    return (plan.experts[1] - plan.experts[0]) * (plan.shapes["gate_up"].weight_bytes()
                                                  + plan.shapes["down"].weight_bytes() + bias)


def experts_flops(plan: ExpertPlan, collector: bool = False) -> tuple[dict[str, int], int]:
    """Analytic FLOPs of an expert region's decode step: (executed by component, model FLOPs)."""
    spec, P, Q, H, B = plan.spec, plan.P, plan.Q, plan.spec.hidden_size, plan.params.batch
    f = spec.moe.expert_ffn_size
    u = sum(plan.local_experts().values())
    model = {"ffn": u * (2 * H * 2 * f + 2 * f * H)}
    row, col = u * SILU_MUL_FLOPS * f, u * 2 * H  # SiLU . up on rows; gate-weighted sums at the lane PEs
    bias_r, bias_c = (u * 2 * f, u * H) if spec.moe.expert_bias else (0, 0)  # on every PE of a row / column
    combine = H * B if u else 0  # the chosen region's outputs added into the combine
    n = len(plan.local_experts())  # each chosen expert's tiles dequantized once
    executed = {"ffn": model["ffn"] + P * (row + bias_r) + Q * bias_c + col, "combine": combine,
                "dequant": n * sum(plan.shapes[k].dequant_flops() for k in ("gate_up", "down")),
                "allreduce": u * ((P - 1) * 2 * f + (Q - 1) * H) + (handoff_flops(Region(0, 0, P, Q)) if collector
                                                                     else 0)}
    return executed, model["ffn"] + row + col + combine + bias_r + bias_c
