"""Configuration of the checkpoint store: frozen dataclasses, validated once at construction."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from node_agent.facts.errors import InvalidSizeError, StoreError
from node_agent.facts.tiers import TierName
from node_agent.facts.units import format_size

SHM_ROOT = Path("/dev/shm")
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MIB = 1 << 20


@dataclass(frozen=True)
class FetchConfig:
    """How checkpoints are downloaded from S3."""

    part_size: int = 16 * MIB
    """Bytes per ranged GET, rounded up to a multiple of the checkpoint's chunk size so that
    every part can be checksummed on its own."""
    concurrency: int = 16
    """Ranged GETs in flight at once (threads; also the HTTP connection pool size)."""
    read_size: int = 1 * MIB
    """Bytes read from a response body at a time (memory per thread)."""
    max_attempts: int = 5
    """botocore retry attempts per request (standard retry mode)."""

    def __post_init__(self) -> None:
        _check_positive("part_size", self.part_size, 4096)
        _check_positive("read_size", self.read_size, 4096)
        if not 1 <= self.concurrency <= 256:
            raise StoreError(f"concurrency {self.concurrency}: must be 1..256.")
        if not 1 <= self.max_attempts <= 20:
            raise StoreError(f"max_attempts {self.max_attempts}: must be 1..20.")


@dataclass(frozen=True)
class StoreConfig:
    """One node's checkpoint store: where each tier lives and how many bytes it may hold."""

    node_id: str
    """Names the DRAM tier directory (`/dev/shm/stoke-<uid>-<node_id>`); letters, digits, `_.-`."""
    disk_dir: Path
    """Local-disk tier directory (created if missing); should be on a real disk, not tmpfs."""
    disk_budget: int
    """Bytes the disk tier may hold (checkpoints plus downloads in progress)."""
    dram_budget: int
    """Bytes the DRAM tier may hold in shared memory."""
    dram_dir: Path | None = None
    """Override of the DRAM tier directory (default `/dev/shm/stoke-<uid>-<node_id>`)."""
    fetch: FetchConfig = field(default_factory=FetchConfig)
    copy_threads: int = 4
    """Threads for local copies (disk -> DRAM promotion, local imports)."""
    copy_read_size: int = 8 * MIB
    """Bytes per positional read in local copies (a multiple of 4096)."""
    dram_arena: bool = True
    """Keep the DRAM tier's partitions in one arena of `dram_budget` bytes, allocated and
    faulted in when the store opens (`arena.py`): promotions then read straight into memory
    that already exists and workers bind tensors in a mapping they made once. Off: one tmpfs
    file per partition, allocated as it is written (the arena's start-up cost, none of its
    speed)."""
    verify_promotions: bool = False
    """Re-check CRC-32s on disk -> DRAM copies. Off: bytes were verified when they entered
    the disk tier, and checking costs about a third of the copy's throughput."""
    bandwidth_alpha: float = 0.3
    """Weight of the newest sample in the bandwidth EWMAs."""

    def __post_init__(self) -> None:
        if not _NODE_ID.fullmatch(self.node_id):
            raise StoreError(
                f"node id {self.node_id!r}: use 1-63 letters, digits, '_', '.' or '-' "
                "(it names a directory under /dev/shm)."
            )
        _check_positive("disk_budget", self.disk_budget, 4096)
        _check_positive("dram_budget", self.dram_budget, 4096)
        _check_positive("copy_read_size", self.copy_read_size, 4096)
        if self.copy_read_size % 4096:
            raise InvalidSizeError(f"copy_read_size {self.copy_read_size}: use a multiple of 4096.")
        if not 1 <= self.copy_threads <= 64:
            raise StoreError(f"copy_threads {self.copy_threads}: must be 1..64.")
        if not 0.0 < self.bandwidth_alpha <= 1.0:
            raise StoreError(f"bandwidth_alpha {self.bandwidth_alpha}: must be in (0, 1].")

    @property
    def dram_root(self) -> Path:
        """The DRAM tier's directory."""
        if self.dram_dir is not None:
            return self.dram_dir
        return SHM_ROOT / f"stoke-{os.geteuid()}-{self.node_id}"  # per user: /dev/shm is shared

    def root_of(self, tier: TierName) -> Path:
        """Directory of `tier`."""
        return self.dram_root if tier is TierName.DRAM else Path(self.disk_dir)

    def budget_of(self, tier: TierName) -> int:
        """Byte budget of `tier`."""
        return self.dram_budget if tier is TierName.DRAM else self.disk_budget


def _check_positive(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise InvalidSizeError(f"{name} {value}: must be at least {format_size(minimum)}.")
