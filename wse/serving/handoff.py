"""Prefill on separate wafers (docs/serving.md, "Prefill on separate wafers"): a pool of prefill
wafers, laid out like the decode wafers but for one prompt at the planned context, runs every
prefill in its own pipeline; each layer's KV cache then moves to the decode wafer that holds the
layer, over the system switch, as soon as the prompt has left that layer's prefill region
(layer by layer, so the transfers overlap the later layers' prefill). The link model
(system/link.py `Network`) charges every transfer its bytes at the ports it uses — the sending
wafer's links into the switch and the receiving wafer's links out of it — and a transfer waits
for a port another is using.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..system.link import Link, Network
from ..workload.decode import ELEM, ModelPlan
from ..workload.models import ModelSpec
from .steps import PrefillModel

TOKEN_BYTES = 4  # a token id


def layer_stages(plans: list[ModelPlan]) -> dict[int, tuple[int, int]]:
    """Layer -> (wafer, stage index in chain order) of its layer region, the chain counting every
    slot of every wafer and one link stage between wafers (steps.chain_stages' order)."""
    out: dict[int, tuple[int, int]] = {}
    j = 0
    for w, plan in enumerate(plans):
        for slot in plan.slots:
            if slot.kind == "layer":
                out[slot.index] = (w, j)
            j += 1
        j += w + 1 < len(plans)
    return out


@dataclasses.dataclass
class Pool:
    """The prefill wafers (sim.PrefillPool): `model` gives their pipeline's stage holds; the KV
    of layer l goes from prefill wafer src[l] to decode wafer dst[l] (network systems 0..D-1 are
    the decode wafers, D.. the prefill wafers)."""

    spec: ModelSpec
    wafers: int  # prefill wafers
    decode_wafers: int
    model: PrefillModel
    link: Link  # one system link; a transfer stripes over links_per_wafer of them
    links: int
    stage: np.ndarray  # per layer: its prefill region's stage index
    src: np.ndarray  # per layer: its prefill wafer
    dst: np.ndarray  # per layer: its decode wafer

    def __post_init__(self) -> None:
        self.stages = len(self.model.stage_slot)
        self._bytes: dict[int, np.ndarray] = {}
        self.reset()

    @classmethod
    def build(cls, spec: ModelSpec, prefill_plans: list[ModelPlan], decode_plans: list[ModelPlan],
              model: PrefillModel, link: Link, links: int) -> "Pool":
        p, d = layer_stages(prefill_plans), layer_stages(decode_plans)
        layers = range(spec.layers)
        return cls(spec, len(prefill_plans), len(decode_plans), model, link, links,
                   np.array([p[i][1] for i in layers]), np.array([p[i][0] for i in layers]),
                   np.array([d[i][0] for i in layers]))

    def reset(self) -> None:
        self.net = Network("switch", self.decode_wafers + self.wafers, self.link, self.links)

    def prefill_chunk(self, start: int, end: int, last: bool) -> tuple[np.ndarray, float]:
        return self.model.chunk(start, end, last)

    def layer_bytes(self, prompt: int) -> np.ndarray:
        """Each layer's KV cache for a prompt (a sliding-window layer: its window)."""
        got = self._bytes.get(prompt)
        if got is None:
            sp = self.spec
            got = self._bytes[prompt] = np.array([sp.kv_cache_width * sp.attended(i, prompt) * ELEM
                                                  for i in range(sp.layers)], dtype=np.int64)
        return got

    def handoff(self, prompt: int, departures_s: np.ndarray, first_token_s: float) -> tuple[float, int]:
        """Send every layer's KV for a prompt that left the pool's stages at `departures_s`, and
        its first token (emitted at `first_token_s`) from the last prefill wafer to the first
        decode wafer: (when both have arrived, bytes sent)."""
        nbytes = self.layer_bytes(prompt)
        ready = departures_s[self.stage]
        done = 0.0
        for i in np.argsort(ready, kind="stable"):  # in the order they are ready (the ports serve in call order)
            done = max(done, self.net.transfer(self.decode_wafers + int(self.src[i]), int(self.dst[i]),
                                               int(nbytes[i]), float(ready[i])))
        # the token leaves after the last layer (the LM head follows it)
        done = max(done, self.net.transfer(self.decode_wafers + self.wafers - 1, 0, TOKEN_BYTES, first_token_s))
        self.net.log.clear()
        return done, int(nbytes.sum()) + TOKEN_BYTES
