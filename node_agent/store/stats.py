"""Counters of what the store has moved, for heartbeats, logs and tests."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class StoreStats:
    """Totals since the store opened."""

    downloads: int = 0
    """Completed S3 downloads."""
    bytes_downloaded: int = 0
    """Bytes received from S3 (including parts of failed attempts)."""
    parts_reused: int = 0
    """Download parts taken from an interrupted attempt instead of fetched again."""
    promotions: int = 0
    """Copies between local tiers (disk -> DRAM, or DRAM -> disk)."""
    bytes_promoted: int = 0
    imports: int = 0
    """Local stoke checkpoints copied into the disk tier."""
    conversions: int = 0
    """Hugging Face directories converted into the disk tier."""


class StatsCounter:
    """Thread-safe accumulation into a `StoreStats`."""

    def __init__(self) -> None:
        self._stats = StoreStats()
        self._lock = threading.Lock()

    def add(self, **deltas: int) -> None:
        """Add to the named counters, e.g. `add(downloads=1, bytes_downloaded=n)`."""
        names = {f.name for f in fields(StoreStats)}
        unknown = set(deltas) - names
        assert not unknown, f"unknown counters {unknown}"
        with self._lock:
            current = self._stats
            self._stats = replace(
                current, **{k: getattr(current, k) + v for k, v in deltas.items()}
            )

    def snapshot(self) -> StoreStats:
        with self._lock:
            return self._stats
