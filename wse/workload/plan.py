"""Color plan and per-region collective setup shared by the kernel and layer generators.

Every region uses the same static color assignment (routes are fixed for a whole trace, so
each communication pattern owns its colors and every all-reduce along an axis reuses the same
routes):

| colors | use |
|---|---|
| 0-8 | all-reduce along X (two-level chains both ways, broadcast) |
| 9-17 | all-reduce along Y |
| 18 | broadcast along a column from the diagonal PE (layer input) |
| 19, 22 | KV-cache shift along X, one hop east (alternating by column parity) |
| 20, 21 | region-to-region lanes (alternating along the chain of regions) |
| 23 | broadcast along a row from its lane receiver (LM head) |

A MoE layer with expert regions (dispatch.py) reuses colors that its expert regions leave free:
its dispatch leaves the layer region on the chain's transfer color and switches to 19 (no KV
shift in expert regions) where a turn needs another color; its combine leaves on 23 and
alternates with 22 region by region. Table strips (tables.py) use colors their regions leave
free: the embedding's relays 18 and 23 and its lanes' one-row hops 21; the LM head's gathers 19
and 22 and its one-row hops 18.
"""
from __future__ import annotations

from ..errors import WseError
from ..hardware import WaferConfig
from .collectives import LineAllReduce, ReduceColors
from .mesh import X, Y, Axis, Allocator, MeshBuilder, Region

REDUCE_BASE = {X: 0, Y: 9}
DIAG_BCAST = 18
KV_SHIFT = (19, 22)
TRANSFER = (20, 21)
ROW_BCAST = 23
DISPATCH_ALT = 19  # a MoE group's dispatch after a turn (KV_SHIFT[0]: expert regions have no KV shift)
COMBINE = (23, 22)  # a MoE group's combine, alternating at every region (ROW_BCAST, KV_SHIFT[1])
COLORS_NEEDED = 24


class FitError(WseError):
    """A workload does not fit in the PEs' SRAM."""


def check_colors(cfg: WaferConfig, needed: int = COLORS_NEEDED) -> None:
    if cfg.colors < needed:
        raise WseError(f"the workload mapping needs {needed} colors; wafer {cfg.name} has {cfg.colors}")


def usable_sram(cfg: WaferConfig) -> int:
    """SRAM bytes per PE a workload may place data in."""
    return cfg.sram_bytes - cfg.sram_reserved_bytes


def fit_check(mem: Allocator, cfg: WaferConfig, what: str) -> None:
    """FitError naming the bytes per PE needed, available and missing."""
    avail = usable_sram(cfg)
    if mem.top > avail:
        kinds = ", ".join(f"{k} {v:,}" for k, v in mem.bytes_by_kind().items())
        raise FitError(f"{what} needs {mem.top:,} bytes of SRAM per PE ({kinds}); "
                       f"{avail:,} are usable ({cfg.sram_bytes:,} minus {cfg.sram_reserved_bytes:,} reserved): "
                       f"{mem.top - avail:,} bytes missing per PE")


def check_groups(groups: int | None, algo: str, region: Region) -> None:
    """--groups names a two-level group count a line of the region can hold (lines shorter than
    it use one group per PE)."""
    if groups is None:
        return
    if algo not in ("two-level", "auto"):
        raise WseError(f"--groups {groups}: applies to the two-level all-reduce only (not {algo})")
    longest = max(region.width, region.height)
    if not 1 <= groups <= longest:
        raise WseError(f"--groups {groups}: must be in [1, {longest}] (PEs along the longest line of the "
                       f"{region.width}x{region.height} region)")


class AxisCollectives:
    """The all-reduce of each requested axis of a region, with its routes added to the builder."""

    def __init__(self, region: Region, builder: MeshBuilder, algo: str = "two-level",
                 groups: int | None = None, axes: tuple[Axis, ...] = (X, Y)):
        if algo not in ("two-level", "chain"):
            raise WseError(f"unknown all-reduce algorithm {algo!r} (two-level, chain)")
        check_groups(groups, algo, region)
        self.reduce: dict[Axis, LineAllReduce] = {}
        for axis in axes:
            n = region.size(axis)
            colors = ReduceColors.from_base(REDUCE_BASE[axis])
            if algo == "chain":
                red = LineAllReduce(n, colors, groups=1, root="end")
            else:
                red = LineAllReduce(n, colors, groups=min(groups, n) if groups else None)
            self.reduce[axis] = red
            for color, per in red.routes().items():
                builder.line_routes(region, axis, color, per)
