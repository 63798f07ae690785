"""A wafer's decode step composed exactly from small stage simulations (stages.py).

Every *anchored* region (chain.py) ends with a hand-off barrier whose anchor PE fires once; all
that follows in the region, and everything downstream of it (idle until its inputs arrive), is
a pure time shift of that anchor. With a_u the cycle at which anchored region u's anchor fires
(the anchor PE's finish_cycle, the barrier being its last op):

    a_first = finish(anchor)           in  A0 = the first region alone
    a_v     = a_u + finish(anchor_v) in X_u  -  finish(anchor_u) in B_u
    total   = a_last_sender + total(X_last) - finish(anchor) in B_last

for each transition u -> v between consecutive anchored regions, where B_u is region u running
only its barrier and X_u is S_u (v follows u) or G_u (u is a MoE layer region and v its
collector: the layer's whole expert phase in one compressed stage; expert regions the batch did
not choose on straight runs become one-PE relays, and the hops they span and their counters are
added back exactly, group_extras).

A wafer whose chain begins with the rest of a MoE layer (a leading part) has two inputs: the
dispatch and the combine so far, arriving `delta` cycles apart; its stages hold a stand-in for
the layer region sending them so (the combine may cross regions still computing, so the step
depends on delta, which the system's timeline gives: system/wafers.py). A wafer whose chain
ends with a MoE layer whose experts continue on the next wafer (a trailing part) has two
outputs: when its last region holds the dispatch and when it holds the combine so far (the end
of their tagged ops). Times are cycles from the wafer's input: the residual stream arriving at
its first region, or the stand-in's anchor.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..errors import WseError
from ..trace import Trace
from .chain import Chain, chain_of, compressed, key_A0, key_B, key_G, key_S
from .decode import ModelPlan
from .dispatch import Group
from .mesh import split
from .stages import StageTrace, delay_ops, stage_A0, stage_B, stage_G, stage_S, standin_delta


def stages(plan: ModelPlan, delta: int | None = None) -> list[tuple[tuple, str, object]]:
    """The stage simulations the plan's composition needs, in order, as (key, kind, ref) with
    kind "A0", "S", "G" or "B" and ref what build_stage needs (a slot index, a Group, or None
    for a stand-in); delta: a leading part's combine after its dispatch (stages.standin_delta)."""
    ch = chain_of(plan)
    out: list[tuple[tuple, str, object]] = []
    lead = ch.leading
    if lead:
        out += [(key_G(plan, lead, standin_delta(plan, delta)), "G", lead), (key_B(plan, None), "B", None)]
    else:
        out.append((key_A0(plan), "A0", None))
    for u, v in zip(ch.anchored, ch.anchored[1:]):
        g = ch.group_led_by(u)
        out.append((key_G(plan, g), "G", g) if g else (key_S(plan, u, v), "S", u))
        out.append((key_B(plan, u), "B", u))
    if ch.trailing:
        out += [(key_G(plan, ch.trailing), "G", ch.trailing), (key_B(plan, ch.trailing.lead), "B", ch.trailing.lead)]
    return out


def build_stage(plan: ModelPlan, kind: str, ref, delta: int | None = None) -> StageTrace:
    """The trace of one stage listed by stages(plan, delta)."""
    if kind == "A0":
        return stage_A0(plan)
    if kind == "S":
        return stage_S(plan, ref)
    if kind == "G":
        return stage_G(plan, ref, delta if ref.lead is None else None)
    return stage_B(plan, ref)


def checked_stage(key: tuple, result):
    """The stage's result, or a WseError if the stage did not run to completion."""
    if not result.complete:
        raise WseError(f"stage {key} did not complete ({result.stop_name}): " + "; ".join(result.stuck[:3]))
    return result


