"""Parallel expert dispatch: how a MoE layer's region reaches all its expert regions at once and
how their outputs come back (docs/workloads.md, "Expert regions").

A MoE layer with expert regions is a *group* of chain slots: its layer region L, then its expert
regions E_1 .. E_N; E_N is the group's *collector*. Two streams leave L's lane PEs (the diagonal)
after L's hand-off barrier and flow along the chain of slots:

- the **dispatch** (per lane: the FFN input chunk and the batch's gate values) is a fabric
  multicast: every expert region's lane PE takes a copy in passing (its route delivers to the
  ramp and forwards), so it reaches every expert region in one pass at wire speed. Only where
  the serpentine turns east-to-south or south-to-east would one color cross itself; there the
  region's lane PE stores the payload and resends it on the other dispatch color;
- the **combine** starts as L's residual stream and is a pipelined reduction: each expert region's
  lane PE forwards it, adding the gate-weighted outputs of the experts it ran (a chosen region
  does so once its experts are done; a region none of the batch chose forwards it at once, a
  receive-and-send relay). The collector adds its own, hands off (its barrier anchors the
  composition) and sends the layer's output to the next layer region.

Regions the batch did not choose therefore do no work on the token's path: the payload crosses
them at wire speed and the combine through one relay each. Chosen regions compute concurrently.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import isa
from .mesh import MeshBuilder
from .placement import PlacementError, Slot, add_lane_routes, direction, lane_cells, lane_sources, lane_targets
from .plan import COMBINE, DISPATCH_ALT, TRANSFER

TURNS_NEEDING_RELAY = {("east", "south"), ("south", "east")}  # one color would cross itself


@dataclasses.dataclass(frozen=True)
class ExpertRole:
    """How one expert region takes part in its layer's dispatch and combine."""

    d_in: int  # dispatch color arriving at the lane PEs
    d_out: int | None  # a turn: the lane PEs store the payload and resend it on this color
    c_in: int  # combine color arriving
    c_out: int | None  # combine color leaving (None: the last region of its layer on this wafer)
    t_out: int | None = None  # the collector's transfer color to the next region (None: none follows)
    barrier: bool = True  # the last region: the collector hands off; a wafer's boundary does not

    @property
    def last(self) -> bool:
        """The last region of its layer on this wafer: the collector or a wafer's boundary."""
        return self.c_out is None

    @property
    def collector(self) -> bool:
        return self.c_out is None and self.barrier


@dataclasses.dataclass(frozen=True)
class Group:
    """A MoE layer's layer region and its expert regions on one wafer: slot indices of its chain.

    A layer's experts may continue on the next wafer (the group is not *closed*: its last
    expert region is the wafer's boundary, not the collector) and a wafer may begin with the
    rest of a layer whose layer region is on an earlier wafer (no lead)."""

    lead: int | None  # the layer region (None: it is on an earlier wafer)
    experts: tuple[int, ...]  # its expert regions in chain order
    closed: bool = True  # the last is the layer's collector

    @property
    def last(self) -> int:
        return self.experts[-1]


def groups_of(slots: list[Slot], n_experts: int) -> list[Group]:
    """The groups of a wafer's chain: each MoE layer slot with the expert slots of its layer that
    follow it, and the expert slots a wafer begins with; a group is closed when its last expert
    region holds the layer's last routed expert (of n_experts)."""
    out, i, n = [], 0, len(slots)
    while i < n:
        slot = slots[i]
        if slot.kind == "experts":
            lead, j = None, i
        elif slot.kind == "layer" and i + 1 < n and slots[i + 1].kind == "experts" \
                and slots[i + 1].index == slot.index:
            lead, j = i, i + 1
        else:
            i += 1
            continue
        e = j
        while e < n and slots[e].kind == "experts" and slots[e].index == slots[j].index:
            e += 1
        out.append(Group(lead, tuple(range(j, e)), slots[e - 1].experts[1] == n_experts))
        i = e
    return out


def anchored(slots: list[Slot], groups: list[Group]) -> list[int]:
    """Slots whose hand-off anchors the composition: all but expert regions, and the collector
    of each closed group."""
    inner = {e for g in groups for e in (g.experts[:-1] if g.closed else g.experts)}
    return [s for s in range(len(slots)) if s not in inner]


def transfer_colors(slots: list[Slot], groups: list[Group]) -> dict[int, int]:
    """Transfer color of each anchored slot's outgoing transition: the two transfer colors
    alternate along the anchored chain, so a region's input and output never share one; a
    group's dispatch takes its layer region's color (-1: the layer region of a wafer's leading
    expert regions, on an earlier wafer)."""
    a = anchored(slots, groups)
    out = {s: TRANSFER[i % 2] for i, s in enumerate(a)}
    out[-1] = TRANSFER[1]
    return out


