"""The records a tier keeps per checkpoint, and the pure LRU eviction choice."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from node_agent.store.config import TierName
from node_agent.store.index import IndexEntry

_ORDER = itertools.count()  # breaks ties between uses in the same clock tick


@dataclass
class Held:
    """Mutable state of one held checkpoint (guarded by its tier's lock)."""

    key: str
    source: str
    nbytes: int
    last_used: float
    pins: int = 0
    order: int = field(default_factory=lambda: next(_ORDER))

    def touch(self, now: float, source: str | None = None) -> None:
        """Mark used at `now`; remember `source` if given."""
        self.last_used = max(now, self.last_used)
        self.order = next(_ORDER)
        if source:
            self.source = source

    def order_key(self) -> tuple[float, int]:
        """Sort key: least recently used first."""
        return (self.last_used, self.order)

    def snapshot(self, tier: TierName, path: Path) -> Holding:
        """An immutable view for callers outside the lock."""
        return Holding(tier, self.key, self.source, self.nbytes, self.last_used, self.pins, path)

    def to_index(self) -> IndexEntry:
        return IndexEntry(self.key, self.source, self.nbytes, self.last_used)


@dataclass(frozen=True)
class Holding:
    """One checkpoint a tier holds, as reported to callers and heartbeats."""

    tier: TierName
    key: str
    source: str  # the URI or path it last came from ("" if unknown after a restart)
    nbytes: int
    last_used: float  # seconds since the epoch
    pinned: int  # instances using it now
    path: Path


@dataclass(frozen=True)
class Reservation:
    """Budget set aside for checkpoint `key` while it is written into `staging`."""

    tier: TierName
    key: str
    nbytes: int
    staging: Path


def plan_eviction(held: Iterable[Held], need: int) -> list[str]:
    """Keys to evict, least recently used first, skipping pinned ones, until `need` bytes are
    freed. Returns [] when `need <= 0`. The caller has checked that enough is evictable."""
    chosen: list[str] = []
    freed = 0
    for entry in sorted(held, key=Held.order_key):
        if freed >= need:
            break
        if entry.pins:
            continue
        chosen.append(entry.key)
        freed += entry.nbytes
    return chosen