def group_extras(plan: ModelPlan, ch: Chain, g: Group, delta: int | None = None
                 ) -> tuple[int, dict[str, int], dict[str, int]]:
    """What compose adds to a group stage: cycles (the hops a left-out expert region spans beyond
    its relay's one) and link counters (the dispatch and the combine over the extra hops; the
    relay's lane PEs take their copy of the dispatch as the left-out region's do); a stand-in's
    sends, its delay ops and the hops into the first region are taken out (the wafer's input
    arrives there)."""
    B, k, P = plan.params.batch, plan.spec.moe.experts_per_token, plan.P
    Hc = split(plan.spec.hidden_size, P)
    md = sum(hi + k for hi in Hc) * B  # dispatch wavelets, all lanes
    mc = sum(Hc) * B  # combine wavelets, all lanes
    hops = 0
    for e in compressed(plan, ch, g):
        if e.relay:
            hops += (P if e.way in ("east", "west") else plan.Q) - 1
    pe: dict[str, int] = {}
    link = {"wavelets": hops * (md + mc)}
    if g.lead is None:  # the stand-in's sends, delay ops and the hops into the first region
        delay = [op for hi in Hc for op in delay_ops(plan, hi, standin_delta(plan, delta))]
        moved = 2 * sum(op.length for op in delay)
        pe.update(wavelets_sent=-(md + mc), sram_read_bytes=-2 * (md + mc) - moved, sram_write_bytes=-moved,
                  ops_completed=-3 * P - len(delay))
        link["wavelets"] -= P * (md + mc)
    return hops * plan.cfg.hop_latency_cycles, pe, link


@dataclasses.dataclass
class DecodeResult:
    """A wafer's composed decode step. Times are cycles from its input: the residual stream
    arriving at its first region (inputs "in"), or for a leading part the dispatch, the combine
    `delta` cycles later (inputs "dc")."""

    total_cycles: int
    anchors: list[int]  # a_u per anchored region but the last, in chain order
    stage_cycles: dict[tuple, int]  # distinct simulation key -> its total cycles
    simulations: int
    results: dict[tuple, object]  # key -> EngineResult of each distinct simulation
    terms: list[tuple[int, tuple]] = dataclasses.field(default_factory=list)  # (sign, key): sums to the step
    extras: dict[tuple, tuple[int, dict, dict]] = dataclasses.field(default_factory=dict)  # G key -> group_extras
    anchored: list[int] = dataclasses.field(default_factory=list)  # slot indices
    holds: dict[int, int] = dataclasses.field(default_factory=dict)  # slot -> cycles it holds the token
    inputs: str = "in"
    outputs: dict[str, int] = dataclasses.field(default_factory=dict)  # "end", or "d" and "c" (trailing part)
    delta: int | None = None  # a leading part: the combine's arrival after the dispatch's
    at: dict[int, int] = dataclasses.field(default_factory=dict)  # anchored slot -> its anchor's cycle
    # the token's critical path (system/wafers.py): a leading part whose combine input, not its
    # own experts, decides its collector starts `lead_c` cycles after its dispatch (the combine's
    # arrival; 0: the dispatch decides); a trailing part's holds if its dispatch output, not its
    # combine, is what the next wafer waits for
    lead_c: int = 0
    holds_c: dict[int, int] | None = None  # a leading part's holds from the combine's arrival (lead_c)
    holds_d: dict[int, int] | None = None

    def total(self, counter: str) -> int:
        """A PE counter summed over the whole step (e.g. flops): the signed sum of the stages'
        totals, which counts every region's program and every lane transfer exactly once."""
        return int(sum(sign * (int(self.results[key].pe(counter).sum()) + self.extras.get(key, (0, {}, {}))[1]
                               .get(counter, 0)) for sign, key in self.terms))

    def link_total(self, counter: str) -> int:
        """A link counter (e.g. wavelets: wavelet-hops) summed over the whole step."""
        return int(sum(sign * (int(self.results[key].link(counter).sum()) + self.extras.get(key, (0, {}, {}))[2]
                               .get(counter, 0)) for sign, key in self.terms))


