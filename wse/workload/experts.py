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
from ..trace import Op, compute
from .ffn import chosen_experts, ffn_ops
from .gemv import ELEM, GemvShape
from .mesh import X, Y, Allocator, MeshBuilder, Region, RegionProgram, split
from .models import ModelSpec
from .params import DecodeParams
from .plan import FitError, fit_check
from .region import (FMAC, G0, G1, G2, G3, SILU_MUL_FLOPS, THREADS, Lanes, RegionBuild, anchor_of, handoff,
                     handoff_flops, i_chunk, mark, merge, reducers, retag)


def dispatch_parts(spec: ModelSpec, hi: int, batch: int, buf: dict[str, int]) -> list[tuple[int, int]]:
    """Payload of a lane into an expert region: (elements, buffer) of the FFN input chunk, the
    residual-stream chunk and the batch's top-k gate values."""
    return [(hi * batch, buf["xn"]), (hi * batch, buf["h"]), (spec.moe.experts_per_token * batch, buf["gates"])]



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
        m = mark(out)
        merge(out, lanes.receive_parts(sp, dispatch_parts(spec, hi, B, b_), Q))
        retag(out, m, tag["input"])
        m = mark(out)
        for e, users in use.items():
            merge(out, ffn_ops(plan.shapes, f_r, Hc, red, b_, i, jf, xrole, yrole, e, users))
            out[0].append(compute(FMAC, hi * users, dst=h, src0=yb))  # gate-weighted sum into h
        retag(out, m, tag["ffn"])
        m = mark(out)
        merge(out, handoff(red, xrole, yrole, b_["scal"], b_["tmp"]))
        retag(out, m, tag["handoff"])
        m = mark(out)
        parts = [(hi * B, h)] if plan.last else dispatch_parts(spec, hi, B, b_)
        merge(out, lanes.send_parts(sp, parts))
        retag(out, m, tag["output"])
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
