"""Placing a whole model on a wafer: region slots, the region chain and the lanes between.

The wafer is tiled with slots of P columns and Q rows (Q >= P; square by default) in bands of
Q rows; bands run alternately east and west
(a serpentine), so consecutive regions always touch. The chain is: the embedding (k_e slots
wide), the layers (one slot each; with expert parallelism a MoE layer's slot is followed by its
expert regions, one slot each), the LM head (k_h slots wide). A token's activations flow
along the chain; between consecutive regions lane d carries hidden chunk d on its own straight
row or column, all lanes of a transition on one color (alternating between two colors along
the chain, so neighbouring transitions never share a route). With table strips (--tables) the
embedding and the LM head are instead strips as wide as the mesh above and below the bands, and
their lanes cross the strip's edge on their columns (strip_rows).
"""
from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from .. import isa
from ..errors import WseError
from ..runs import positions
from .mesh import MeshBuilder, Region, offsets, split


class PlacementError(WseError):
    """The regions cannot be placed on the wafer with this slot size."""


@dataclasses.dataclass(frozen=True)
class Slot:
    kind: str  # embedding, layer, ffn (a split layer's FFN), experts, lm_head (relay: a compressed stage's stand-in)
    index: int  # layer index (embedding -1, LM head = layers)
    region: Region
    experts: tuple[int, int] | None = None  # an expert region's routed experts [first, last)
    strip: tuple[tuple[int, int], ...] | None = None  # a table strip: each lane's first and last row (strip_rows)


SQUARE_KINDS = ("layer", "ffn", "experts")  # P x Q slot regions whose lanes enter and leave on the diagonal


def strip_rows(hidden: int, P: int, rows: int) -> tuple[tuple[int, int], ...]:
    """Each lane's (first, last) row in a table strip of `rows` rows: lane d carries chunk d of
    split(hidden, P), row j holds chunk j of split(hidden, rows); PlacementError if a lane
    would span more than two rows (its two parts meet over one hop)."""
    if not 1 <= rows <= P:
        raise PlacementError(f"a table strip of {rows} rows for {P} lanes: it needs 1 to {P}")
    if rows < P and hidden // rows < -(-hidden // P):
        raise PlacementError(f"a table strip of {rows} rows: its rows ({hidden // rows} elements) are shorter "
                             f"than the lanes ({-(-hidden // P)})")
    lane0, row0 = offsets(split(hidden, P)), offsets(split(hidden, rows)) + [hidden]
    out = []
    for d, n in enumerate(split(hidden, P)):
        first = bisect.bisect_right(row0, lane0[d]) - 1
        out.append((first, bisect.bisect_right(row0, lane0[d] + n - 1) - 1))
    return tuple(out)


def serpentine(n_layers: int, k_embed: int, k_head: int, P: int, width: int, height: int,
               first_layer: int = 0, chain: list[tuple[str, int, tuple[int, int] | None]] | None = None,
               Q: int | None = None, strips: tuple[int, int] | None = None, hidden: int = 0) -> list[Slot]:
    """Slots of the chain on a width x height mesh of P x Q slots (PlacementError if it fails).

    The embedding and the LM head are k slots wide and P rows tall, at the top of their band
    (lanes run on rows 0..P-1). With `strips` = (embedding rows, LM head rows) they are
    instead strips as wide as the mesh (k_embed and k_head unused; 0 rows: not held): the
    embedding above the first band, the LM head below the band of the chain's last region;
    lanes cross a strip's edge on their columns (strip_rows, for a hidden size `hidden`).

    k_embed = 0 leaves the embedding out and k_head = 0 the LM head (a wafer holding only a
    group of layers of a model split over several wafers); layers are numbered from first_layer.
    `chain` lists the one-slot elements between them as (kind, layer, experts) when it is not
    just the layers (expert regions, decode.chain_elements).
    """
    if chain is None:
        chain = [("layer", first_layer + k, None) for k in range(n_layers)]
    n_layers = len(chain)
    Q = Q or P
    top = strips[0] if strips else 0
    if strips:
        k_embed = k_head = 0
    nx, ny = width // P, (height - top) // Q
    if nx < 1 or ny < 1:
        raise PlacementError(f"a {P}x{Q} slot does not fit the {width}x{height} mesh")
    if k_embed >= nx:
        raise PlacementError(f"the embedding needs {k_embed} slots of {P}x{P}; a band holds {nx}, "
                             f"leaving none for the first layer beside it")
    slots = [Slot("embedding", -1, Region(0, 0, k_embed * P, P))] if k_embed else []
    if top:
        slots = [Slot("embedding", -1, Region(0, 0, width, top), strip=strip_rows(hidden, P, top))]
    band, col = 0, k_embed  # next free slot; band 0 runs east

    def advance(b: int, c: int) -> tuple[int, int]:
        east = b % 2 == 0
        c2 = c + 1 if east else c - 1
        if 0 <= c2 < nx:
            return b, c2
        return b + 1, c  # turn: the slot below

    for k, (kind, layer, experts) in enumerate(chain):
        if band >= ny:
            raise PlacementError(f"{n_layers} regions do not fit: {nx * ny} slots of {P}x{Q}, "
                                 f"{k_embed} + {n_layers} + {k_head} needed")
        slots.append(Slot(kind, layer, Region(col * P, top + band * Q, P, Q), experts))
        if k < n_layers - 1:
            band, col = advance(band, col)
    if strips and strips[1]:
        y = top + (band + 1) * Q
        if y + strips[1] > height:
            raise PlacementError(f"the LM head strip ({strips[1]} rows) does not fit below the last band "
                                 f"({height - y} rows left)")
        return slots + [Slot("lm_head", chain[-1][1] + 1, Region(0, y, width, strips[1]),
                             strip=strip_rows(hidden, P, strips[1]))]
    if not k_head:
        return slots
    # the LM head continues the band if there is room, else starts below the last layer
    east = band % 2 == 0
    room = (nx - 1 - col) if east else col
    if room >= k_head:
        c0 = col + 1 if east else col - k_head
        b = band
    else:
        b = band + 1
        east_next = b % 2 == 0
        c0 = col if east_next else col - k_head + 1
        if c0 < 0 or c0 + k_head > nx:
            raise PlacementError(f"the LM head ({k_head} slots of {P}x{P}) has no room after the last layer")
    if b >= ny:
        raise PlacementError(f"the LM head does not fit below the last layer ({ny} bands of {Q} rows)")
    slots.append(Slot("lm_head", chain[-1][1] + 1, Region(c0 * P, b * Q, k_head * P, P)))
    return slots