def compose(plan: ModelPlan, simulate: Callable[[Trace], object],
            shared: dict[tuple, tuple[object, tuple[int, int] | None]] | None = None,
            delta: int | None = None) -> DecodeResult:
    """The decode step from the distinct stage simulations (see module docstring); delta: a
    leading part's combine after its dispatch (stages.standin_delta: None, the soonest).

    Stages with equal keys are identical traces: each distinct one is built and simulated once,
    also across the plans of one system when they pass the same `shared` dict (key -> result,
    anchor; it may arrive filled, e.g. by worker processes); `simulations` counts the ones this
    call ran.
    """
    store = {} if shared is None else shared
    ran = 0
    listed = stages(plan, delta)
    for key, kind, ref in listed:
        if key not in store:
            st = build_stage(plan, kind, ref, delta)
            store[key] = (checked_stage(key, simulate(st.trace)), st.anchor)
            ran += 1
    ch = chain_of(plan)
    cache = {key: store[key][0] for key, _, _ in listed}
    extras = {key: group_extras(plan, ch, ref, delta) for key, kind, ref in listed if kind == "G"}
    shift = {key: e[0] for key, e in extras.items()}

    def finish(key: tuple) -> int:
        r, (x, y) = store[key]
        return int(r.pe("finish_cycle")[y, x]) + shift.get(key, 0)

    def tag_end(key: tuple, name: str) -> int:
        ops = store[key][0].ops
        return int(ops["end_cycle"][list(ops["name"]).index(name)]) + shift.get(key, 0)

    terms = [(-1 if kind == "B" else 1, key) for key, kind, _ in listed]
    stage_cycles = {k: r.total_cycles for k, r in cache.items()}
    out = DecodeResult(0, [], stage_cycles, ran, cache, terms, extras, ch.anchored)
    it = iter(listed)
    a: dict[int, int] = {}
    if ch.leading:
        g0 = ch.leading
        (gk, _, _), (bk, _, _) = next(it), next(it)
        b0 = finish(bk)  # the stand-in's anchor: the part's input
        out.inputs, out.delta = "dc", standin_delta(plan, delta)
        if not g0.closed:  # the whole wafer continues one layer's experts
            last = len(compressed(plan, ch, g0))
            out.outputs = {"d": tag_end(gk, f"element {last} input") - b0,
                           "c": tag_end(gk, f"element {last} combine") - b0}
            out.total_cycles = max(out.outputs.values())
            _lead_holds(out, plan, ch, g0, store[gk][0], b0, out.outputs["c"])
            out.holds_d = _group_holds(plan, ch, g0, store[gk][0], b0, out.outputs["d"], "d")
            return out
        a[g0.last] = finish(gk) - b0
        _lead_holds(out, plan, ch, g0, store[gk][0], b0, a[g0.last])
        end_key, end_from = gk, b0
    else:
        a0 = next(it)[0]
        a[ch.anchored[0]] = finish(a0)
        end_key, end_from = a0, 0
    for u, v in zip(ch.anchored, ch.anchored[1:]):
        (xk, kind, ref), (bk, _, _) = next(it), next(it)
        a[v] = a[u] + finish(xk) - finish(bk)
        end_key, end_from = xk, finish(bk) - a[u]
        if kind == "G":
            out.holds.update(_group_holds(plan, ch, ref, store[xk][0], finish(bk), a[v] - a[u]))
    last = ch.anchored[-1]
    if ch.trailing:
        (gk, _, g), (bk, _, _) = next(it), next(it)
        n = len(compressed(plan, ch, g))
        out.outputs = {"d": a[last] + tag_end(gk, f"element {n} input") - finish(bk),
                       "c": a[last] + tag_end(gk, f"element {n} combine") - finish(bk)}
        out.total_cycles = max(out.outputs.values())
        out.holds.update(_group_holds(plan, ch, g, store[gk][0], finish(bk), out.total_cycles - a[last]))
        out.holds_d = _group_holds(plan, ch, g, store[gk][0], finish(bk), out.outputs["d"] - a[last], "d")
    else:
        out.total_cycles = store[end_key][0].total_cycles + shift.get(end_key, 0) - end_from
        tail = plan.slots[last]
        split_after = (tail.kind == "layer" and plan.expert_regions and plan.spec.is_moe_layer(tail.index)
                       and last == len(plan.slots) - 1)
        # (a MoE layer region whose experts are all on the next wafer sends its dispatch and its
        # combine's start where another region would send the residual stream)
        out.outputs = {"d": out.total_cycles, "c": out.total_cycles} if split_after else {"end": out.total_cycles}
    out.anchors = [a[u] for u in ch.anchored[:-1]]
    out.at = dict(a)
    before = 0  # anchored regions hold from the anchor before theirs to their own (the last: to the end)
    for s in ch.anchored:
        end = out.total_cycles if s == last and not ch.trailing else a[s]
        out.holds.setdefault(s, end - before)
        before = a[s]
    return out


