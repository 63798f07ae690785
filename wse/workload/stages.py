"""Traces of a wafer's decode step: the full trace, and the small stage traces it composes from
(compose.py).

- A0: the first region alone;
- B_u: region u running only its hand-off barrier;
- S_u: region u's barrier and lane sends into the next anchored region's whole program;
- G_u: a MoE layer region's barrier and its dispatch and combine sends (or a stand-in's, for a
  wafer's leading part, its combine `delta` cycles after its dispatch) into its expert regions,
  compressed (chain.compressed), up to the collector's anchor or the wafer's boundary.
"""
from __future__ import annotations

import dataclasses

from ..trace import Trace, compute
from .chain import Chain, Element, chain_of, compressed, key_A0, key_B, key_G, key_S
from .decode import ModelPlan, ffn_plan, handoff_plan, layer_plan
from .dispatch import ExpertRole, Group, add_group_routes
from .experts import decode_experts, decode_relays, dispatch_parts, plan_experts
from .layer import decode_layer, fused_handoff_ops
from .gemv import ELEM
from .mesh import ALIGN_BYTES, X, Y, MeshBuilder, Region, RegionProgram, split
from .placement import Slot, add_lane_routes, lane_sources, lane_targets
from .plan import COMBINE, DIAG_BCAST, ROW_BCAST
from .region import FP16, MOV, THREADS, Lanes, RegionBuild, handoff, merge, reducers
from .models import model_meta
from .tables import embedding, lm_head

SEND_FROM = 128  # SRAM address the lane sends of a stage trace read (the barrier uses 0 and 64)


@dataclasses.dataclass
class StageTrace:
    key: tuple
    trace: Trace
    anchor: tuple[int, int] | None  # mesh (x, y) whose finish_cycle marks the anchor of interest


def build_region(plan: ModelPlan, slot: Slot, region: Region, builder: MeshBuilder, lanes: Lanes,
                 role: ExpertRole | None = None, name: str | None = None) -> RegionBuild:
    if slot.kind == "embedding":
        return embedding(plan.spec, region, builder, plan.cfg, plan.params, lanes, slot.strip)
    if slot.kind == "lm_head":
        return lm_head(plan.spec, region, builder, plan.cfg, plan.params, lanes, slot.strip)
    if slot.kind == "experts":
        ep = plan_experts(plan.spec, slot.index, slot.experts, plan.P, plan.cfg, plan.params, plan.Q)
        return decode_experts(ep, region, builder, role, name)
    if slot.kind == "ffn":
        return decode_layer(ffn_plan(plan, slot.index), region, builder, lanes)
    return decode_layer(layer_plan(plan, slot.index), region, builder, lanes)


def _lanes_between(plan: ModelPlan, a: Slot, b: Slot) -> tuple[dict, dict]:
    src = lane_sources(a, plan.P, plan.token_col)
    return src, lane_targets(a, b, src, plan.P)


def _spread(slot: Slot) -> tuple:
    return (X, ROW_BCAST) if slot.kind == "lm_head" else (Y, DIAG_BCAST)


def _shift(r: Region, ox: int, oy: int) -> Region:
    return Region(r.x0 - ox, r.y0 - oy, r.width, r.height)


def _moved(slot: Slot, ox: int, oy: int) -> Slot:
    return dataclasses.replace(slot, region=_shift(slot.region, ox, oy))


