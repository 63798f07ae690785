"""The composition structure of a wafer's chain of slots, and the keys of its stage simulations.

Anchored regions (all but the expert regions of a MoE layer before its collector, dispatch.py)
end with a hand-off barrier whose anchor the composition is built on (compose.py). A wafer may
begin with the rest of a MoE layer whose layer region is on an earlier wafer (its *leading
part*) and end with a MoE layer whose experts continue on the next wafer (its *trailing part*);
stages simulate a leading part behind a *stand-in* for its layer region, a region of the same
shape that sends the dispatch and the combine as the wafer's input does.

Stage keys: stages with equal keys are identical traces, simulated once.
"""
from __future__ import annotations

import dataclasses

from .decode import ModelPlan, handoff_plan
from .dispatch import ExpertRole, Group, anchored, expert_roles, groups_of, transfer_colors
from .experts import plan_experts
from .ffn import chosen_experts, moe_experts
from .mesh import ALIGN_BYTES, Region
from .placement import Slot, direction


@dataclasses.dataclass(frozen=True)
class Chain:
    """A plan's groups, anchored slots, transfer colors and expert regions' roles."""

    groups: list[Group]
    anchored: list[int]  # slot indices
    colors: dict[int, int]  # anchored slot -> transfer color of its outgoing transition (-1: a stand-in)
    roles: dict[int, ExpertRole]  # expert slot -> its part in its layer's dispatch and combine
    standin: Slot | None  # the stand-in for the layer region of a leading part (west of slot 0)

    def next_anchored(self, u: int) -> int | None:
        i = self.anchored.index(u)
        return self.anchored[i + 1] if i + 1 < len(self.anchored) else None

    def group_led_by(self, u: int) -> Group | None:
        return next((g for g in self.groups if g.lead == u), None)

    @property
    def leading(self) -> Group | None:
        """The wafer's leading part (the rest of a layer whose layer region is on an earlier wafer)."""
        return next((g for g in self.groups if g.lead is None), None)

    @property
    def trailing(self) -> Group | None:
        """The wafer's trailing part (a layer whose experts continue on the next wafer)."""
        return next((g for g in self.groups if not g.closed and g.lead is not None), None)

    def lead_slot(self, plan: ModelPlan, g: Group) -> Slot:
        return plan.slots[g.lead] if g.lead is not None else self.standin


def chain_of(plan: ModelPlan) -> Chain:
    slots = plan.slots
    groups = groups_of(slots, plan.spec.moe.experts) if plan.spec.moe else []
    colors = transfer_colors(slots, groups)
    a = anchored(slots, groups)
    standin = None
    if slots[0].kind == "experts":
        r = slots[0].region
        standin = Slot("layer", slots[0].index, Region(r.x0 - plan.P, r.y0, plan.P, plan.Q))
    roles: dict[int, ExpertRole] = {}
    for g in groups:
        lead = slots[g.lead] if g.lead is not None else standin
        nxt = a.index(g.last) + 1 if g.closed else None
        t_out = colors[g.last] if nxt is not None and nxt < len(a) else None
        chain = [lead] + [slots[e] for e in g.experts]
        roles.update(zip(g.experts, expert_roles(chain, colors[g.lead if g.lead is not None else -1], t_out,
                                                 g.closed)))
    return Chain(groups, a, colors, roles, standin)


# ---- keys --------------------------------------------------------------------------------------


def bank_period(cfg) -> int:
    """Bytes by which shifting both operands' start addresses never changes the engine's bank
    conflict rule ((address // word) % banks % modulus)."""
    w, banks, m = cfg.sram_bank_word_bytes, cfg.sram_banks, cfg.sram_bank_conflict_modulus
    return w * (m if banks % m == 0 else banks)


def experts_key(plan: ModelPlan, slot: Slot) -> tuple:
    """What of an expert region's program its experts decide."""
    ep = plan_experts(plan.spec, slot.index, slot.experts, plan.P, plan.cfg, plan.params, plan.Q)
    use = ep.local_experts()
    period = bank_period(plan.cfg)
    if all(ep.shapes[k].tile_bytes() % period == 0 for k in ("gate_up", "down")) and ALIGN_BYTES % period == 0:
        # expert copies, and the weight blocks of regions holding more or fewer experts,
        # differ only by addresses the bank-conflict rule cannot tell apart (the activation
        # buffers sit below the weights), so neither the region's size nor which experts
        # run matters, only how many sequences each chosen expert serves
        return ("users", tuple(use.values()))
    return (slot.experts[1] - slot.experts[0], tuple(use.items()))


