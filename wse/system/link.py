"""System-to-system links: a transfer costs latency + bytes / bandwidth, and a ledger keeps every
byte sent and received so that transfers provably conserve bytes."""
from __future__ import annotations

import dataclasses

from ..errors import WseError


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
class LinkLedger:
    """Bytes per link of a chain of `wafers` systems: link i joins wafer i and i + 1."""

    wafers: int
    link: Link
    sent: list[int] = dataclasses.field(default_factory=list)
    received: list[int] = dataclasses.field(default_factory=list)
    transfers: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        n = max(self.wafers - 1, 0)
        self.sent, self.received, self.transfers = [0] * n, [0] * n, [0] * n

    def transfer(self, src: int, dst: int, nbytes: int) -> float:
        """Move nbytes from wafer src to its neighbour dst; returns the seconds it takes."""
        if dst != src + 1 or not 0 <= src < self.wafers - 1:
            raise WseError(f"no link from wafer {src} to wafer {dst} in a chain of {self.wafers}")
        if nbytes < 0:
            raise WseError(f"a transfer of {nbytes} bytes")
        self.sent[src] += nbytes
        self.received[src] += nbytes  # a point-to-point link delivers what it is given
        self.transfers[src] += 1
        return self.link.seconds(nbytes)