def _critical(plan: ModelPlan, ch: Chain, g: Group, result) -> tuple[list[int], int | None, int, int | None]:
    """A group stage's elements' crossings (P or Q hops at hop_latency_cycles each) and its
    critical chosen element: the one whose outputs, ready at the measured end of its experts,
    reach the end last (with the compressed relays' hops added back): (crossings, its index
    or None, when its outputs are ready, when they reach the end)."""
    ends = {str(n): int(e) for n, e in zip(result.ops["name"], result.ops["end_cycle"])}
    hop, rho = plan.cfg.hop_latency_cycles, 2 * plan.cfg.ramp_latency_cycles
    elements = compressed(plan, ch, g)
    cross = [(plan.P if e.way in ("east", "west") else plan.Q) * hop for e in elements]
    extra, best, c, c_ready = 0, None, None, 0
    for k, e in enumerate(elements):
        if e.relay:
            extra += cross[k] - hop  # the stage's relay spans one hop
            continue
        ready = ends.get(f"element {k + 1} ffn")
        if ready is None:
            continue
        reach = ready + extra + sum(x + rho for x in cross[k + 1:-1]) + (cross[-1] if k < len(elements) - 1 else 0)
        if best is None or reach > best:
            best, c, c_ready = reach, k, ready + extra
    return cross, c, c_ready, best


def _lead_holds(out: DecodeResult, plan: ModelPlan, ch: Chain, g: Group, result, b0: int, end: int) -> None:
    """A leading part's holds up to `end` (cycles after the stand-in's anchor b0): from the
    dispatch (its experts decide), and where the combine sent out.delta later decides, from
    the combine's arrival (lead_c, holds_c)."""
    crit = _critical(plan, ch, g, result)
    out.holds.update(_group_holds(plan, ch, g, result, b0, end, crit=crit))
    if _combine_decides(plan, crit, b0, out.delta):
        out.lead_c = out.delta
        out.holds_c = _group_holds(plan, ch, g, result, b0 + out.delta, end - out.delta, "c", crit)


def _combine_decides(plan: ModelPlan, crit: tuple, start: int, delta: int) -> bool:
    """Whether a leading part's combine input (sent `delta` after the dispatch from the stand-in
    anchored at `start`) reaches its end no sooner than any of its chosen regions' outputs
    (`crit`: its group's _critical)."""
    cross, c, _, best = crit
    rho = 2 * plan.cfg.ramp_latency_cycles
    return c is None or start + delta + sum(x + rho for x in cross[:-1]) + cross[-1] >= best


def _group_holds(plan: ModelPlan, ch: Chain, g: Group, result, start: int, span: int,
                 via: str | None = None, crit: tuple | None = None) -> dict[int, int]:
    """How the `span` cycles from a group's layer region's anchor (`start` in its stage) to its
    collector's anchor (or the wafer's boundary) split over its expert regions, along the
    critical path: the dispatch crosses the regions before the critical one (the chosen region
    whose outputs, ready at the measured end of its experts, reach the end last) at wire speed;
    the critical region holds from there until its outputs are ready; the combine then crosses
    each later region at wire speed plus one relay (a ramp each way); the last region
    holds the rest (receiving, adding, its barrier). Crossing a region is its extent along the
    chain (P or Q hops) at hop_latency_cycles. `via` "c": the combine arriving at `start`
    decides (it crosses every region), "d": the dispatch leaving the last region does (it
    crosses every region before). `crit`: the group's _critical, if known."""
    rho = 2 * plan.cfg.ramp_latency_cycles
    cross, c, c_ready, _ = crit or _critical(plan, ch, g, result)
    if via:
        c = -1 if via == "c" else len(cross)
    out = {}
    for k, e in enumerate(compressed(plan, ch, g)[:-1]):
        if c is None or k > c:  # the combine passing
            out[e.slot] = cross[k] + rho
        elif k < c:  # the dispatch passing
            out[e.slot] = cross[k]
        else:
            out[e.slot] = c_ready - start - sum(cross[:c])
    out[g.last] = span - sum(out.values())
    return out