def standin_buffers(plan: ModelPlan) -> dict[str, int]:
    """Where a stand-in's lane PEs keep what they send (the FFN input chunk per sequence, the
    gates, the combine's start: each back to back per sequence), from SEND_FROM; a batch too large
    for the room below the delay ops' area shares one buffer (values then do not matter: a
    functional check refuses it, step_tensors.step_gap)."""
    B, k = plan.params.batch, plan.spec.moe.experts_per_token
    n = max(split(plan.spec.hidden_size, plan.P)) * B * ELEM
    gates = SEND_FROM + -(-n // ALIGN_BYTES) * ALIGN_BYTES
    h = gates + -(-k * B * ELEM // ALIGN_BYTES) * ALIGN_BYTES
    if h + n > DELAY_AT:
        return {"xn": SEND_FROM, "gates": SEND_FROM, "h": SEND_FROM}
    return {"xn": SEND_FROM, "gates": gates, "h": h}


def _group_sends(plan: ModelPlan, d0: int):
    """What a layer region (or stand-in) sends its expert regions, per lane chunk: the dispatch
    and then the combine's start."""
    B = plan.params.batch
    buf = standin_buffers(plan)
    return lambda hi: dispatch_parts(plan.spec, hi, B, buf, d0, COMBINE[0])


DELAY_STEPS = 1024  # the longest delay op of a stand-in (its elements fit the SRAM twice)
DELAY_AT = 8192  # where a stand-in's delay ops write (and read 2 * DELAY_STEPS * width bytes above)


def standin_delta(plan: ModelPlan, delta: int | None) -> int:
    """The combine's start after the dispatch's at a stand-in's lane PEs: `delta` cycles, but no
    sooner than every lane has handed in its dispatch and can wait once (None: that soonest)."""
    k, B = plan.spec.moe.experts_per_token, plan.params.batch
    soonest = 2 * plan.cfg.fabric_setup_cycles + (max(split(plan.spec.hidden_size, plan.P)) + k) * B \
        + plan.cfg.vector_setup_cycles + 1
    return soonest if delta is None else max(delta, soonest)


def delay_ops(plan: ModelPlan, hi: int, delta: int) -> list:
    """Vector ops after a stand-in lane's dispatch sends (chunk hi) that start its combine send
    exactly `delta` cycles after its first dispatch send starts: each op takes its setup plus one
    cycle per step of `width` elements."""
    cfg, k, B = plan.cfg, plan.spec.moe.experts_per_token, plan.params.batch
    rest = delta - 2 * cfg.fabric_setup_cycles - (hi + k) * B
    S = cfg.vector_setup_cycles
    width = min(cfg.simd_width(MOV, FP16), cfg.sram_port_bytes // 2)
    n = -(-rest // (S + DELAY_STEPS))
    base, extra = divmod(rest, n)
    steps = [base + (i < extra) - S for i in range(n)]
    assert all(1 <= t <= DELAY_STEPS for t in steps), (rest, steps)
    return [compute(MOV, t * width, dst=DELAY_AT, src0=DELAY_AT + 2 * DELAY_STEPS * width) for t in steps]


def _sender(plan: ModelPlan, b: MeshBuilder, slot: Slot, color: int, src: dict, parts, delta=None) -> tuple[int, int]:
    """Region `slot` running only its hand-off barrier and then its lane sends (parts(hi) ->
    (elements, buffer[, color]) parts); returns its anchor (mesh x, y). delta: a stand-in, its
    last part (the combine) sent `delta` cycles after its first (delay_ops)."""
    ra = slot.region
    red, prog, hand = _handoff_region(plan, b, ra, slot if delta is None else None)
    lanes = Lanes(None, {}, color, src)
    lanes.install(b, prog)
    chunks = split(plan.spec.hidden_size, plan.P)
    t_hand = b.tag("handoff", -1, "barrier")

    def body(xr, yr, sp):
        out = hand(xr, yr)
        if "out" in sp:
            hi = chunks[sp["out"]]
            sends = lanes.send_parts(sp, parts(hi))[0]
            if delta is not None:
                sends[-1:-1] = delay_ops(plan, hi, delta)
            merge(out, {0: sends})
        return {t: [op._replace(tag=t_hand) for op in ops] for t, ops in out.items()}

    prog.add(body)
    prog.program_ids(b)
    return ra.x0 + red[X].final_root, ra.y0 + red[Y].final_root


# ---- the full trace ----------------------------------------------------------------------------


def full_trace(plan: ModelPlan, delta: int | None = None, record=None) -> tuple[Trace, list[RegionBuild]]:
    """One trace holding every region and lane of the decode step. A wafer that begins with a
    leading part gets its stand-in too, west of its first slot (the mesh one slot wider), sending
    the combine `delta` cycles after the dispatch (standin_delta). record(builder, slots):
    called before the trace is built (step_tensors records the step's /tensors)."""
    ch = chain_of(plan)
    ox = ch.standin.region.x0 if ch.standin else 0
    slots = [_moved(s, ox, 0) for s in plan.slots]
    b = MeshBuilder(plan.width - ox, plan.height, 4, **model_meta(plan.spec), phase="decode", P=plan.P,
                    batch=plan.params.batch, context=plan.params.context, layers=plan.n_layers)
    builds = []
    prev = {v: u for u, v in zip(ch.anchored, ch.anchored[1:])}
    for s, slot in enumerate(slots):
        if slot.kind == "experts":
            builds.append(build_region(plan, slot, slot.region, b, Lanes(None, {}, None, {}), ch.roles[s]))
            continue
        c_in, ins = None, {}
        if s in prev:
            c_in, ins = ch.colors[prev[s]], _lanes_between(plan, slots[s - 1], slot)[1]
        c_out, outs = None, {}
        if ch.next_anchored(s) is not None or ch.group_led_by(s):
            c_out, outs = ch.colors[s], lane_sources(slot, plan.P, plan.token_col)
        builds.append(build_region(plan, slot, slot.region, b, Lanes(c_in, ins, c_out, outs, *_spread(slot))))
    for g in ch.groups:
        lead = _moved(ch.lead_slot(plan, g), ox, 0)
        if g.lead is None:
            _sender(plan, b, lead, ch.colors[-1], lane_sources(lead, plan.P, 0), _group_sends(plan, ch.colors[-1]),
                    standin_delta(plan, delta))
        chain = [lead] + [slots[e] for e in g.experts]
        add_group_routes(b, chain, list(range(len(chain))), {k: ch.roles[e] for k, e in enumerate(g.experts, 1)},
                         ch.colors[g.lead if g.lead is not None else -1], plan.P)
    for u, v in zip(ch.anchored, ch.anchored[1:]):
        if not ch.group_led_by(u):
            add_lane_routes(b, slots[u], slots[v], *_lanes_between(plan, slots[u], slots[v]), ch.colors[u])
    if record is not None:
        record(b, slots)
    return b.build(), builds


# ---- stages --------------------------------------------------------------------------------------


def _sub(slots: list[Slot]) -> tuple[int, int, int, int]:
    x0 = min(s.region.x0 for s in slots)
    y0 = min(s.region.y0 for s in slots)
    x1 = max(s.region.x0 + s.region.width for s in slots)
    y1 = max(s.region.y0 + s.region.height for s in slots)
    return x0, y0, x1 - x0, y1 - y0


def stage_A0(plan: ModelPlan) -> StageTrace:
    """Region 0 alone, its lane sends omitted."""
    s = plan.slots[0]
    ox, oy, w, h = _sub([s])
    b = MeshBuilder(w, h, 4, stage="A0")
    rb = build_region(plan, s, _shift(s.region, ox, oy), b, Lanes(None, {}, None, {}))
    ax, ay = rb.anchor
    return StageTrace(key_A0(plan), b.build(), (rb.region.x0 + ax, rb.region.y0 + ay))


def _handoff_region(plan: ModelPlan, b: MeshBuilder, region: Region, slot: Slot | None):
    """The reducers and program of `region` running only the hand-off of the slot's region
    (None: a stand-in's), and the hand-off's ops of a PE by its roles: the barrier (at scratch
    addresses), or a fused region's FFN end at the layer's own buffers
    (layer.fused_handoff_ops). Returns (reducers, program, ops(xr, yr))."""
    red = reducers(region, b, plan.params, plan.spec, plan.cfg)
    lp = handoff_plan(plan, slot)
    prog = RegionProgram(region, lp.threads if lp else THREADS)
    prog.add_roles(X, [(red[X].role(i), i) for i in range(region.width)])
    prog.add_roles(Y, [(red[Y].role(j),) for j in range(region.height)])
    if lp is None:
        return red, prog, lambda xr, yr: handoff(red, xr[0][0], yr[0][0], 0, 64)
    return red, prog, lambda xr, yr: fused_handoff_ops(lp, red, xr[0][1], xr[0][0], yr[0][0])


def stage_B(plan: ModelPlan, u: int | None) -> StageTrace:
    """Region u (None: a stand-in) running only its hand-off."""
    slot = plan.slots[u] if u is not None else None
    w0, h0 = (slot.region.width, slot.region.height) if slot is not None else (plan.P, plan.Q)
    b = MeshBuilder(w0, h0, 4, stage="B")
    red, prog, hand = _handoff_region(plan, b, Region(0, 0, w0, h0), slot)
    prog.add(lambda xr, yr, sp: hand(xr, yr))
    prog.program_ids(b)
    return StageTrace(key_B(plan, u), b.build(), (red[X].final_root, red[Y].final_root))


def stage_S(plan: ModelPlan, u: int, v: int | None = None) -> StageTrace:
    """Region u's barrier and lane sends into region v's whole program (no onward sends)."""
    ch = chain_of(plan)
    v = ch.next_anchored(u) if v is None else v
    a, nxt = plan.slots[u], plan.slots[v]
    ox, oy, w, h = _sub([a, nxt])
    b = MeshBuilder(w, h, 4, stage="S")
    src, dst = _lanes_between(plan, a, nxt)
    color = ch.colors[u]
    B = plan.params.batch
    _sender(plan, b, _moved(a, ox, oy), color, src, lambda hi: [(hi * B, SEND_FROM)])
    spread, bc = _spread(nxt)
    rb = build_region(plan, nxt, _shift(nxt.region, ox, oy), b, Lanes(color, dst, None, {}, spread, bc))
    add_lane_routes(b, a, nxt, src, dst, color, ox, oy)
    anchor = (rb.region.x0 + rb.anchor[0], rb.region.y0 + rb.anchor[1])  # (the chain's last region: unused)
    return StageTrace(key_S(plan, u, v), b.build(), anchor)


def layout(plan: ModelPlan, ch: Chain, g: Group, elements: list[Element]) -> list[Slot]:
    """Stage slots of a group: its layer region (or stand-in), then each element placed against
    the previous one in the direction between them (relays one PE thick), at the mesh origin."""
    lead = ch.lead_slot(plan, g)
    out = [Slot(lead.kind, lead.index, Region(0, 0, lead.region.width, lead.region.height))]
    for e in elements:
        prev = out[-1].region
        real = plan.slots[e.slot]
        w, h = real.region.width, real.region.height
        if e.relay:
            w, h = (1, h) if e.way in ("east", "west") else (w, 1)
        if e.way == "east":
            x, y = prev.x0 + prev.width, prev.y0
        elif e.way == "west":
            x, y = prev.x0 - w, prev.y0
        else:
            x, y = prev.x0, prev.y0 + prev.height
        out.append(Slot("relay" if e.relay else real.kind, real.index, Region(x, y, w, h), real.experts))
    x0 = min(s.region.x0 for s in out)
    y0 = min(s.region.y0 for s in out)
    return [_moved(s, x0, y0) for s in out]


def stage_G(plan: ModelPlan, g: Group, delta: int | None = None) -> StageTrace:
    """Group g's layer region (or stand-in, its combine `delta` cycles after its dispatch)
    running its barrier and its dispatch and combine sends into its expert regions
    (compressed), up to the collector's anchor or the wafer's boundary."""
    ch = chain_of(plan)
    elements = compressed(plan, ch, g)
    stage_slots = layout(plan, ch, g, elements)
    _, _, w, h = _sub(stage_slots)
    b = MeshBuilder(w, h, 4, stage="G")
    d0 = ch.colors[g.lead if g.lead is not None else -1]
    _sender(plan, b, stage_slots[0], d0, lane_sources(stage_slots[0], plan.P, 0), _group_sends(plan, d0),
            standin_delta(plan, delta) if g.lead is None else None)
    roles: dict[int, ExpertRole] = {}
    anchor = None
    Hc = split(plan.spec.hidden_size, plan.P)
    for k, (e, slot) in enumerate(zip(elements, stage_slots[1:]), start=1):
        role = dataclasses.replace(ch.roles[e.slot], t_out=None)
        if e.relay:
            real = plan.slots[e.slot]
            pay = plan_experts(plan.spec, real.index, real.experts, plan.P, plan.cfg, plan.params, plan.Q).buf["xn"]
            decode_relays(slot.region, b, Hc, plan.params.batch, role.c_in, role.c_out, f"element {k}", role.d_in,
                          plan.spec.moe.experts_per_token, pay)
            continue
        roles[k] = role
        rb = build_region(plan, slot, slot.region, b, Lanes(None, {}, None, {}), role, f"element {k}")
        if role.collector:
            anchor = (rb.region.x0 + rb.anchor[0], rb.region.y0 + rb.anchor[1])
    add_group_routes(b, stage_slots, list(range(len(stage_slots))), roles, d0, plan.P)
    return StageTrace(key_G(plan, g, standin_delta(plan, delta) if g.lead is None else None), b.build(), anchor)
