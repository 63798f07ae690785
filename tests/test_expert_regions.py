"""Expert parallelism with parallel dispatch: a MoE layer's routed experts in expert regions
after its layer region; the dispatch reaches them all in one multicast pass, the chosen ones
run concurrently, and the combine collects their gate-weighted outputs on its way to the
collector (docs/workloads.md, "Expert regions").

The composed step must equal the full simulation counter for counter, also with compressed
stages and across wafers; idle regions must cost only the crossing; the two inputs of a wafer
that continues a layer must compose by max-plus.
"""
import pytest

from checked import COUNTERS, run, standin_work
from wse import hardware
from wse.errors import WseError
from wse.system.config import load_system
from wse.system.wafers import run_decode, wafer_plans
from wse.workload.chain import bank_period, chain_of, compressed, experts_key
from wse.workload.compose import compose, stages
from wse.workload.decode import chain_elements, plan_model
from wse.workload.experts import experts_flops, plan_experts
from wse.workload.ffn import moe_experts
from wse.workload.mesh import split
from wse.workload.models import load_model
from wse.workload.params import DecodeParams
from wse.workload.stages import full_trace


def assert_composed_equals_full(plan, cfg, full=None, minus=None):
    """Cycles and every summed counter; `minus` (counter -> value) is taken from the full trace
    (a stand-in's own work)."""
    full = full or run(full_trace(plan)[0], cfg)
    d = compose(plan, lambda t: run(t, cfg))
    minus = minus or {}
    for c in COUNTERS:
        assert d.total(c) == int(full.pe(c).sum()) - minus.get(c, 0), c
    assert d.link_total("wavelets") == int(full.link("wavelets").sum()) - minus.get("hops", 0)
    return d, full


def test_chain_puts_expert_groups_after_each_moe_layer():
    spec = load_model("tiny-moe")  # 4 routed experts, both layers MoE
    assert chain_elements(spec, 0, 2, 0) == [("layer", 0, None), ("layer", 1, None)]
    assert chain_elements(spec, 1, 1, 3) == [("layer", 1, None), ("experts", 1, (0, 2)), ("experts", 1, (2, 4))]
    ds = load_model("deepseek-v3")  # three dense layers first: no expert regions there
    chain = chain_elements(ds, 2, 2, 100)
    assert chain[0] == ("layer", 2, None) and chain[1] == ("layer", 3, None)
    assert [c[2] for c in chain[2:]] == [(0, 86), (86, 171), (171, 256)]


@pytest.mark.parametrize("kw", [dict(batch=1, context=16, experts_per_region=1),
                                dict(batch=3, context=20, experts_per_region=3),
                                dict(batch=2, context=16, expert_skew=1.5, experts_per_region=1),
                                dict(batch=2, context=16)])
