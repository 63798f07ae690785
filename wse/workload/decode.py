"""A whole model's decode step on one wafer: the slot size and the placement of its regions.

`plan_model` picks the slot shape (the largest that places the chain and fits every region's
SRAM) for a model or for one wafer's group of layers; `plan_units` does the same for a wafer's
share of a chain cut at routed experts. The traces and their exact composition from small
stage simulations are in compose.py.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

from ..errors import WseError
from ..hardware import WaferConfig
from .experts import most_experts
from .layer_sizes import LayerPlan, most_rows, plan_layer
from .params import DecodeParams
from .precision import value_bytes, weights_of
from .tables import embedding_memory, lm_memory, token_columns
from .mesh import split_ranges
from .models import ModelSpec
from .placement import PlacementError, Slot, serpentine, strip_rows
from .plan import FitError, check_colors, usable_sram

ELEM = 2


@dataclasses.dataclass
class ModelPlan:
    spec: ModelSpec
    cfg: WaferConfig
    params: DecodeParams
    P: int
    n_layers: int
    slots: list[Slot]
    token_col: int  # the embedding's lane column: the last holding one of the batch's rows
    first_layer: int = 0  # a wafer's group of layers starts here (multi-wafer systems)
    embed: bool = True  # the plan holds the embedding
    head: bool = True  # the plan holds the LM head
    experts_per_region: int = 0  # expert regions: the most routed experts one holds
    expert_regions: bool = False  # MoE layers keep router and shared experts only; routed experts in expert regions
    units: tuple[int, int] | None = None  # a wafer's share as a range of model_units (expert regions)
    Q: int = 0  # rows of a layer or expert slot (0: P, square slots)
    split_ffn: bool = False  # dense layers keep their FFN in a slot of its own (--dense-ffn, splits_ffn)

    def __post_init__(self) -> None:
        self.Q = self.Q or self.P

    @property
    def width(self) -> int:
        return max(s.region.x0 + s.region.width for s in self.slots)

    @property
    def height(self) -> int:
        return max(s.region.y0 + s.region.height for s in self.slots)


def layer_plan(plan: ModelPlan, layer: int) -> LayerPlan:
    """The plan of the layer's region on the model plan's slot size and MoE mapping (a split
    dense layer: its attention half)."""
    part = "attention" if plan.split_ffn and not plan.spec.is_moe_layer(layer) else "all"
    return plan_layer(plan.spec, layer, plan.P, plan.cfg, plan.params, routed=not plan.expert_regions, Q=plan.Q,
                      part=part)


def ffn_plan(plan: ModelPlan, layer: int) -> LayerPlan:
    """The plan of a split dense layer's FFN region (the slot after its layer region)."""
    return plan_layer(plan.spec, layer, plan.P, plan.cfg, plan.params, Q=plan.Q, part="ffn")


def handoff_plan(plan: ModelPlan, slot: Slot | None) -> LayerPlan | None:
    """The plan of a slot's region if its hand-off is fused into its FFN's end
    (LayerPlan.fused_handoff); None where the region ends with a barrier (or is a stand-in)."""
    if slot is None or slot.kind not in ("layer", "ffn") or plan.params.handoff != "fused":
        return None
    lp = ffn_plan(plan, slot.index) if slot.kind == "ffn" else layer_plan(plan, slot.index)
    return lp if lp.fused_handoff else None


def splits_ffn(spec: ModelSpec, params: DecodeParams, expert_regions: bool) -> bool:
    """Whether a plan's dense layers keep their FFN in a slot of its own after their layer
    region (--dense-ffn region; auto: where a MoE model's routed experts are in expert regions,
    whose layer regions then hold attention, router and shared experts only, so a dense layer
    left whole would hold far fewer KV caches than they and bound the pipeline's depth)."""
    if params.dense_ffn == "auto":
        return expert_regions and spec.moe is not None
    return params.dense_ffn == "region"


def ffn_layers(spec: ModelSpec, layers, split: bool) -> frozenset[int]:
    """The layers among `layers` whose FFN has a slot of its own."""
    return frozenset(layer for layer in layers if split and not spec.is_moe_layer(layer))


def chain_elements(spec: ModelSpec, first_layer: int, n_layers: int, experts_per_region: int,
                   split: frozenset[int] = frozenset()) -> list[tuple[str, int, tuple[int, int] | None]]:
    """The one-slot elements of the chain, (kind, layer, experts): each layer, and with expert
    parallelism (experts_per_region > 0) each MoE layer followed by its expert regions, the
    routed experts split into the fewest groups of at most experts_per_region (sizes differing
    by at most one); a layer in `split` followed by its FFN region ("ffn")."""
    return list(_chain_elements(spec, first_layer, n_layers, experts_per_region, split))


