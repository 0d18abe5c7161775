"""The records a tier keeps per checkpoint, and the pure LRU eviction choice."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from node_agent.facts.tiers import TierName
from node_agent.store.index import IndexEntry

_ORDER = itertools.count()  # breaks ties between uses in the same clock tick

MAX_SOURCES = 4
"""Sources remembered per checkpoint, most recent first: the same bytes reached as a local path,
its `s3://` copy and the Hugging Face directory it was converted from all find it, while an
entry reached from ever new places cannot grow without bound (the oldest is forgotten)."""


@dataclass
class Held:
    """Mutable state of one held checkpoint (guarded by its tier's lock)."""

    key: str
    sources: tuple[str, ...]  # most recent first, at most MAX_SOURCES
    nbytes: int
    last_used: float
    extents: tuple[tuple[int, int], ...] = ()  # (offset, nbytes) per partition, in an arena
    pins: int = 0
    order: int = field(default_factory=lambda: next(_ORDER))

    def touch(self, now: float, source: str | None = None) -> bool:
        """Mark used at `now`; remember `source` if given. True if a source was new (the
        index should be saved)."""
        self.last_used = max(now, self.last_used)
        self.order = next(_ORDER)
        return self.remember(source) if source else False

    def remember(self, source: str) -> bool:
        """Put `source` first among the known sources (dropping the oldest beyond
        MAX_SOURCES). True if the set of sources changed, not merely their order."""
        before = set(self.sources)
        self.sources = (source, *(s for s in self.sources if s != source))[:MAX_SOURCES]
        return set(self.sources) != before

    def order_key(self) -> tuple[float, int]:
        """Sort key: least recently used first."""
        return (self.last_used, self.order)

    def snapshot(self, tier: TierName, path: Path) -> Holding:
        """An immutable view for callers outside the lock."""
        return Holding(tier, self.key, self.sources, self.nbytes, self.last_used, self.pins, path)

    def to_index(self) -> IndexEntry:
        return IndexEntry(self.key, self.sources, self.nbytes, self.last_used, self.extents)


@dataclass(frozen=True)
class Holding:
    """One checkpoint a tier holds, as reported to callers and heartbeats."""

    tier: TierName
    key: str
    sources: tuple[str, ...]  # URIs and paths known to hold these bytes, most recent first
    nbytes: int
    last_used: float  # seconds since the epoch
    pinned: int  # instances using it now
    path: Path

    @property
    def source(self) -> str:
        """The URI or path it was last reached from ("" if none is known)."""
        return self.sources[0] if self.sources else ""


@dataclass(frozen=True)
class Reservation:
    """Budget set aside for checkpoint `key` while it is written into `staging`."""

    tier: TierName
    key: str
    nbytes: int
    staging: Path
    extents: tuple[tuple[int, int], ...] = ()
    """Arena extents `(offset, nbytes)` per partition, allocated for this write (DRAM tier)."""


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
