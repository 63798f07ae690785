"""A model on a chain of wafer systems: layer groups, per-wafer cycle simulation, links,
pipelining of sequences in flight, energy and cost (docs/system.md).

The layers are split into consecutive groups balanced by bytes, one per wafer (the first also
holds the embedding, the last the LM head). With expert regions the chain is cut at routed
experts instead (decode.model_units), so one layer's experts may span wafers; where that split
places nothing, or with --uniform-slots smaller slots, shares that fill each wafer with whole
expert regions are taken instead (packing.py). Each wafer's
decode step is simulated cycle by cycle (composed from its distinct stage traces,
compose.compose, which is exact); identical stage traces are simulated once for all wafers.
Between wafers the activations of the batch (batch x hidden x 2 bytes) cross the links, or,
where a layer's experts continue on the next wafer, its dispatch and the combine so far
(schedule: the wafers and links on one timeline).

Pipelining: every layer region and every link is a pipeline stage that holds one micro-batch
(the `batch` sequences decoded together) at a time. With m micro-batches in flight a
micro-batch's next token comes every period(m) = max(L, m * b), where L is the token latency
through the whole chain and b the longest stage; per-sequence tokens/s = 1 / period and
aggregate tokens/s = m * batch / period. Each micro-batch in flight needs its own KV cache in
every layer region, so m is bounded by the SRAM the regions' PEs have left and by the number of
stages.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from ..errors import WseError
from ..trace import Trace
from ..trace_check import validate
from ..workload.chain import chain_of, compressed, region_key
from ..workload.compose import compose, stages
from ..workload.decode import (ELEM, ModelPlan, bytes_needed, model_units, plan_model, plan_units, resident_bytes,
                               units_bytes, _table_bytes)
from ..workload.params import DecodeParams
from ..workload.models import ModelSpec
from ..workload.plan import FitError, usable_sram
from .config import SystemConfig
from .link import Link, Network
from .packing import filled_plans
from .pool import Fanout, distinct_tasks, run_tasks


def balanced(weights: list[int], parts: int, what: str = "pieces") -> list[tuple[int, int]]:
    """Consecutive runs [a, b) of `weights`, `parts` of them, each as near as it can be to an
    equal share of the total (every run non-empty)."""
    n = len(weights)
    if not 1 <= parts <= n:
        raise WseError(f"{parts} wafers for {n} {what}: each wafer needs at least one")
    total, cum, cuts = sum(weights), 0, [0]
    for i, w in enumerate(weights):
        k = len(cuts)
        # cut before piece i when that leaves the running share nearer its target than after it
        if k < parts and i > cuts[-1] and n - i >= parts - k \
                and (abs(cum - total * k / parts) <= abs(cum + w - total * k / parts) or n - i == parts - k):
            cuts.append(i)
        cum += w
    return list(zip(cuts, cuts[1:] + [n]))


def _weights(spec: ModelSpec, params: DecodeParams, units: bool) -> list[int]:
    """Bytes (weights and KV cache) of each piece a split may cut between: layers, or with
    `units` model_units; the embedding counted on the first piece, the LM head on the last."""
    if units:
        weight = [units_bytes(spec, params, i, i + 1) for i in range(len(model_units(spec)))]
    else:
        weight = [bytes_needed(spec, params, 1, layer, False, False) for layer in range(spec.layers)]
    weight[0] += _table_bytes(spec, True, False)
    weight[-1] += _table_bytes(spec, False, True)
    return weight


def split_layers(spec: ModelSpec, params: DecodeParams, wafers: int) -> list[range]:
    """Consecutive groups of layers, one per wafer, balanced by bytes: weights and KV cache,
    the embedding counted on the first wafer and the LM head on the last."""
    return [range(a, b) for a, b in balanced(_weights(spec, params, False), wafers, f"layers of {spec.name}")]


def uses_units(spec: ModelSpec, system: SystemConfig, params: DecodeParams) -> bool:
    """Whether the chain is cut at routed experts: with --moe-mapping regions, or with auto
    when one MoE layer holding all its experts does not place on a wafer."""
    if not spec.moe or params.moe_mapping == "local":
        return False
    if params.moe_mapping == "regions":
        return True
    local = dataclasses.replace(params, moe_mapping="local")
    try:
        plan_model(spec, system.wafer_config, local, 1, None, spec.moe.dense_layers, False, False)
        return False
    except WseError:
        return True


def split_units(spec: ModelSpec, params: DecodeParams, wafers: int) -> list[tuple[int, int]]:
    """model_units cut into `wafers` consecutive runs balanced by bytes (the embedding counted
    on the first wafer, the LM head on the last)."""
    return balanced(_weights(spec, params, True), wafers, f"units of {spec.name} (layer regions and routed experts)")


def wafer_shares(spec: ModelSpec, params: DecodeParams, wafers: int, units: bool) -> list[tuple[int, int]]:
    """Each wafer's share [a, b): of model_units when `units` (cut at routed experts), else of
    the layers."""
    if units:
        return split_units(spec, params, wafers)
    return [(g.start, g.stop) for g in split_layers(spec, params, wafers)]


def share_candidates(spec: ModelSpec, params: DecodeParams, wafers: int, units: bool) -> list[list[tuple[int, int]]]:
    """The splits a system tries, in order: balanced by bytes (wafer_shares), then, for whole
    layers, as many layers on each wafer as can be (the tables no longer take a layer's place
    when they are strips: --tables)."""
    out = [wafer_shares(spec, params, wafers, units)]
    if not units:
        even = balanced([1] * spec.layers, wafers, f"layers of {spec.name}")
        if even != out[0]:
            out.append(even)
    return out


def placed_shares(spec: ModelSpec, cfg, params: DecodeParams, wafers: int, units: bool
                  ) -> tuple[list[tuple[int, int]], list[ModelPlan]]:
    """The first of share_candidates whose every share places, with its plans (the first
    split's error if none does)."""
    first: WseError | None = None
    for shares in share_candidates(spec, params, wafers, units):
        try:
            return shares, [share_plan(spec, cfg, params, shares, w, units) for w in range(wafers)]
        except FitError as e:
            first = first or e
    raise first


def share_plan(spec: ModelSpec, cfg, params: DecodeParams, shares: list[tuple[int, int]], w: int, units: bool,
               P: int | None = None, Q: int | None = None) -> ModelPlan:
    """Wafer w's decode plan for its share (wafer_shares), on P x Q slots if given (WseError
    naming the wafer if it does not fit)."""
    a, b = shares[w]
    wafers = len(shares)
    try:
        if units:
            return plan_units(spec, cfg, params, a, b, w == 0, w == wafers - 1, P, Q)
        return plan_model(spec, cfg, params, b - a, P, a, w == 0, w == wafers - 1, Q=Q)
    except WseError as e:  # (the same class: a FitError stays one, see fewest_wafers)
        what = f"wafer {w} of {wafers}" + ("" if units else f" (layers {a}..{b - 1})")
        raise type(e)(f"{what}: {e}") from None


def wafer_plans(spec: ModelSpec, system: SystemConfig, params: DecodeParams, wafers: int,
                units: bool | None = None) -> list[ModelPlan]:
    """One decode plan per wafer (WseError naming the wafer if a group does not fit); `units`:
    cut at routed experts (default: uses_units). A split cut at routed experts is balanced by
    bytes or, where that places no slots as large or none at all, fills each wafer's slots with
    whole expert regions (packing.py)."""
    units = uses_units(spec, system, params) if units is None else units
    return plans_on(spec, system.wafer_config, params, wafers, units)


def plans_on(spec: ModelSpec, cfg, params: DecodeParams, wafers: int, units: bool) -> list[ModelPlan]:
    """wafer_plans on `wafers` wafers of configuration cfg (`wse check --full --wafers` splits so)."""
    try:
        shares, plans = placed_shares(spec, cfg, params, wafers, units)
    except FitError:
        filled = filled_plans(spec, cfg, params, wafers) if units else None
        if filled is None:
            raise
        if params.uniform_slots:
            return filled[1]
        return [_own_best(spec, cfg, params, filled[0], w, plan) for w, plan in enumerate(filled[1])]
    if not params.uniform_slots or wafers == 1:
        return plans
    uniform = _uniform(spec, cfg, params, shares, plans, units)
    filled = filled_plans(spec, cfg, params, wafers, uniform[0].P * uniform[0].Q if uniform else 0) \
        if units else None
    if filled is not None:
        return filled[1]
    if uniform is None:
        raise FitError(f"--uniform-slots: no wafer's best slot shape of {min(p.P * p.Q for p in plans):,} PEs "
                       f"places every wafer's share of {spec.name} on {wafers} wafers; drop --uniform-slots")
    return uniform


def _uniform(spec: ModelSpec, cfg, params: DecodeParams, shares: list[tuple[int, int]], plans: list[ModelPlan],
             units: bool) -> list[ModelPlan] | None:
    """The byte-balanced shares on one slot shape: no wafer places a larger area than its own
    best, so the smallest of the wafers' best shapes (largest area first) on all of them."""
    least = min(p.P * p.Q for p in plans)
    for P, Q in sorted({(p.P, p.Q) for p in plans if p.P * p.Q == least}, reverse=True):
        try:
            return [share_plan(spec, cfg, params, shares, w, units, P, Q) for w in range(len(plans))]
        except FitError:
            continue
    return None


def _own_best(spec: ModelSpec, cfg, params: DecodeParams, shares: list[tuple[int, int]], w: int,
              filled: ModelPlan) -> ModelPlan:
    """Wafer w's filled share on its own best slot shape, if larger than the shape that filled it."""
    try:
        best = share_plan(spec, cfg, params, shares, w, True)
    except FitError:
        return filled
    return best if best.P * best.Q > filled.P * filled.Q else filled


def fewest_wafers(spec: ModelSpec, system: SystemConfig, params: DecodeParams, most: int = 4096) -> int:
    """The fewest wafers whose SRAM holds the weights plus the KV cache (and whose groups place)."""
    cfg = system.wafer_config
    have = usable_sram(cfg) * cfg.mesh_width * cfg.mesh_height
    total = bytes_needed(spec, params, spec.layers)
    units = uses_units(spec, system, params)
    weight = _weights(spec, params, units)
    top = min(most, len(weight))
    last: WseError | None = None
    for w in range(max(1, -(-total // have)), top + 1):
        if not units and all(any(sum(weight[a:b]) > have for a, b in shares)
                             for shares in share_candidates(spec, params, w, units)):
            continue
        try:
            wafer_plans(spec, system, params, w, units)
            return w
        except FitError as e:  # more wafers may help; any other error would repeat for every count
            last = e
    raise WseError(f"{spec.name} does not fit on up to {top} {cfg.name} wafers" + (f": {last}" if last else ""))


@dataclasses.dataclass
class WaferStep:
    """One wafer's share of a decode step."""

    wafer: int
    layers: range
    embed: bool
    head: bool
    slot: int  # P: columns of a layer or expert slot
    slot_rows: int  # Q
    cycles: int
    region_cycles: list[int]  # time each region holds the token on its critical path (a pipeline stage)
    flops: int
    sram_bytes: int
    wavelet_hops: int
    simulations: int
    extra_in_flight: int  # more micro-batches whose KV caches fit beside every layer region's data
    expert_regions: int = 0  # slots holding routed experts
    regions: list[RegionInfo] = dataclasses.field(default_factory=list)  # per region, with region_cycles
    resident_bytes: int = 0  # weights and KV cache the wafer holds
    usable_bytes: int = 1  # SRAM the wafer's PEs may place data in

    @property
    def packing(self) -> float:
        """Share of the wafer's usable SRAM its weights and KV cache fill."""
        return self.resident_bytes / self.usable_bytes


@dataclasses.dataclass(frozen=True)
class RegionInfo:
    """What one region of a wafer's chain holds."""

    kind: str  # embedding, layer, ffn (a split layer's FFN), experts or lm_head
    layer: int  # -1 for the embedding and the LM head
    experts: tuple[int, int] = (0, 0)  # routed experts [first, last) of an expert region
    experts_run: int = 0  # of them, experts the batch chose this step

    @property
    def label(self) -> str:
        """The class a breakdown groups it in."""
        if self.kind == "experts":
            return f"expert region running {self.experts_run}" if self.experts_run else "idle expert region"
        return f"{self.kind} region"


def region_infos(plan: ModelPlan) -> list[RegionInfo]:
    """The regions of a wafer plan, in chain order."""
    from ..workload.ffn import chosen_experts
    out = []
    for slot in plan.slots:
        if slot.kind == "experts":
            run = len(chosen_experts(plan.spec, slot.index, slot.experts, plan.params))
            out.append(RegionInfo("experts", slot.index, slot.experts, run))
        else:
            out.append(RegionInfo(slot.kind, slot.index if slot.kind in ("layer", "ffn") else -1))
    return out


@dataclasses.dataclass
class PipelinePoint:
    in_flight: int  # micro-batches
    period_s: float  # time between tokens of one sequence
    tokens_per_s_per_user: float
    tokens_per_s: float  # aggregate
    j_per_token: float
    usd_per_mtok: float


@dataclasses.dataclass
class SystemDecode:
    model: str
    system: str
    wafers: int
    batch: int
    context: int
    clock_hz: float
    steps: list[WaferStep]
    link_bytes: list[int]  # bytes over each link per token step
    link_seconds: float  # one transfer of the batch's residual stream between systems
    latency_s: float  # one token through the whole chain
    bottleneck_s: float  # the longest pipeline stage
    max_in_flight: int
    dynamic_j_per_step: float
    static_w: float
    curve: list[PipelinePoint]
    ledger: Network  # the links: bytes sent and received, ports busy
    depth_bound: str = ""  # what bounds max_in_flight
    representative: object = None  # the largest stage simulation (EngineResult): counters for the run file

    @property
    def simulations(self) -> int:
        return sum(s.simulations for s in self.steps)


def extra_in_flight_of(plan: ModelPlan) -> int:
    """Micro-batches beyond the first whose KV caches fit in every layer region of the plan:
    the SRAM a region's PEs have left over, in units of one micro-batch's KV data per PE
    (LayerPlan.kv_bytes_per_pe)."""
    from ..workload.decode import layer_plan
    most = 1 << 30
    seen = set()
    for slot in plan.slots:
        if slot.kind != "layer":
            continue
        key = region_key(plan, slot)
        if key in seen:
            continue
        seen.add(key)
        lp = layer_plan(plan, slot.index)
        most = min(most, (lp.mem.limit - lp.mem.top) // lp.kv_bytes_per_pe)
    return most


def _group_key(plan: ModelPlan) -> tuple:
    """Plans with equal keys compose to the same step (their stages are the same)."""
    return (plan.embed, plan.head, plan.P, plan.Q, tuple(key for key, _, _ in stages(plan)))


def run_decode(spec: ModelSpec, system: SystemConfig, params: DecodeParams, wafers: int | None,
               simulate: Callable[[Trace], object], fanout: Fanout | None = None,
               plans: list[ModelPlan] | None = None) -> SystemDecode:
    """Simulate one decode step on every distinct wafer and put the chain together.

    The distinct stage simulations run first (pool.run_tasks: from the stage cache, through
    `simulate`, or on the fanout's Dask workers): every stage, and the leading-part stages of
    wafers continuing a layer, whose combine arrives a delta after the dispatch that the wafer
    before and the links decide (predicted from the wafer before's trailing stage, so each starts
    as soon as that one is in). Each wafer's step is then composed and put on one
    timeline with the links (Timeline); a delta the prediction missed is simulated then.
    `plans`: the wafers' plans, made for another batch or context (the serving model's sampled
    points keep one layout), with `params` put in each."""
    cfg = system.wafer_config
    if plans is not None:
        plans = [dataclasses.replace(p, params=params) for p in plans]
        wafers = len(plans)
    else:
        wafers = wafers or fewest_wafers(spec, system, params)
        plans = wafer_plans(spec, system, params, wafers)
    where = f"{spec.name} on {system.name}"
    fanout = fanout or Fanout()
    shared, first = _run_stages(plans, spec, params, system, simulate, where, fanout)
    net = Network(system.topology, wafers, Link(system.link_bytes_per_s, system.link_latency_s),
                  system.links_per_wafer)

    def missed(t: Trace):  # a delta the prediction missed: simulated here
        validate(t, cfg, where=where, fit=False)
        return fanout.simulate_cached(t, cfg, simulate)

    cache: dict[tuple, object] = {}
    line = Timeline(spec, params, net, cfg.clock_hz)
    composed, times = [], []
    for w, plan in enumerate(plans):
        delta = line.delta() if chain_of(plan).leading else None
        key = (_group_key(plan), delta)
        if key not in cache:
            cache[key] = compose(plan, missed, shared, delta)
        composed.append(cache[key])
        times.append(line.add(w, cache[key]))
    steps = []
    for w, (plan, d, (t0, t1), holds) in enumerate(zip(plans, composed, *_critical_path(plans, composed, times,
                                                                                      cfg.clock_hz, system))):
        g = range(plan.first_layer, plan.first_layer + plan.n_layers)
        steps.append(WaferStep(
            w, g, plan.embed, plan.head, plan.P, plan.Q, round((t1 - t0) * cfg.clock_hz), holds, d.total("flops"),
            d.total("sram_read_bytes") + d.total("sram_write_bytes"), d.link_total("wavelets"),
            first[w] + d.simulations, extra_in_flight_of(plan), sum(s.kind == "experts" for s in plan.slots),
            region_infos(plan), resident_bytes(plan), usable_sram(cfg) * cfg.mesh_width * cfg.mesh_height))
    latency = times[-1][1]
    held = [(c / cfg.clock_hz, info.label) for s in steps for c, info in zip(s.region_cycles, s.regions)]
    held += [(t, "link") for t in net.busy.values()]
    bottleneck = max(held)[0]
    max_in_flight, depth = pipeline_depth(held, latency, 1 + min(s.extra_in_flight for s in steps), cfg.clock_hz)
    dyn = (sum(s.flops for s in steps) / 2 * system.pj_per_fmac + sum(s.sram_bytes for s in steps) * system.pj_per_sram_byte
           + sum(s.wavelet_hops for s in steps) * system.pj_per_wavelet_hop
           + sum(net.sent) * system.pj_per_link_byte) * 1e-12
    static_w = wafers * (system.static_w_per_wafer + system.overhead_w_per_system)
    link_s = net.link.latency_s + params.batch * spec.hidden_size * ELEM / net.bytes_per_s if wafers > 1 else 0.0
    result = SystemDecode(spec.name, system.name, wafers, params.batch, params.context, cfg.clock_hz, steps,
                          net.sent[:-1] if wafers > 1 else [], link_s, latency, bottleneck, max_in_flight, dyn,
                          static_w, [], net, depth)
    result.curve = [pipeline_point(result, system, m) for m in range(1, max_in_flight + 1)]
    result.representative = max((r for d in cache.values() for r in d.results.values()),
                                key=lambda r: r.pe_counters.shape[0] * r.pe_counters.shape[1] * r.total_cycles)
    return result


def _run_stages(plans: list[ModelPlan], spec: ModelSpec, params: DecodeParams, system: SystemConfig,
                simulate: Callable[[Trace], object], where: str, fanout: Fanout) -> tuple[dict, list[int]]:
    """Every distinct stage simulation of the plans (pool.run_tasks), a leading part's listed as
    soon as the stage predicting its delta is in: (key -> (result, anchor), how many of them each
    wafer is the first to need)."""
    cfg = system.wafer_config
    tasks, first = distinct_tasks(plans)
    shared: dict[tuple, tuple] = {}  # stage simulations shared by all wafers
    seen = {t[0] for t in tasks}
    waiting: dict[tuple | None, list[int]] = {}  # a stage's key -> the wafers whose delta it predicts
    for w in range(1, len(plans)):
        if _predicts(plans, w):
            waiting.setdefault(_delta_source(plans, w), []).append(w)
    lead_keys: dict[int, tuple] = {}

    def leading(ws: list[int]) -> list:
        """The leading-part stages of wafers ws, now that their deltas are known."""
        out = []
        for w in ws:
            delta = _predicted_delta(plans, w, shared, spec, params, system, cfg.clock_hz)
            key, kind, ref = stages(plans[w], delta)[0]
            lead_keys[w] = key
            if key not in seen:
                seen.add(key)
                out.append((key, plans[w], kind, ref, delta))
        return out

    def arrived(key: tuple, result, anchor) -> list:
        shared[key] = (result, anchor)
        return leading(waiting.pop(key, []))

    for _ in run_tasks(tasks + leading(waiting.pop(None, [])), cfg, simulate, where, fanout, arrived):
        pass
    known = {t[0] for t in tasks}  # each leading stage counted for the first wafer needing it
    for w in sorted(lead_keys):
        if lead_keys[w] not in known:
            known.add(lead_keys[w])
            first[w] += 1
    return shared, first


def _critical_path(plans: list[ModelPlan], composed: list, times: list[tuple[float, float]], clock_hz: float,
                   system: SystemConfig) -> tuple[list[tuple[float, float]], list[list[int]]]:
    """Each wafer's span on the token's critical path and its regions' holds, so the spans and
    the links between them partition the latency (no wafer's time is also another's). Walking
    back from the last wafer: a wafer continuing a layer whose combine input decides it starts
    when that combine arrives (the wafer before holds the token until it leaves, then the
    link); a wafer whose dispatch output is what the next waits for ends when it leaves (its
    experts still computing are off the path), and on a switch the wafers between the
    dispatch's source and that wafer are off the path."""
    n = len(plans)
    out_of = ["end"] * n  # the output the next wafer waits for: end, d, c or off (not on the path)
    in_of = ["in"] * n
    for w in range(n - 1, -1, -1):
        d = composed[w]
        if out_of[w] == "off" or d.inputs != "dc":
            in_of[w] = "off" if out_of[w] == "off" else "in"
        else:  # (a wafer inside one layer's experts passes the dispatch straight on)
            in_of[w] = "d" if (out_of[w] == "d" and not d.anchored) or not d.lead_c else "c"
        if w == 0:
            break
        if in_of[w] in ("in", "c"):
            out_of[w - 1] = "end" if in_of[w] == "in" else "c"
        elif in_of[w] == "d":  # from the dispatch's source: the wafer before, or on a switch the last anchored
            src = w - 1 if system.topology == "chain" else \
                next((u for u in range(w - 1, -1, -1) if composed[u].anchored), 0)
            out_of[src] = "d"
            for u in range(src + 1, w):
                out_of[u] = "off"
        # (an off wafer lies between a dispatch's source, already marked, and the wafer it reaches)
    spans, holds = [], []
    for w, (plan, d, (t0, t1)) in enumerate(zip(plans, composed, times)):
        h = dict(d.holds)
        if out_of[w] == "off":
            spans.append((t0, t0))
            holds.append([0] * len(plan.slots))
            continue
        if in_of[w] == "c":
            h.update(d.holds_c)
            t0 += d.lead_c / clock_hz
        if out_of[w] in ("d", "c") and out_of[w] in d.outputs:
            if out_of[w] == "d" and d.holds_d is not None:
                h.update(d.holds_d)
            t1 = times[w][0] + d.outputs[out_of[w]] / clock_hz
        spans.append((t0, t1))
        holds.append([h.get(s, 0) for s in range(len(plan.slots))])
    return spans, holds


class Timeline:
    """One token through the chain: each wafer's inputs, its outputs, and the transfers between.

    A wafer's outputs cross the links to the next: the residual stream (batch x hidden x 2
    bytes), or, where a MoE layer's experts continue, its dispatch (batch x (hidden + k) x 2)
    and the combine so far (batch x hidden x 2); a layer's dispatch to its later wafers leaves
    from its first wafer directly through a switch, hop by hop along a chain."""

    def __init__(self, spec: ModelSpec, params: DecodeParams, net: Network, clock_hz: float):
        self.net, self.clock = net, clock_hz
        B, H = params.batch, spec.hidden_size
        self.act = B * H * ELEM
        self.disp = B * (H + (spec.moe.experts_per_token if spec.moe else 0)) * ELEM
        self.inputs: dict[str, float] = {"in": 0.0}
        self.src: tuple[int, float] | None = None  # where the current layer's dispatch leaves (switch)

    def delta(self) -> int:
        """Cycles from the next wafer's dispatch arriving to its combine arriving."""
        return round((self.inputs["c"] - self.inputs["d"]) * self.clock)

    def add(self, w: int, d) -> tuple[float, float]:
        """Put wafer w's composed step (composed with this delta, if it continues a layer) on the
        timeline: (its input arrives, its last output leaves)."""
        start = self.inputs["d"] if d.inputs == "dc" else self.inputs["in"]
        outs = {n: start + v / self.clock for n, v in d.outputs.items()}
        if w + 1 < self.net.wafers:
            if "end" in outs:
                self.inputs, self.src = {"in": self.net.transfer(w, w + 1, self.act, outs["end"])}, None
            else:
                if self.src is None or self.net.topology == "chain" or d.anchored:
                    self.src = (w, outs["d"])
                self.inputs = {"d": self.net.transfer(self.src[0], w + 1, self.disp, self.src[1]),
                               "c": self.net.transfer(w, w + 1, self.act, outs["c"])}
        return start, max(outs.values())


def _predicts(plans: list[ModelPlan], w: int) -> bool:
    """Whether wafer w's delta is predicted before the timeline is put together: it continues a
    layer whose wafer before holds the layer's region or closes an earlier layer (other deltas
    come out of the timeline)."""
    prev = chain_of(plans[w - 1])
    return chain_of(plans[w]).leading is not None and not (prev.leading and not prev.anchored)


def _delta_source(plans: list[ModelPlan], w: int) -> tuple | None:
    """The stage whose result predicts wafer w's delta: the wafer before's trailing stage (its
    combine after its dispatch at its boundary), or None where that wafer has no trailing part."""
    return stages(plans[w - 1])[-2][0] if chain_of(plans[w - 1]).trailing else None


def _predicted_delta(plans: list[ModelPlan], w: int, shared: dict, spec: ModelSpec, params: DecodeParams,
                     system: SystemConfig, clock_hz: float) -> int:
    """Wafer w's delta (_predicts) on links busy with nothing else; `shared` holds _delta_source's
    result."""
    prev = chain_of(plans[w - 1])
    offset = 0
    if prev.trailing:  # combine after dispatch at its boundary, from its trailing stage
        key, _, g = stages(plans[w - 1])[-2]
        ops = shared[key][0].ops
        names = list(ops["name"])
        n = len(compressed(plans[w - 1], prev, g))
        offset = int(ops["end_cycle"][names.index(f"element {n} combine")]) \
            - int(ops["end_cycle"][names.index(f"element {n} input")])
    net = Network(system.topology, 2, Link(system.link_bytes_per_s, system.link_latency_s),
                  system.links_per_wafer)
    line = Timeline(spec, params, net, clock_hz)
    line.src = (0, 0.0)
    line.inputs = {"d": net.transfer(0, 1, line.disp, 0.0), "c": net.transfer(0, 1, line.act, offset / clock_hz)}
    return line.delta()


def fill_depth(latency_s: float, longest_s: float) -> int:
    """Micro-batches that fill a pipeline: m x (longest stage) >= latency."""
    return max(1, math.ceil(latency_s / longest_s - 1e-9))


def pipeline_depth(stages: list[tuple[float, str]], latency_s: float, kv: int, clock_hz: float) -> tuple[int, str]:
    """Micro-batches worth keeping in flight, and what bounds them: the KV caches the layer
    regions hold (`kv`), or the pipeline being full, m x (longest stage) >= latency, beyond
    which more micro-batches add latency and no throughput. `stages`: (seconds, label)."""
    longest, label = max(stages)
    full = fill_depth(latency_s, longest)
    if kv < full:
        return kv, f"KV-cache SRAM of the layer regions ({kv}; {full} would fill the pipeline)"
    return full, (f"the pipeline is full (period = latency; longest stage: {label}, "
                  f"{longest * clock_hz:,.0f} cycles); KV caches fit {kv}")


def pipeline_point(r: SystemDecode, system: SystemConfig, in_flight: int) -> PipelinePoint:
    """Rates, energy and cost with `in_flight` micro-batches of `batch` sequences in flight."""
    period = max(r.latency_s, in_flight * r.bottleneck_s)
    tokens_per_period = in_flight * r.batch
    rate = tokens_per_period / period
    j = r.dynamic_j_per_step / r.batch + r.static_w * period / tokens_per_period / system.utilization
    usd = r.wafers * system.usd_per_system_hour / 3600.0 / (rate * system.utilization) * 1e6
    return PipelinePoint(in_flight, period, 1.0 / period, rate, j, usd)