def expert_roles(chain: list[Slot], d0: int, t_out: int | None, closed: bool) -> list[ExpertRole]:
    """The roles of chain[1:], a layer's expert regions after its layer region (or a stand-in)
    chain[0]: the dispatch starts on color d0 and switches between d0 and DISPATCH_ALT at the
    turns that need it; the combine alternates between the COMBINE colors at every region; the
    last is the collector (sending on t_out) if `closed`, else a wafer's boundary."""
    roles = []
    d = d0
    for j in range(1, len(chain)):
        c_in = COMBINE[(j - 1) % 2]
        if j == len(chain) - 1:
            roles.append(ExpertRole(d, None, c_in, None, t_out if closed else None, closed))
            break
        into = direction(chain[j - 1].region, chain[j].region)
        out = direction(chain[j].region, chain[j + 1].region)
        d_out = None
        if (into, out) in TURNS_NEEDING_RELAY:
            d_out = DISPATCH_ALT if d == d0 else d0
        roles.append(ExpertRole(d, d_out, c_in, COMBINE[j % 2]))
        d = d_out if d_out is not None else d
    return roles


def add_group_routes(builder: MeshBuilder, slots: list[Slot], chain: list[int], roles: dict[int, ExpertRole],
                     d0: int, P: int, ox: int = 0, oy: int = 0) -> None:
    """Routes of a group's dispatch and combine along `chain` (slot indices: the layer region,
    then its expert regions or relay stand-ins in order). The combine runs region to region on
    alternating colors; the dispatch is one multicast route per lane and run of slots between
    turns that need a relay, delivering a copy at every expert region's lane PE."""
    for j, (s, t) in enumerate(zip(chain, chain[1:])):
        src = lane_sources(slots[s], P, 0)
        add_lane_routes(builder, slots[s], slots[t], src, lane_targets(slots[s], slots[t], src, P), COMBINE[j % 2],
                        ox, oy)
    run: list[tuple[int, int]] = []
    color = d0
    for s, t in zip(chain, chain[1:]):
        run.append((s, t))
        role = roles.get(t)  # (relay stand-ins have none: the dispatch passes them)
        turn = role is not None and role.d_out is not None
        if turn or t == chain[-1]:
            _multicast(builder, slots, run, color, P, ox, oy)
            color = role.d_out if turn else color
            run = []


def _cell_key(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A mesh cell as one integer (coordinates within +-2**20)."""
    return ((y + (1 << 20)) << 21) + (x + (1 << 20))


def _multicast(builder: MeshBuilder, slots: list[Slot], run: list[tuple[int, int]], color: int, P: int,
               ox: int, oy: int) -> None:
    """One route per lane along a run of segments: the first cell takes the sender's ramp, every
    junction at an expert region's lane PE forwards and delivers to its ramp, the last delivers.

    Built as arrays, cells in the order a walk along the run's segments and lanes first reaches
    them: a junction (a segment's first cell after the first segment) keeps its place and its
    receive port and takes the forward (and, at an expert region, the copy to its ramp) as its
    transmit set; a cell past a lane's first reached a second time is a lane crossing itself."""
    xs, ys, rxs, txs, firsts, junctions = [], [], [], [], [], []
    for k, (s, t) in enumerate(run):
        src = lane_sources(slots[s], P, 0)
        x, y, n, last, out_port, in_port = lane_cells(slots[s], slots[t], src,
                                                      lane_targets(slots[s], slots[t], src, P), ox, oy)
        rx = np.where(n == 0, isa.PORT_RAMP, in_port)
        tx = np.left_shift(1, np.where(last & (n != 0), isa.PORT_RAMP, out_port))
        keep = n != 0 if k else np.ones(n.size, dtype=bool)
        if k:
            copy = isa.tx_mask(isa.PORT_RAMP) if slots[s].kind in ("experts", "relay") else 0
            head = n == 0
            junctions.append((x[head], y[head], tx[head] | copy))
        xs.append(x[keep])
        ys.append(y[keep])
        rxs.append(rx[keep])
        txs.append(tx[keep])
        firsts.append(n[keep] == 0)
    x, y, rx, tx, first = (np.concatenate(a) for a in (xs, ys, rxs, txs, firsts))
    key = _cell_key(x, y)
    order = np.argsort(key, kind="stable")
    ks = key[order]
    again = np.zeros(key.size, dtype=bool)  # reached before
    again[order[1:]] = ks[1:] == ks[:-1]
    crossing = np.nonzero(again & ~first)[0]
    if crossing.size:
        c = int(crossing[0])
        raise PlacementError(f"a dispatch lane crosses itself at {(int(x[c]), int(y[c]))}")
    # a cell reached again is a lane's first cell in the first segment: the later one's route, the first's place
    group_start = np.ones(ks.size, dtype=bool)
    group_start[1:] = ks[1:] != ks[:-1]
    gid = np.cumsum(group_start) - 1
    place = order[group_start]
    latest = np.zeros(place.size, dtype=np.int64)
    np.maximum.at(latest, gid, order)
    rx, tx = rx[latest], tx[latest]
    uniq = ks[group_start]
    for jx, jy, jtx in junctions:
        jk = _cell_key(jx, jy)
        at = np.searchsorted(uniq, jk)
        if np.any(at >= uniq.size) or np.any(uniq[np.minimum(at, uniq.size - 1)] != jk):
            raise PlacementError("a dispatch junction is not the end of the segment before")
        tx[at] = jtx
    by_place = np.argsort(place, kind="stable")
    builder.routes(x[place[by_place]], y[place[by_place]], color, rx[by_place], tx[by_place])