def region_key(plan: ModelPlan, slot: Slot, role: ExpertRole | None = None) -> tuple:
    """Regions with equal keys run identical programs (an expert region's role given without
    its output color: stages end at its anchor)."""
    spec = plan.spec
    if slot.kind == "experts":
        return ("experts", experts_key(plan, slot), role.last, role.barrier, role.d_out is not None)
    if slot.kind == "embedding":  # (which columns look the batch's tokens up)
        from .tables import token_columns
        return (slot.kind, slot.region.width, slot.region.height, slot.strip,
                tuple(token_columns(spec, slot.region.width, plan.params.token, plan.params.batch)))
    if slot.kind == "ffn":  # a split dense layer's FFN: the same in every such layer
        return ("ffn",)
    if slot.kind != "layer":
        return (slot.kind, slot.region.width, slot.region.height, slot.strip)
    moe = spec.is_moe_layer(slot.index)
    if moe and plan.expert_regions:  # router and shared experts only: the same in every MoE layer
        return ("layer", moe, "expert-regions", spec.attended(slot.index, plan.params.context))
    return ("layer", moe, tuple(moe_experts(spec, slot.index, plan.params.batch, plan.params.expert_skew).items())
            if moe else (), spec.attended(slot.index, plan.params.context), plan.split_ffn and not moe)


def key_A0(plan: ModelPlan) -> tuple:
    return ("A", plan.P, plan.Q, region_key(plan, plan.slots[0]))


def handoff_key(plan: ModelPlan, u: int | None) -> tuple:
    """What of region u's hand-off a stage standing in for it depends on beyond its size: a
    fused hand-off's FFN end (LayerPlan.handoff_key); nothing for a barrier."""
    lp = handoff_plan(plan, plan.slots[u] if u is not None else None)
    return lp.handoff_key() if lp else ()


def key_B(plan: ModelPlan, u: int | None) -> tuple:
    """Stage B_u runs only region u's hand-off (None: a stand-in's barrier): its size and how
    it hands off are all that matter."""
    r = plan.slots[u].region if u is not None else Region(0, 0, plan.P, plan.Q)
    return ("B", r.width, r.height) + handoff_key(plan, u)


def sender_key(plan: ModelPlan, u: int | None) -> tuple:
    """What of region u a stage S_u or G_u depends on: it runs only its hand-off and its lane
    sends (from the token's table column or the diagonal; None: a stand-in)."""
    if u is None:
        return ("standin", plan.P, plan.Q)
    s = plan.slots[u]
    table = s.kind == "embedding"
    return (table, s.region.width, s.region.height, plan.token_col if table else -1, s.strip) + handoff_key(plan, u)


def key_S(plan: ModelPlan, u: int, v: int) -> tuple:
    """Stage S_u's key: the slot shape, the sender, region v's key and the direction between
    them (region v runs without onward sends in every S stage, so whether it ends the chain
    does not matter)."""
    a, nxt = plan.slots[u], plan.slots[v]
    return ("S", plan.P, plan.Q, sender_key(plan, u), region_key(plan, nxt), direction(a.region, nxt.region))


# ---- compressed group stages -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Element:
    """One element of a compressed group stage after the layer region (or stand-in): an expert
    region kept (its slot index) or a relay standing in for one left out (the slot it replaces)."""

    slot: int
    relay: bool
    way: str  # direction from the previous element


def compressed(plan: ModelPlan, ch: Chain, g: Group) -> list[Element]:
    """The group's expert regions with those the batch did not choose on straight runs (not
    the last, no turn) replaced by relays: they pass the dispatch on and relay the combine, a
    pure delay (compose.py adds back the hops they span)."""
    slots, out = plan.slots, []
    chain = [ch.lead_slot(plan, g)] + [slots[e] for e in g.experts]
    for j, s in enumerate(g.experts, start=1):
        way = direction(chain[j - 1].region, chain[j].region)
        role = ch.roles[s]
        straight = not role.last and role.d_out is None and direction(chain[j].region, chain[j + 1].region) == way
        idle = not chosen_experts(plan.spec, slots[s].index, slots[s].experts, plan.params)
        out.append(Element(s, straight and idle, way))
    return out


def key_G(plan: ModelPlan, g: Group, delta: int | None = None) -> tuple:
    """A group stage's key: its sender (for a stand-in, how long after the dispatch it sends
    the combine) and its compressed elements."""
    ch = chain_of(plan)
    desc = tuple(("relay", e.way) if e.relay else (e.way, region_key(plan, plan.slots[e.slot], ch.roles[e.slot]))
                 for e in compressed(plan, ch, g))
    return ("G", plan.P, plan.Q, sender_key(plan, g.lead), delta, desc)