def lane_sources(slot: Slot, P: int, token_col: int) -> dict[int, tuple[int, int]]:
    """Lane -> local (x, y) sending it: the diagonal of a layer, the token's column of the
    embedding, the one column (or row) of a relay stand-in (decode.py's compressed stages)."""
    if slot.kind == "embedding" and slot.strip:  # (the first layer's slot lies below, at column 0)
        return {d: (d, last) for d, (_, last) in enumerate(slot.strip)}
    if slot.kind == "embedding":
        return {d: (token_col, d) for d in range(P)}
    if slot.kind == "relay":
        return {d: (0, d) if slot.region.width == 1 else (d, 0) for d in range(P)}
    return {d: (d, d) for d in range(P)}


def direction(a: Region, b: Region) -> str:
    if a.y0 == b.y0 and b.x0 >= a.x0 + a.width:
        return "east"
    if a.y0 == b.y0 and b.x0 + b.width <= a.x0:
        return "west"
    if b.y0 == a.y0 + a.height and b.x0 <= a.x0 < b.x0 + b.width:
        return "south"
    raise PlacementError(f"regions at ({a.x0}, {a.y0}) and ({b.x0}, {b.y0}) do not touch")


def lane_targets(src: Slot, dst: Slot, sources: dict[int, tuple[int, int]], P: int
                 ) -> dict[int, tuple[int, int]]:
    """Lane -> local (x, y) receiving it in `dst`, on the source's row or column."""
    a, b = src.region, dst.region
    way = direction(a, b)
    out = {}
    for d, (sx, sy) in sources.items():
        ax, ay = a.x0 + sx, a.y0 + sy
        if way in ("east", "west"):
            if dst.kind in SQUARE_KINDS:
                x = d
            elif dst.kind == "relay":  # one column
                x = 0
            else:  # a wide region entered from its west (east-bound) or east (west-bound) edge
                x = d if way == "east" else b.width - P + d
            out[d] = (x, ay - b.y0)
        else:
            if not b.x0 <= ax < b.x0 + b.width:
                raise PlacementError("a vertical lane misses the region below")
            out[d] = (ax - b.x0, 0 if dst.kind == "relay" else dst.strip[d][0] if dst.strip else d)
            if dst.kind in SQUARE_KINDS and ax - b.x0 != d:
                raise PlacementError("a vertical lane would not land on the layer's diagonal")
    return out


def lane_cells(src: Slot, dst: Slot, sources: dict[int, tuple[int, int]], targets: dict[int, tuple[int, int]],
               ox: int = 0, oy: int = 0) -> tuple[np.ndarray, ...]:
    """The cells of every lane from its source PE to its target PE, lane after lane, each lane along
    one row or column: the cells' x, y, position on their lane (0 at the source) and whether each
    is its lane's last, the port a wavelet leaves each cell by and the port it enters the next by."""
    a, b = src.region, dst.region
    lanes = []  # per lane: first cell, step, cells, out port, in port
    for d, (sx, sy) in sources.items():
        x0, y0 = a.x0 + sx - ox, a.y0 + sy - oy
        x1, y1 = b.x0 + targets[d][0] - ox, b.y0 + targets[d][1] - oy
        if y0 == y1:
            dx, dy = (1 if x1 > x0 else -1), 0
            out_port = isa.PORT_EAST if dx > 0 else isa.PORT_WEST
        elif x0 == x1:
            dx, dy = 0, (1 if y1 > y0 else -1)
            out_port = isa.PORT_SOUTH if dy > 0 else isa.PORT_NORTH
        else:
            raise PlacementError("a lane must run along one row or column")
        lanes.append((x0, y0, dx, dy, abs(x1 - x0) + abs(y1 - y0) + 1, out_port, isa.PORT_OPPOSITE[out_port]))
    per = np.array(lanes, dtype=np.int64).reshape(-1, 7)
    counts = per[:, 4]
    n = positions(counts)
    x0, y0, dx, dy, cells, out_port, in_port = (np.repeat(per[:, k], counts) for k in range(7))
    return x0 + n * dx, y0 + n * dy, n, n == cells - 1, out_port, in_port


def add_lane_routes(builder: MeshBuilder, src: Slot, dst: Slot, sources: dict[int, tuple[int, int]],
                    targets: dict[int, tuple[int, int]], color: int, ox: int = 0, oy: int = 0) -> None:
    """Straight routes of every lane from src to dst on one color (mesh offset ox, oy)."""
    xs, ys, n, last, out_port, in_port = lane_cells(src, dst, sources, targets, ox, oy)
    rx = np.where(n == 0, isa.PORT_RAMP, in_port)
    tx = np.left_shift(1, np.where(last, isa.PORT_RAMP, out_port))
    builder.routes(xs, ys, color, rx, tx)