def test_composed_step_equals_the_full_simulation(kw, small):
    plan = plan_model(load_model("tiny-moe"), small, DecodeParams(moe_mapping="regions", **kw))
    per = kw.get("experts_per_region") or 4
    assert plan.experts_per_region == per
    assert [s.kind for s in plan.slots].count("experts") == 2 * -(-4 // per)
    trace, builds = full_trace(plan)
    d, full = assert_composed_equals_full(plan, small)
    assert d.total_cycles == full.total_cycles
    # the analytic FLOPs of each region, and the weights exactly once
    assert int(full.pe("flops").sum()) == sum(sum(b.flops.values()) for b in builds)
    assert sum(b.weight_bytes for b in builds) == 2 * plan.spec.total_params()
    assert sum(d.holds.values()) == d.total_cycles


@pytest.mark.parametrize("mesh,kw", [(128, dict(experts_per_region=1)),
                                     (128, dict(experts_per_region=2, batch=3, expert_skew=1.0)),
                                     (96, dict(experts_per_region=3, slot_shape="square")),
                                     (128, dict(experts_per_region=2, batch=2, attention="classic")),
                                     # expert gate/up tiles by output (--gemv-form auto), 8-bit weights
                                     (128, dict(experts_per_region=2, batch=2, weights="fp8", gemv_form="auto"))])
def test_sixteen_experts_on_a_128_mesh_compose_counter_for_counter(mesh, kw):
    """A MoE model with 16 routed experts per layer on 96..128-PE meshes: up to 16 expert
    regions per layer over several bands (turns of every kind, relayed dispatch, compressed
    stages with idle regions left out), composed exactly; with the classic attention too."""
    cfg = hardware.resolve("small", None, [f"wafer.mesh_width={mesh}", f"wafer.mesh_height={mesh}"])
    plan = plan_model(load_model("moe16"), cfg, DecodeParams(context=32, moe_mapping="regions", **kw))
    ch = chain_of(plan)
    assert len(ch.groups) == 2 and all(len(g.experts) == -(-16 // kw["experts_per_region"]) for g in ch.groups)
    if kw["experts_per_region"] == 1:
        assert any(e.relay for g in ch.groups for e in compressed(plan, ch, g))
        assert any(ch.roles[e].d_out is not None for g in ch.groups for e in g.experts)
    d, full = assert_composed_equals_full(plan, cfg)
    assert d.total_cycles == full.total_cycles


def test_each_expert_region_runs_the_experts_chosen_among_its_own(small):
    spec = load_model("tiny-moe")
    params = DecodeParams(batch=1, moe_mapping="regions", experts_per_region=1)
    chosen = moe_experts(spec, 0, 1)  # two routed experts (and the shared one, in the layer region)
    idle = active = 0
    for e in range(4):
        ep = plan_experts(spec, 0, (e, e + 1), 16, small, params)
        executed, model = experts_flops(ep)
        if e in chosen:
            active += 1
            assert ep.local_experts() == {0: chosen[e]} and model > 0
            assert executed["combine"] == spec.hidden_size  # its outputs added into the combine once
        else:
            idle += 1
            assert ep.local_experts() == {} and model == 0 and executed["ffn"] == executed["combine"] == 0
    assert (active, idle) == (2, 2)


def _tag_ends(result, plan, what):
    names = list(result.ops["name"])
    out = []
    for s in plan.slots:
        if s.kind == "experts" and s.index == 1:
            out.append(int(result.ops["end_cycle"][names.index(f"layer 1 experts {s.experts[0]}-{s.experts[1] - 1} "
                                                                f"{what}")]))
    return out


def test_the_dispatch_is_one_multicast_pass_and_idle_regions_only_relay_the_combine():
    """On a straight run the payload reaches each next expert region exactly P hops later (no
    store and forward), every lane PE takes one copy, and once past the critical region the
    combine crosses each region in P hops plus one relay (a ramp down and one up)."""
    cfg = hardware.resolve("small", None, ["wafer.mesh_width=128", "wafer.mesh_height=128"])
    spec = load_model("moe16")
    plan = plan_model(spec, cfg, DecodeParams(context=32, moe_mapping="regions", experts_per_region=1))
    full = run(full_trace(plan)[0], cfg)
    ch = chain_of(plan)
    g = ch.groups[0]  # layer 1, batch 1: two chosen experts, the other regions idle
    hop, ramp, P = cfg.hop_latency_cycles, cfg.ramp_latency_cycles, plan.P
    arrive, relay = _tag_ends(full, plan, "input"), _tag_ends(full, plan, "combine")
    elements = compressed(plan, ch, g)

    def idle(k):  # a region the batch did not choose, that only takes its copy of the payload
        s = plan.slots[g.experts[k]]
        return ch.roles[g.experts[k]].d_out is None and not plan_experts(
            spec, 1, s.experts, P, cfg, plan.params, plan.Q).local_experts()

    straight = [k for k in range(1, len(g.experts) - 1) if elements[k].way == elements[k - 1].way != "south"
                and idle(k) and idle(k - 1)]
    assert straight
    for k in straight:
        assert arrive[k] - arrive[k - 1] == P * hop
    after = [k for k in straight if k > 3]
    assert after
    for k in after:
        assert relay[k] - relay[k - 1] == P * hop + 2 * ramp
    # one copy of the payload at each lane PE of an idle region, the combine received and sent once
    Hc = split(spec.hidden_size, P)
    k_ = spec.moe.experts_per_token
    for k in after:
        r = plan.slots[g.experts[k]].region
        for d in range(P):
            x, y = r.x0 + d, r.y0 + d
            assert full.pe("wavelets_received")[y, x] == (Hc[d] + k_) + Hc[d]
            assert full.pe("wavelets_sent")[y, x] == Hc[d]


def test_an_idle_region_holds_the_token_only_for_its_crossing():
    cfg = hardware.resolve("small", None, ["wafer.mesh_width=128", "wafer.mesh_height=128"])
    spec = load_model("moe16")
    plan = plan_model(spec, cfg, DecodeParams(context=32, moe_mapping="regions", experts_per_region=1))
    d = compose(plan, lambda t: run(t, cfg))
    ch = chain_of(plan)
    crossing = {"east": plan.P, "west": plan.P, "south": plan.Q}
    for g in ch.groups:
        elements = compressed(plan, ch, g)
        chosen = [k for k, e in enumerate(elements) if plan_experts(
            spec, plan.slots[e.slot].index, plan.slots[e.slot].experts, plan.P, cfg, plan.params,
            plan.Q).local_experts()]
        for k, e in enumerate(elements[:-1]):
            if k < chosen[0]:
                assert d.holds[e.slot] == crossing[e.way] * cfg.hop_latency_cycles
            elif k > chosen[-1]:
                assert d.holds[e.slot] == crossing[e.way] * cfg.hop_latency_cycles + 2 * cfg.ramp_latency_cycles
        # the layer's expert phase is shared out over its regions exactly
        lead, last = d.at[g.lead], d.at[g.last]
        assert sum(d.holds[s] for s in g.experts) == last - lead


def test_auto_keeps_local_experts_where_they_fit_and_falls_back_to_regions(small):
    spec = load_model("tiny-moe")
    assert plan_model(spec, small, DecodeParams(batch=2)).experts_per_region == 0
    tight = small.with_overrides(["wafer.mesh_width=96", "wafer.mesh_height=48", "sram.sram_bytes=2112",
                                  "sram.sram_reserved_bytes=0"])
    with pytest.raises(WseError, match="found no slot size"):
        plan_model(spec, tight, DecodeParams(context=8, moe_mapping="local", tables="slots"))
    # (with the tables in strips the local experts fit; --tables auto tries strips only where
    # neither mapping places with table slots)
    assert plan_model(spec, tight, DecodeParams(context=8, moe_mapping="local")).slots[0].strip
    plan = plan_model(spec, tight, DecodeParams(context=8))
    assert plan.experts_per_region == 4 and [s.kind for s in plan.slots].count("experts") == 2
    composed = compose(plan, lambda t: run(t, tight))
    assert composed.total_cycles == run(full_trace(plan)[0], tight).total_cycles


def test_bad_mapping_options_are_named():
    with pytest.raises(WseError, match="--moe-mapping 'experts' is not one of auto, local, regions"):
        DecodeParams(moe_mapping="experts")
    with pytest.raises(WseError, match="--experts-per-region -2 must be at least 0"):
        DecodeParams(experts_per_region=-2)
    with pytest.raises(WseError, match="--moe-mapping regions: tiny has no MoE layer"):
        plan_model(load_model("tiny"), hardware.load_preset("small"), DecodeParams(moe_mapping="regions"))


def test_expert_regions_running_different_experts_alike_share_a_simulation(small):
    """Tile copies sit a multiple of the bank period apart and the activation buffers below the
    weights, so regions running different experts, or holding more or fewer, for the same
    number of sequences simulate alike, counter for counter, and share a key."""
    from engine_compare import assert_same
    from wse.workload.dispatch import ExpertRole
    from wse.workload.experts import decode_experts
    from wse.workload.mesh import MeshBuilder, Region
    spec = load_model("tiny-moe")
    params = DecodeParams(batch=1, moe_mapping="regions", experts_per_region=4)
    plan = plan_model(spec, small, params)
    results = []
    # layer 0 runs experts 0 and 3, layer 1 runs 0 and 2 (batch 1); the collector role, its
    # combine arriving at once from a sender of the test's own
    role = ExpertRole(20, None, 23, None)
    assert list(moe_experts(spec, 0, 1))[:2] == [0, 3] and list(moe_experts(spec, 1, 1))[:2] == [0, 2]
    for layer, experts in ((0, (0, 4)), (1, (0, 4)), (1, (0, 3))):
        ep = plan_experts(spec, layer, experts, 8, small, params)
        assert ep.shapes["gate_up"].tile_bytes() % bank_period(small) == 0
        assert list(ep.local_experts().values()) == [1, 1]
        b = MeshBuilder(9, 8, 4)
        decode_experts(ep, Region(1, 0, 8, 8), b, role, "region")
        for d in range(8):  # the dispatch and combine of lane d from PE (0, d) along row d
            b.routes(list(range(d + 2)), [d] * (d + 2), 20, [4] + [3] * (d + 1), [4] + [4] * d + [16])
            b.routes(list(range(d + 2)), [d] * (d + 2), 23, [4] + [3] * (d + 1), [4] + [4] * d + [16])
        from wse.trace import send
        for d in range(8):
            hi = ep.Hc[d]
            b.pe_program[d, 0, 0] = b.program([send(20, hi + 2, 0), send(23, hi, 0)])
        results.append(run(b.build(), small))
    assert experts_key(plan, plan.slots[2]) == ("users", (1, 1))
    assert_same(results[0], results[1], "experts 0, 3 against experts 0, 2")
    assert_same(results[0], results[2], "experts 0, 3 of 4 against experts 0, 2 of 3")


# ---- across wafers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wafers,kw", [(3, dict(batch=2)), (5, dict(batch=1)), (4, dict(batch=2, expert_skew=1.0))])
def test_wafers_continuing_a_layer_compose_exactly(wafers, kw):
    """A layer's experts cut over wafers: each wafer's composed step equals its full trace (a
    wafer continuing a layer holds a stand-in for its input, the combine `delta` after the
    dispatch, the soonest or later), its two outputs (the dispatch and the combine so far)
    included."""
    wide = hardware.resolve("small", None, ["wafer.mesh_width=128"])
    spec = load_model("tiny-moe")
    system = load_system("cs3x4", ['system.wafer="small"'])
    params = DecodeParams(context=16, moe_mapping="regions", experts_per_region=1, **kw)
    plans = wafer_plans(spec, system, params, wafers)
    assert any(chain_of(p).leading for p in plans)
    for plan in plans:
        ch = chain_of(plan)
        for delta in ((None, 300) if ch.leading else (None,)):
            minus, b0 = standin_work(plan, wide, delta) if ch.leading else ({}, 0)
            full = run(full_trace(plan, delta)[0], wide)
            d = compose(plan, lambda t: run(t, wide), delta=delta)
            for c in COUNTERS:
                assert d.total(c) == int(full.pe(c).sum()) - minus.get(c, 0), c
            assert d.link_total("wavelets") == int(full.link("wavelets").sum()) - minus.get("hops", 0)
            if "end" in d.outputs:
                assert d.total_cycles == full.total_cycles - b0
            if ch.trailing or (ch.leading and not ch.leading.closed):
                g = ch.trailing or ch.leading
                s = plan.slots[g.last]
                name = f"layer {s.index} experts {s.experts[0]}-{s.experts[1] - 1}"
                names = list(full.ops["name"])
                assert d.outputs["d"] == int(full.ops["end_cycle"][names.index(name + " input")]) - b0
                assert d.outputs["c"] == int(full.ops["end_cycle"][names.index(name + " combine")]) - b0


def test_a_late_combine_holds_the_collector_up_by_exactly_its_delay():
    """Once the combine comes after the part's experts are done, every further cycle of delta is
    a cycle more for the wafer, exactly; a delta sooner than the stand-in can send is clamped."""
    from wse.workload.stages import standin_delta
    spec = load_model("tiny-moe")
    system = load_system("cs3x4", ['system.wafer="small"'])
    plans = wafer_plans(spec, system, DecodeParams(context=16, moe_mapping="regions", experts_per_region=1,
                                                   batch=2), 3)
    plan = plans[1]
    assert chain_of(plan).leading.closed
    wide = hardware.resolve("small", None, ["wafer.mesh_width=128"])
    step = {delta: compose(plan, lambda t: run(t, wide), delta=delta).total_cycles for delta in (2000, 2500, 4000)}
    assert step[2500] - step[2000] == 500 and step[4000] - step[2500] == 1500
    soonest = standin_delta(plan, None)
    assert standin_delta(plan, 1) == soonest and standin_delta(plan, soonest + 5) == soonest + 5


def test_a_late_combine_starts_the_wafers_critical_path_at_its_arrival():
    """Where the combine from the wafer before decides the collector, the wafer's regions hold
    the token from the combine's arrival (the wait before it is the wafer before's and the
    link's): every region is crossed by the combine and the holds sum to the step less delta.
    Where its own experts decide, the holds cover the whole step from the dispatch."""
    spec = load_model("tiny-moe")
    system = load_system("cs3x4", ['system.wafer="small"'])
    plan = wafer_plans(spec, system, DecodeParams(context=16, moe_mapping="regions", experts_per_region=1,
                                                  batch=2), 3)[1]
    wide = hardware.resolve("small", None, ["wafer.mesh_width=128"])
    late = compose(plan, lambda t: run(t, wide), delta=4000)
    assert late.lead_c == 4000 and sum({**late.holds, **late.holds_c}.values()) == late.total_cycles - 4000
    assert sum(late.holds.values()) == late.total_cycles  # (from the dispatch: the wafer's occupancy)
    g, cfg = chain_of(plan).leading, plan.cfg
    crossing = {e.slot: (plan.P if e.way in ("east", "west") else plan.Q) for e in compressed(plan, chain_of(plan), g)}
    for e in g.experts[:-1]:
        assert late.holds_c[e] == crossing[e] * cfg.hop_latency_cycles + 2 * cfg.ramp_latency_cycles
    soon = compose(plan, lambda t: run(t, wide))
    assert soon.lead_c == 0 and soon.holds_c is None and sum(soon.holds.values()) == soon.total_cycles


def test_deltas_are_predicted_from_the_wafer_before(small):
    """A wafer continuing a layer is composed with the delta the timeline gives it; on a chain the
    prediction from the wafer before's own stages is right, so no stage is simulated twice.

    And on the critical path each wafer's span starts where its deciding input arrives and ends
    where the output the next wafer waits for leaves, so the spans (here: wafers inside one
    layer's experts, a combine deciding a collector, a dispatch deciding the next wafer) and
    every link's latency between them fit in the token's latency (found: a wafer continuing a
    layer counted the wait for the combine that the wafer before also counted)."""
    spec = load_model("tiny-moe")
    system = load_system("cs3x4", ['system.wafer="small"'])
    params = DecodeParams(context=16, moe_mapping="regions", experts_per_region=1, batch=2)
    calls = []

    def counted(t):
        calls.append(1)
        return run(t, small)

    r = run_decode(spec, system, params, 5, counted)
    assert sum(s.cycles for s in r.steps) / r.clock_hz + 4 * system.link_latency_s <= r.latency_s + 1e-12
    assert all(sum(s.region_cycles) == s.cycles for s in r.steps)
    keys = set()
    line_deltas = {}
    from wse.system.link import Link, Network
    from wse.system.wafers import Timeline
    plans = wafer_plans(spec, system, params, 5)
    net = Network("chain", 5, Link(system.link_bytes_per_s, system.link_latency_s))
    line = Timeline(spec, params, net, small.clock_hz)
    for w, plan in enumerate(plans):
        delta = line.delta() if chain_of(plan).leading else None
        line_deltas[w] = delta
        keys |= {k for k, _, _ in stages(plan, delta)}
        line.add(w, compose(plan, lambda t: run(t, small), delta=delta))
    assert len(calls) == len(keys)
    # each simulation is counted once, for the first wafer needing it (leading stages included:
    # they start as their wafer before's trailing stage comes in, not after every other stage)
    seen, first = set(), []
    for w, plan in enumerate(plans):
        new = {k for k, _, _ in stages(plan, line_deltas[w])} - seen
        seen |= new
        first.append(len(new))
    assert [s.simulations for s in r.steps] == first and sum(first) == len(keys)
    assert any(first[w] and chain_of(plan).leading for w, plan in enumerate(plans))


def test_a_layer_over_wafers_on_a_system(small):
    spec = load_model("tiny-moe")
    params = DecodeParams(batch=2, context=16, moe_mapping="regions", experts_per_region=1)
    for topology in ("chain", "switch"):
        system = load_system("cs3x4", ['system.wafer="small"', f'system.topology="{topology}"'])
        d = run_decode(spec, system, params, 5, lambda t: run(t, small))
        assert sum(d.ledger.sent) == sum(d.ledger.received) == sum(n for *_, n, _, _ in d.ledger.log)
        for s in d.steps:
            assert sum(s.region_cycles) == s.cycles
        act, disp = 2 * spec.hidden_size * 2, 2 * (spec.hidden_size + spec.moe.experts_per_token) * 2
        # every crossing is a residual stream (or a combine so far) or a dispatch, each arriving
        # after it left; a chain only ever links neighbours
        assert {n for *_, n, _, _ in d.ledger.log} == {act, disp}
        assert all(t1 > t0 for *_, t0, t1 in d.ledger.log)
        if topology == "chain":
            assert all(b == a + 1 for a, b, *_ in d.ledger.log)
        if topology == "switch":
            switch = d
        else:
            chain = d
    # through a switch a layer's dispatch goes to its later wafers directly: never later
    assert switch.latency_s <= chain.latency_s


def test_a_topology_the_links_cannot_express_is_named():
    with pytest.raises(WseError, match="system.topology = 'torus' is not one of chain, switch"):
        load_system("cs3", ['system.topology="torus"'])
    with pytest.raises(WseError, match="links_per_wafer"):
        load_system("cs3", ["system.links_per_wafer=0"])


def test_the_critical_path_walks_back_through_the_inputs_that_decide():
    """_critical_path on hand-made wafer steps: a wafer whose own layer region ends it takes its
    combine input's arrival as its start whatever the next wafer waits for; a wafer inside one
    layer's experts passes the dispatch straight on; on a switch the wafers a dispatch bypasses
    are off the path."""
    from types import SimpleNamespace as NS
    from wse.system.wafers import _critical_path

    def step(inputs, anchored, lead_c=0, outputs=None, holds_c=None, holds_d=None):
        return NS(inputs=inputs, anchored=anchored, lead_c=lead_c, outputs=outputs or {"end": 100},
                  holds={0: 50, 1: 50}, holds_c=holds_c, holds_d=holds_d)
    plans = [NS(slots=[0, 1])] * 4
    hz = 1.0
    system = NS(topology="chain")
    # 0: a layer region sending the dispatch (d) and the combine (c); 1: its experts, ending the layer
    # and sending a dispatch on (its combine decided: lead 30); 2: experts only; 3: the rest
    steps = [step("in", [1], outputs={"d": 80, "c": 100}),
             step("dc", [1], lead_c=30, outputs={"d": 90, "c": 120}, holds_c={0: 10}, holds_d={1: 20}),
             step("dc", [], lead_c=5, outputs={"d": 40, "c": 70}, holds_c={0: 1}, holds_d={0: 15, 1: 25}),
             step("dc", [1], lead_c=0)]
    times = [(0, 100), (200, 320), (500, 570), (700, 800)]
    spans, holds = _critical_path(plans, steps, times, hz, system)
    # wafer 3's own experts decide (lead 0): it waits for wafer 2's dispatch, which passes straight
    # through 2 from wafer 1's dispatch; wafer 1 starts at its combine's arrival: wafer 0's combine
    assert spans == [(0, 100), (230, 290), (500, 540), (700, 800)]
    assert holds[1] == [10, 20] and holds[2] == [15, 25] and holds[0] == [50, 50]
    # on a switch, wafer 3's dispatch comes from wafer 1 (the last anchored) directly: wafer 2 is off
    spans, holds = _critical_path(plans, steps, times, hz, NS(topology="switch"))
    assert spans[2] == (500, 500) and holds[2] == [0, 0] and spans[1] == (230, 290)


@pytest.mark.parametrize("model,preset", [("tiny-moe", "small"), ("kimi-k2", "wse3"), ("gpt-oss-120b", "wse3")])
def test_most_experts_is_the_largest_count_that_fits(model, preset):
    """experts._most_experts (a guess from two experts' SRAM, checked, then a narrowed binary
    search) equals the plain binary search over plan_experts, fits at its answer and not one more."""
    from wse.workload.experts import _most_experts
    from wse.workload.plan import FitError
    spec, cfg = load_model(model), hardware.load_preset(preset)
    layer = next(layer for layer in range(spec.layers) if spec.is_moe_layer(layer))

    def fits(n, P, Q, params):
        try:
            plan_experts(spec, layer, (0, n), P, cfg, params, Q)
            return True
        except FitError:
            return False

    between = 0
    for weights in ("bf16", "int4"):
        params = DecodeParams(weights=weights, batch=2)
        for P, Q in ((2, 2), (3, 3), (4, 4), (33, 66), (76, 130), (190, 293)):
            if P > spec.hidden_size:
                continue
            lo, hi = 0, spec.moe.experts
            while lo < hi:
                n = (lo + hi + 1) // 2
                lo, hi = (n, hi) if fits(n, P, Q, params) else (lo, n - 1)
            got = _most_experts(spec, layer, P, cfg, params, Q)
            assert got == lo and (got == 0 or fits(got, P, Q, params))
            assert got == spec.moe.experts or not fits(got + 1, P, Q, params)
            between += 0 < got < spec.moe.experts
    assert between >= 2