@functools.lru_cache(maxsize=4096)
def _chain_elements(spec: ModelSpec, first_layer: int, n_layers: int, experts_per_region: int,
                    split: frozenset[int]) -> tuple:
    """chain_elements, remembered (placement searches ask for the same chain at many slot sizes)."""
    return tuple(units_chain(model_units(spec, first_layer, n_layers, bool(experts_per_region)), experts_per_region,
                             split))


def model_units(spec: ModelSpec, first_layer: int = 0, n_layers: int | None = None, experts: bool = True
                ) -> list[tuple[int, int]]:
    """The model's chain (or layers first_layer.. of it) in the units a multi-wafer split with
    expert regions cuts it at: (layer, -1) for a layer region, (layer, e) for routed expert e
    of a MoE layer (none with experts=False)."""
    out: list[tuple[int, int]] = []
    for layer in range(first_layer, spec.layers if n_layers is None else first_layer + n_layers):
        out.append((layer, -1))
        if experts and spec.is_moe_layer(layer):
            out.extend((layer, e) for e in range(spec.moe.experts))
    return out


def unit_bytes(spec: ModelSpec, params: DecodeParams, unit: tuple[int, int]) -> int:
    """Weights at their precision (and, for a layer region, the KV cache) of one unit."""
    layer, e = unit
    dense, expert = (value_bytes(w) for w in weights_of(spec, params.weights))
    if e >= 0:
        lin = spec.linear_params(layer)[1] // spec.moe.experts
        return round(expert * lin + ELEM * (spec.expert_params() - lin))
    return round(spec.layer_bytes(layer, dense, expert, routed=False)) + kv_bytes(spec, params, layer, 1)


@functools.lru_cache(maxsize=64)
def _unit_sums(spec: ModelSpec, params: DecodeParams) -> tuple[int, ...]:
    """Prefix sums of unit_bytes over model_units(spec) (placement searches ask for many runs)."""
    return (0, *itertools.accumulate(unit_bytes(spec, params, u) for u in model_units(spec)))


@functools.lru_cache(maxsize=64)
def _all_units(spec: ModelSpec) -> tuple[tuple[int, int], ...]:
    """model_units(spec), remembered (23k units for Kimi K2; plan_units asks for every share)."""
    return tuple(model_units(spec))


def units_bytes(spec: ModelSpec, params: DecodeParams, u0: int, u1: int) -> int:
    """unit_bytes summed over model_units(spec)[u0:u1]."""
    sums = _unit_sums(spec, params)
    return sums[u1] - sums[u0]


