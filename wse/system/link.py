"""System-to-system links (docs/system.md, "Links"): a chain of neighbouring systems, or every
system's links into one non-blocking switch. A transfer of n bytes costs latency + n /
bandwidth, its bandwidth that of the links it may use together (striped); transfers that need a
link (or a switch port) another is using wait for it. A ledger keeps every byte sent and
received, so transfers provably conserve bytes."""
from __future__ import annotations

import dataclasses

from ..errors import WseError

TOPOLOGIES = ("chain", "switch")


@dataclasses.dataclass(frozen=True)
class Link:
    bytes_per_s: float
    latency_s: float

    def seconds(self, nbytes: int) -> float:
        """Time from the first byte leaving to the last byte arriving."""
        return self.latency_s + nbytes / self.bytes_per_s

    def busy_seconds(self, nbytes: int) -> float:
        """Time the link is occupied (the latency pipelines with the next transfer)."""
        return nbytes / self.bytes_per_s


@dataclasses.dataclass
class Network:
    """The links of `wafers` systems: `links` links of `link` each way from a system to each
    neighbour (chain) or into the switch (switch), used together by one transfer."""

    topology: str
    wafers: int
    link: Link
    links: int = 1
    sent: list[int] = dataclasses.field(default_factory=list)  # bytes per system
    received: list[int] = dataclasses.field(default_factory=list)
    transfers: list[int] = dataclasses.field(default_factory=list)  # per sending system
    busy: dict[tuple, float] = dataclasses.field(default_factory=dict)  # port -> seconds it is in use per step
    free: dict[tuple, float] = dataclasses.field(default_factory=dict)  # port -> when it is free
    log: list[tuple[int, int, int, float, float]] = dataclasses.field(default_factory=list)  # src, dst, bytes, start, arrival

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise WseError(f"system.topology {self.topology!r} is not one of {', '.join(TOPOLOGIES)}")
        if self.links < 1:
            raise WseError(f"system.links_per_wafer = {self.links} must be at least 1")
        self.sent, self.received, self.transfers = [0] * self.wafers, [0] * self.wafers, [0] * self.wafers

    @property
    def bytes_per_s(self) -> float:
        """Bandwidth of one transfer: all the links it may use."""
        return self.link.bytes_per_s * self.links

    def ports(self, src: int, dst: int) -> list[tuple]:
        """What a transfer from system src to dst occupies: the chain link between them, or src's
        links into the switch and dst's links out of it."""
        if not (0 <= src < self.wafers and 0 <= dst < self.wafers) or src == dst:
            raise WseError(f"no transfer from system {src} to system {dst} among {self.wafers}")
        if self.topology == "chain":
            if abs(dst - src) != 1:
                raise WseError(f"a chain links neighbouring systems only, not {src} and {dst}")
            return [("link", src, dst)]
        return [("up", src), ("down", dst)]

    def transfer(self, src: int, dst: int, nbytes: int, ready_s: float = 0.0) -> float:
        """Move nbytes from system src to dst, starting when they are ready and the ports are
        free; returns when the last byte arrives."""
        if nbytes < 0:
            raise WseError(f"a transfer of {nbytes} bytes")
        ports = self.ports(src, dst)
        start = max([ready_s] + [self.free.get(p, 0.0) for p in ports])
        busy = nbytes / self.bytes_per_s
        for p in ports:
            self.free[p] = start + busy
            self.busy[p] = self.busy.get(p, 0.0) + busy
        self.sent[src] += nbytes
        self.received[dst] += nbytes
        self.transfers[src] += 1
        self.log.append((src, dst, nbytes, start, start + self.link.latency_s + busy))
        return start + self.link.latency_s + busy
