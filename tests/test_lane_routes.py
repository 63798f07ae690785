"""Lane and dispatch routes built as arrays (placement.lane_cells) are the routes a walk along
every lane, cell by cell, gives: the same routes in the same order in every stage trace of a
MoE plan with turns and relay stand-ins, and a lane crossing itself is named."""
import numpy as np
import pytest

from wse import hardware, isa
from wse.workload import dispatch, stages as stages_mod
from wse.workload.chain import chain_of, compressed
from wse.workload.compose import build_stage, stages
from wse.workload.decode import plan_model
from wse.workload.mesh import MeshBuilder, Region
from wse.workload.models import load_model
from wse.workload.params import DecodeParams
from wse.workload.placement import PlacementError, Slot, lane_sources, lane_targets
from wse.workload.stages import full_trace


def _walk(src, dst, sources, targets, ox, oy):
    """Lane -> (cells, out port, in port), one cell at a time."""
    a, b = src.region, dst.region
    out = {}
    for d, (sx, sy) in sources.items():
        x0, y0 = a.x0 + sx - ox, a.y0 + sy - oy
        x1, y1 = b.x0 + targets[d][0] - ox, b.y0 + targets[d][1] - oy
        if y0 == y1:
            step = 1 if x1 > x0 else -1
            port = isa.PORT_EAST if step > 0 else isa.PORT_WEST
            cells = [(x, y0) for x in range(x0, x1 + step, step)]
        else:
            assert x0 == x1
            step = 1 if y1 > y0 else -1
            port = isa.PORT_SOUTH if step > 0 else isa.PORT_NORTH
            cells = [(x0, y) for y in range(y0, y1 + step, step)]
        out[d] = (cells, port, isa.PORT_OPPOSITE[port])
    return out


def walk_lane_routes(builder, src, dst, sources, targets, color, ox=0, oy=0):
    xs, ys, rx, tx = [], [], [], []
    for cells, out_port, in_port in _walk(src, dst, sources, targets, ox, oy).values():
        for n, (x, y) in enumerate(cells):
            xs.append(x)
            ys.append(y)
            rx.append(isa.PORT_RAMP if n == 0 else in_port)
            tx.append(isa.tx_mask(isa.PORT_RAMP if n == len(cells) - 1 else out_port))
    builder.routes(xs, ys, color, rx, tx)


def walk_multicast(builder, slots, run, color, P, ox, oy):
    cells = {}
    for k, (s, t) in enumerate(run):
        src = lane_sources(slots[s], P, 0)
        for path, out_port, in_port in _walk(slots[s], slots[t], src, lane_targets(slots[s], slots[t], src, P),
                                             ox, oy).values():
            for n, xy in enumerate(path):
                if n == 0:
                    if k == 0:
                        rx, tx = isa.PORT_RAMP, isa.tx_mask(out_port)
                    else:
                        copy = isa.tx_mask(isa.PORT_RAMP) if slots[s].kind in ("experts", "relay") else 0
                        rx, tx = cells[xy][0], isa.tx_mask(out_port) | copy
                elif n == len(path) - 1:
                    rx, tx = in_port, isa.tx_mask(isa.PORT_RAMP)
                else:
                    rx, tx = in_port, isa.tx_mask(out_port)
                if n != 0 and xy in cells:
                    raise PlacementError(f"a dispatch lane crosses itself at {xy}")
                cells[xy] = (rx, tx)
    builder.routes([x for x, _ in cells], [y for _, y in cells], color, [v[0] for v in cells.values()],
                   [v[1] for v in cells.values()])


def _routes(plan):
    traces = [full_trace(plan)[0]] + [build_stage(plan, kind, ref).trace for _, kind, ref in stages(plan)]
    return [t.routes for t in traces]


def test_array_routes_are_the_walks_routes(monkeypatch):
    cfg = hardware.resolve("small", None, ["wafer.mesh_width=128", "wafer.mesh_height=128"])
    plan = plan_model(load_model("moe16"), cfg, DecodeParams(context=32, moe_mapping="regions",
                                                             experts_per_region=1))
    ch = chain_of(plan)
    elements = [e for g in ch.groups for e in compressed(plan, ch, g)]
    assert {e.way for e in elements} == {"east", "south", "west"} and any(e.relay for e in elements)
    assert any(r.d_out is not None for r in ch.roles.values())  # turns on another color
    built = _routes(plan)
    monkeypatch.setattr(dispatch, "_multicast", walk_multicast)
    monkeypatch.setattr(dispatch, "add_lane_routes", walk_lane_routes)
    monkeypatch.setattr(stages_mod, "add_lane_routes", walk_lane_routes)
    walked = _routes(plan)
    assert len(built) == len(walked) > 2
    for a, b in zip(built, walked):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_dispatch_lane_crossing_itself_is_named():
    a = Slot("layer", 0, Region(0, 0, 4, 4))
    b = Slot("experts", 0, Region(4, 0, 4, 4), experts=(0, 1))
    for multicast in (dispatch._multicast, walk_multicast):
        with pytest.raises(PlacementError, match=r"crosses itself at \(3, 0\)"):
            multicast(MeshBuilder(8, 4), [a, b], [(0, 1), (1, 0)], 0, 4, 0, 0)