def units_chain(units: list[tuple[int, int]], experts_per_region: int, split: frozenset[int] = frozenset()
                ) -> list[tuple[str, int, tuple[int, int] | None]]:
    """Chain elements of a run of units: each layer region (with its FFN region after it for
    the layers in `split`), and each layer's run of routed experts cut into the fewest groups
    of at most experts_per_region (sizes within one)."""
    out: list[tuple[str, int, tuple[int, int] | None]] = []
    run: list[tuple[int, int]] = []

    def flush() -> None:
        if run:
            layer, e0, n = run[0][0], run[0][1], len(run)
            out.extend(("experts", layer, (e0 + r.start, e0 + r.stop))
                       for r in split_ranges(n, -(-n // experts_per_region)))
            run.clear()

    for layer, e in units:
        if e < 0 or (run and run[0][0] != layer):
            flush()
        if e < 0:
            out.append(("layer", layer, None))
            if layer in split:
                out.append(("ffn", layer, None))
        else:
            run.append((layer, e))
    flush()
    return out


_TABLE_FITS: dict[tuple, bool] = {}  # _table_fits' answers


def _table_fits(spec: ModelSpec, width: int, height: int, cfg: WaferConfig, params: DecodeParams, head: bool,
                lanes: int = 0) -> bool:
    """Whether the embedding (or LM head) table fits a width x height region, remembered (a
    placement search asks ~41,000 times for ~6,900 distinct regions in planning Kimi K2)."""
    key = (spec, width, height, cfg.key(), params, head, lanes)
    if key not in _TABLE_FITS:
        if len(_TABLE_FITS) >= 16384:
            _TABLE_FITS.clear()
        try:
            (lm_memory if head else embedding_memory)(spec, width, height, cfg, params, lanes)
            _TABLE_FITS[key] = True
        except FitError:
            _TABLE_FITS[key] = False
    return _TABLE_FITS[key]


def _table_slots(spec: ModelSpec, P: int, cfg: WaferConfig, head: bool, params: DecodeParams,
                 most: int) -> int:
    """Fewest P x P slots (at most `most`) a vocab x hidden table needs (embedding or LM head)."""
    what = "LM head" if head else "embedding"
    if most < 1:
        raise PlacementError(f"the {what} has no room: the layers take every {P}x{P} slot of the wafer (more "
                             "wafers, --wafers, or a smaller --region leave it some)")
    for k in range(1, most + 1):
        if _table_fits(spec, k * P, P, cfg, params, head):
            return k
    raise PlacementError(f"the {what} does not fit in the {most} free slots of {P}x{P} (more wafers, --wafers, "
                         "or a larger --region give it more)")


def _strip_rows(spec: ModelSpec, P: int, cfg: WaferConfig, head: bool, params: DecodeParams) -> int:
    """Fewest rows of a table strip as wide as the mesh (embedding or LM head) for P lanes:
    its table fits and a lane spans at most two of its rows (placement.strip_rows)."""
    W = cfg.mesh_width

    def fits(h: int) -> bool:
        return _table_fits(spec, W, h, cfg, params, head, P)
    lo, hi = 1, min(P, cfg.mesh_height)
    what = "LM head" if head else "embedding"
    if not fits(hi):
        raise PlacementError(f"the {what} does not fit a strip of {W} columns and up to {hi} rows")
    while lo < hi:  # (the table's bytes per PE fall as rows are added)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    for h in (lo, min(P, cfg.mesh_height)):  # (rows as many as lanes: each row one lane)
        try:
            strip_rows(spec.hidden_size, P, h)
            return h
        except PlacementError as e:
            last = e
    raise PlacementError(f"the {what} strip: {last}")


def plan_model(spec: ModelSpec, cfg: WaferConfig, params: DecodeParams, n_layers: int | None = None,
               P: int | None = None, first_layer: int = 0, embed: bool = True, head: bool = True,
               Q: int | None = None) -> ModelPlan:
    """Slot size and placement. With P=None the largest slot that places and fits is chosen:
    square (params.slot_shape "square") or P columns by Q >= P rows ("tall": the largest area).

    first_layer, embed and head describe one wafer's share of a model split over several
    wafers: layers first_layer .. first_layer + n_layers - 1, with or without the embedding
    and the LM head.
    """
    check_colors(cfg)
    n_layers = spec.layers - first_layer if n_layers is None else n_layers
    if not 0 <= first_layer < spec.layers or not 1 <= n_layers <= spec.layers - first_layer:
        raise WseError(f"--layers must be in [1, {spec.layers - first_layer}] for {spec.name}")
    need = bytes_needed(spec, params, n_layers, first_layer, embed, head)
    have = usable_sram(cfg) * cfg.mesh_width * cfg.mesh_height
    if need > have:
        raise _does_not_fit(spec, cfg, params, n_layers, None, first_layer, embed, head)
    if params.moe_mapping == "regions" and not spec.moe:
        raise WseError(f"--moe-mapping regions: {spec.name} has no MoE layer")
    mappings = {"auto": ("local", "regions"), "local": ("local",), "regions": ("regions",)}[params.moe_mapping]
    if not any(spec.is_moe_layer(layer) for layer in range(first_layer, first_layer + n_layers)):
        mappings = ("local",)  # a group of dense layers (e.g. DeepSeek-V3's first three)
    last_error: Exception | None = None
    # tables in slots before strips (auto): with either expert mapping before strips with any
    for tables in ("slots", "strips") if params.tables == "auto" else (params.tables,):
        for mapping in mappings:
            try:
                return _place(spec, cfg, params, n_layers, P, first_layer, embed, head, mapping == "regions", Q=Q,
                              tables=tables)
            except (PlacementError, FitError) as e:
                last_error = last_error if tables == "strips" and last_error else e
    raise _does_not_fit(spec, cfg, params, n_layers, last_error, first_layer, embed, head)


def plan_units(spec: ModelSpec, cfg: WaferConfig, params: DecodeParams, u0: int, u1: int, embed: bool,
               head: bool, P: int | None = None, Q: int | None = None) -> ModelPlan:
    """A wafer's share cut from model_units [u0, u1): whole layers and runs of a layer's
    routed experts, every MoE layer with expert regions (a layer's experts may continue on the
    next wafer)."""
    check_colors(cfg)
    units = _all_units(spec)
    if not 0 <= u0 < u1 <= len(units):
        raise WseError(f"units {u0}..{u1 - 1} are outside {spec.name}'s {len(units)} units")
    share = list(units[u0:u1])
    need = units_bytes(spec, params, u0, u1) + _table_bytes(spec, embed, head)
    have = usable_sram(cfg) * cfg.mesh_width * cfg.mesh_height
    what = f"{spec.name} units {u0}..{u1 - 1} (layers {share[0][0]}..{share[-1][0]})"
    if need > have:
        raise FitError(f"{what}: {need:,} B of weights and KV cache, {have:,} B usable")
    try:
        plan = _place(spec, cfg, params, share[-1][0] - share[0][0] + 1, P, share[0][0], embed, head, True, share,
                      Q)
    except (PlacementError, FitError) as e:
        raise FitError(f"{what} found no slot size that places every region and fits its SRAM ({e})") from None
    plan.units = (u0, u1)
    return plan


def resident_bytes(plan: ModelPlan) -> int:
    """Weights (at their precision) and KV cache a wafer plan holds: what its SRAM must fit."""
    spec, params = plan.spec, plan.params
    if plan.units:
        u0, u1 = plan.units
        return units_bytes(spec, params, u0, u1) + _table_bytes(spec, plan.embed, plan.head)
    return bytes_needed(spec, params, plan.n_layers, plan.first_layer, plan.embed, plan.head)


@functools.lru_cache(maxsize=4096)
def _units_chain(units: tuple[tuple[int, int], ...], experts_per_region: int, split: frozenset[int]) -> tuple:
    """units_chain, remembered (placement searches ask for the same chain at many slot sizes)."""
    return tuple(units_chain(list(units), experts_per_region, split))


_FITS: dict[tuple, FitError | None] = {}  # _layer_fit's answers


def _layer_fit(spec: ModelSpec, layer: int, P: int, cfg: WaferConfig, params: DecodeParams, routed: bool, Q: int,
               part: str) -> FitError | None:
    """plan_layer's fit check, remembered: None, or the FitError it raised (the searches for
    several wafer counts try the same layer on the same slot size many times: about 4,000
    checks, 997 distinct, in planning Kimi K2's fewest wafers)."""
    key = (spec, layer, P, cfg.key(), params, routed, Q, part)
    if key not in _FITS:
        if len(_FITS) >= 8192:
            _FITS.clear()
        try:
            plan_layer(spec, layer, P, cfg, params, routed=routed, Q=Q, part=part)
            _FITS[key] = None
        except FitError as e:
            _FITS[key] = e
    return _FITS[key]


def _table_bytes(spec: ModelSpec, embed: bool, head: bool) -> int:
    return ELEM * ((spec.embedding_params() if embed else 0)
                   + (spec.lm_head_params() + spec.hidden_size if head else 0))


def _place(spec: ModelSpec, cfg: WaferConfig, params: DecodeParams, n_layers: int, P: int | None,
           first_layer: int, embed: bool, head: bool, expert_regions: bool,
           units: list[tuple[int, int]] | None = None, Q: int | None = None, tables: str | None = None
           ) -> ModelPlan:
    """The largest slot (or P x Q) that places the chain and fits every region; `units` cuts
    the chain at routed experts (plan_units) instead of whole layers. The tables go in slots or
    strips as `tables` (default params.tables) says (auto: strips only if no slot size places
    them in slots)."""
    search = _SlotSearch(spec, cfg, params, n_layers, first_layer, embed, head, expert_regions, units)
    layouts = {"slots": [False], "strips": [True], "auto": [False, True]}[tables or params.tables] \
        if embed or head else [False]
    for strip in layouts:
        try:
            return search.square(P, Q, strip) if P or params.slot_shape == "square" else search.tall(strip)
        except (PlacementError, FitError):
            continue
    raise search.failed()


class _SlotSearch:
    """_place's search: a wafer share's chain tried at candidate slot sizes, the first errors kept
    (at the largest slot, and at the largest that placed the chain: what smaller ones repeat)."""

    def __init__(self, spec: ModelSpec, cfg: WaferConfig, params: DecodeParams, n_layers: int, first_layer: int,
                 embed: bool, head: bool, expert_regions: bool, units: list[tuple[int, int]] | None):
        self.spec, self.cfg, self.params, self.n_layers, self.first_layer = spec, cfg, params, n_layers, first_layer
        self.embed, self.head, self.expert_regions, self.units = embed, head, expert_regions, units
        if units is None:
            self.layer_ids = list(range(first_layer, first_layer + n_layers))
            self.expert_layers = [layer for layer in self.layer_ids if spec.is_moe_layer(layer)] \
                if expert_regions else []
        else:
            self.layer_ids = [layer for layer, e in units if e < 0]
            self.expert_layers = sorted({layer for layer, e in units if e >= 0})
        self.split = splits_ffn(spec, params, expert_regions)
        self.apart = ffn_layers(spec, self.layer_ids, self.split)
        self.W, self.Hm = cfg.mesh_width, cfg.mesh_height
        # one slot per layer region (and FFN region) and at least one per layer's run of experts bounds the side
        least = len(self.layer_ids) + len(self.apart) + len(self.expert_layers) + embed + head
        self.top = min(self.W, self.Hm, spec.hidden_size, int((self.W * self.Hm / least) ** 0.5))
        self.q_cap = min(self.Hm, most_rows(spec))
        self.first_error: Exception | None = None
        self.placed_error: Exception | None = None
        self._chains: dict[tuple[int, int], tuple[list, int]] = {}
        self._strips: dict[int, tuple[int, int]] = {}

    def chain_for(self, p: int, q: int) -> tuple[list, int]:
        """The chain's elements on p x q slots and the most experts an expert region holds."""
        if (p, q) not in self._chains:
            spec, per_region = self.spec, 0
            if self.expert_layers:
                per_region = most_experts(spec, self.expert_layers[0], p, self.cfg, self.params, q)
                if not per_region:
                    raise FitError(f"not one routed expert of {spec.name} fits a {p}x{q} region")
                per_region = min(per_region, self.params.experts_per_region or per_region)
            chain = chain_elements(spec, self.first_layer, self.n_layers, per_region, self.apart) \
                if self.units is None else list(_units_chain(tuple(self.units), per_region, self.apart))
            self._chains[p, q] = (chain, per_region)
        chain, per_region = self._chains[p, q]
        return list(chain), per_region

    def tables(self, p: int) -> tuple[int, int]:
        """Slots the embedding and the LM head take (table slots)."""
        k_e = _table_slots(self.spec, p, self.cfg, False, self.params, self.W // p - 1) if self.embed else 0
        k_h = _table_slots(self.spec, p, self.cfg, True, self.params, self.W // p) if self.head else 0
        return k_e, k_h

    def strips(self, p: int) -> tuple[int, int]:
        """Rows the embedding and the LM head take (table strips)."""
        if p not in self._strips:
            self._strips[p] = (_strip_rows(self.spec, p, self.cfg, False, self.params) if self.embed else 0,
                               _strip_rows(self.spec, p, self.cfg, True, self.params) if self.head else 0)
        return self._strips[p]

    def attempt(self, p: int, q: int, strip: bool) -> ModelPlan:
        """The plan on p x q slots (PlacementError or FitError, remembered, if it fails)."""
        spec, cfg, params, W, Hm = self.spec, self.cfg, self.params, self.W, self.Hm
        placed = False
        try:
            chain, per_region = self.chain_for(p, q)
            if strip:
                slots = serpentine(len(chain), 0, 0, p, W, Hm, self.first_layer, chain, q, self.strips(p),
                                   spec.hidden_size)
            else:
                k_e, k_h = self.tables(p)
                slots = serpentine(len(chain), k_e, k_h, p, W, Hm, self.first_layer, chain, q)
            placed = True
            kinds = {self.layer_ids[0], self.layer_ids[-1]} if self.layer_ids else set()
            if spec.moe and spec.moe.dense_layers in self.layer_ids:
                kinds.add(spec.moe.dense_layers)
            for layer in sorted(kinds):
                for part in ("attention", "ffn") if layer in self.apart else ("all",):
                    err = _layer_fit(spec, layer, p, cfg, params, not self.expert_regions, q, part)
                    if err is not None:
                        raise err.with_traceback(None)
            token_col = token_columns(spec, slots[0].region.width, params.token, params.batch)[-1][0] \
                if self.embed else 0
            return ModelPlan(spec, cfg, params, p, self.n_layers, slots, token_col, self.first_layer, self.embed,
                             self.head, per_region, self.expert_regions and bool(spec.moe), Q=q,
                             split_ffn=self.split)
        except (PlacementError, FitError) as e:
            self.first_error = self.first_error or e
            if placed and self.placed_error is None:
                self.placed_error = e
            raise

    def failed(self) -> Exception:
        return self.placed_error or self.first_error or PlacementError("no slot size to try")

    def square(self, P: int | None, Q: int | None, strip: bool) -> ModelPlan:
        """P x Q if given, else the largest square slot that places."""
        for p, q in ([(P, Q or P)] if P else [(p, p) for p in range(self.top, 0, -1)]):
            try:
                return self.attempt(p, q, strip)
            except (PlacementError, FitError):
                continue
        raise self.failed()

    def rows(self, p: int, extra: int, free: int) -> int:
        """Most rows (at most q_cap) that leave `free` rows enough bands for the chain and `extra` slots."""
        nx, q = self.W // p, self.q_cap
        for _ in range(16):  # rows shrink as the chain (more expert regions) grows
            n = len(self.chain_for(p, q)[0]) + extra
            q_next = min(self.q_cap, free // -(-n // nx))
            if q_next >= q or q_next < p:
                return min(q, q_next)
            q = q_next
        return q

    def tall(self, strip: bool) -> ModelPlan:
        """Tall slots: for each width P, as many rows as leave bands for every slot of the chain
        (and the tables' slots or strips); the largest area wins."""
        best: ModelPlan | None = None
        for p in range(min(self.top, self.q_cap), 0, -1):  # Q >= P
            if best and p * self.q_cap <= best.P * best.Q:
                break
            try:
                if strip:
                    tries = [self.rows(p, 0, self.Hm - sum(self.strips(p)))]
                else:
                    q = self.rows(p, sum(self.tables(p)), self.Hm)
                    tries = [q, self.Hm // (self.Hm // q + 1)]  # one band more if the head needs it
            except (PlacementError, FitError) as e:
                self.first_error = self.first_error or e
                continue
            for q_try in sorted(set(tries), reverse=True):
                if q_try < p or (best is not None and p * q_try <= best.P * best.Q):
                    continue
                try:
                    best = self.attempt(p, q_try, strip)
                except (PlacementError, FitError):
                    continue
                break
        if best is None:
            raise self.failed()
        return best


def bytes_needed(spec: ModelSpec, params: DecodeParams, n_layers: int, first_layer: int = 0,
                 embed: bool = True, head: bool = True) -> int:
    """Weights of the mapped layers at their precision (and the 16-bit embedding and head when
    held), plus their KV cache."""
    dense, expert = (value_bytes(w) for w in weights_of(spec, params.weights))
    weights = ELEM * ((spec.embedding_params() if embed else 0) + (spec.lm_head_params() + spec.hidden_size
                      if head else 0)) \
        + round(sum(spec.layer_bytes(i, dense, expert) for i in range(first_layer, first_layer + n_layers)))
    return weights + kv_bytes(spec, params, first_layer, n_layers)


def kv_bytes(spec: ModelSpec, params: DecodeParams, first_layer: int, n_layers: int) -> int:
    """KV cache of layers [first, first + n) for the batch (a sliding-window layer: its window)."""
    tokens = sum(spec.attended(i, params.context) for i in range(first_layer, first_layer + n_layers))
    return spec.kv_cache_width * tokens * params.batch * ELEM


def _does_not_fit(spec: ModelSpec, cfg: WaferConfig, params: DecodeParams, n_layers: int,
                  cause: Exception | None, first_layer: int = 0, embed: bool = True, head: bool = True) -> WseError:
    """The error for a model that does not fit: bytes missing and wafers needed."""
    frac = n_layers / spec.layers
    need = bytes_needed(spec, params, n_layers, first_layer, embed, head)
    kv = kv_bytes(spec, params, first_layer, n_layers)
    weights = need - kv
    have = usable_sram(cfg) * cfg.mesh_width * cfg.mesh_height
    wafers = -(-need // have)
    detail = f" ({cause})" if cause else ""
    what = spec.name if frac == 1 else f"{spec.name} ({n_layers} of {spec.layers} layers)"
    if need > have:
        return FitError(f"{what} does not fit on one {cfg.name} wafer: weights {weights:,} B + KV cache "
                        f"{kv:,} B = {need:,} B, usable SRAM {have:,} B; {need - have:,} B missing; "
                        f"it needs at least {wafers} wafers{detail}")
    return FitError(f"{what} ({need:,} B of weights and KV cache, {have:,} B usable) found no slot size "
                    f"that places every region and fits its SRAM{detail}")
