"""A DRAM tier's arena and what is allocated in it: the bookkeeping `Tier` does for the arena.

Lifecycle of the extents of one checkpoint: `fits` / `victims` (what must be evicted first) ->
`place(staging, sizes)` allocates one extent per partition and records them in the staging
directory (`loader.arena.Placement`) -> the copy writes into `views(extents)` -> the tier commits
the directory by renaming it (then, and only then, the index records the extents), or
`release(extents)` gives them back. Not thread-safe: the tier's lock guards it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from checkpoint_format import MANIFEST_NAME, CheckpointError, Manifest
from checkpoint_format.checksum import crc32_hex
from loader.arena import Placement, write_placement
from node_agent.facts.units import format_size
from node_agent.store.arena import Arena
from node_agent.store.errors import NoRoomError
from node_agent.store.extents import ExtentAllocator, aligned
from node_agent.store.layout import ArenaFacts
from node_agent.store.tier_state import Held

log = logging.getLogger(__name__)

Extents = tuple[tuple[int, int], ...]  # (offset, nbytes) per partition


@dataclass(frozen=True)
class ArenaUsage:
    """A DRAM tier's arena as `stoke nodes` shows it."""

    path: Path
    size: int
    """Bytes of memory it holds (allocated and faulted in at start, used or not)."""
    free: int
    largest_free: int
    """The largest extent a partition can take without evicting anything."""
    startup_s: float
    """What creating and faulting it in cost when the tier opened (0 when reused)."""


class ArenaSpace:
    """The arena of one DRAM tier and its free list."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.extents = ExtentAllocator(arena.size)

    def usage(self) -> ArenaUsage:
        arena = self.arena
        startup = arena.seconds if arena.fresh else 0.0
        free, largest = self.extents.free_bytes, self.extents.largest_free
        return ArenaUsage(arena.path, arena.size, free, largest, startup)

    @property
    def facts(self) -> ArenaFacts:
        return ArenaFacts(self.arena.identity, self.arena.size)

    def claim(self, key: str, extents: Extents) -> bool:
        """Take a committed entry's extents as the tier reopens; False (nothing taken) if any
        overlaps another entry's (the entry is then dropped)."""
        taken: list[tuple[int, int]] = []
        for offset, nbytes in extents:
            if not self.extents.claim(offset, nbytes):
                for got in taken:
                    self.extents.free(*got)
                log.warning("DRAM arena: %s overlaps another checkpoint; discarding it", key[:12])
                return False
            taken.append((offset, nbytes))
        return True

    def needs(self, sizes: Sequence[int]) -> int:
        """Arena bytes `sizes` take (each extent rounded up to whole pages)."""
        return sum(aligned(n) for n in sizes)

    def victims(
        self, sizes: Sequence[int], first: list[Held], others: Iterable[Held]
    ) -> list[Held]:
        """`first` (evicted anyway, for the byte budget) plus as many more of `others` (unpinned
        entries, least recently used first) as must go before one extent per size fits.
        Raises `NoRoomError` (nothing evicted) when even evicting them all leaves no fit: the
        arena is split by pinned checkpoints and writes in progress."""
        trial = self.extents.copy()
        chosen = list(first)
        for held in chosen:
            _free(trial, held.extents)
        for held in others:
            if trial.fits(sizes):
                break
            chosen.append(held)
            _free(trial, held.extents)
        if not trial.fits(sizes):
            raise NoRoomError(
                f"the DRAM arena has no room for extents of {format_size(max(sizes, default=0))} "
                f"(the largest free one, once every unpinned checkpoint is evicted, is "
                f"{format_size(trial.largest_free)}; {format_size(trial.free_bytes)} free in "
                "all): running instances pin the rest, or split it. Stop an instance or raise "
                "--dram-cache, then retry."
            )
        return chosen

    def place(self, staging: Path, sizes: Sequence[int]) -> Extents:
        """Allocate one extent per partition size (the caller evicted `victims` first) and
        record them in `staging` as its `arena.json`."""
        offsets = self.extents.allocate_all(sizes)
        assert offsets is not None, "victims() promised a fit"
        extents = tuple(zip(offsets, sizes, strict=True))
        try:
            write_placement(staging, self.placement(extents))
        except BaseException:
            self.release(extents)
            raise
        return extents

    def placement(self, extents: Extents) -> Placement:
        device, inode = self.arena.identity
        offsets = tuple(o for o, _ in extents)
        return Placement(self.arena.path, device, inode, offsets, tuple(n for _, n in extents))

    def release(self, extents: Extents) -> None:
        """Give extents back (an evicted entry's, or an abandoned write's)."""
        _free(self.extents, extents)

    def verify(self, path: Path, extents: Extents) -> bool:
        """True if every chunk of the entry at `path` matches its manifest's CRC-32 (read from
        the arena; ~1 GB/s per thread). Logs the first bad chunk otherwise."""
        try:
            manifest = Manifest.from_json((path / MANIFEST_NAME).read_bytes(), source=str(path))
        except (OSError, CheckpointError) as exc:
            log.warning("%s: %s; discarding it", path, exc)
            return False
        jobs = [
            (p, i, offset)
            for p, (offset, _) in enumerate(extents)
            for i in range(len(manifest.partitions[p].chunks))
        ]

        def check(job: tuple[int, int, int]) -> bool:
            p, i, offset = job
            part, size = manifest.partitions[p], manifest.chunk_size
            start = offset + i * size
            with self.arena.view(start, min(size, part.nbytes - i * size)) as data:
                return crc32_hex(data) == part.chunks[i]

        with ThreadPoolExecutor(max_workers=2) as pool:
            ok = all(pool.map(check, jobs))
        if not ok:
            log.warning("%s: its bytes in the DRAM arena fail their checksums; discarding", path)
        return ok


def _free(allocator: ExtentAllocator, extents: Extents) -> None:
    for offset, nbytes in extents:
        allocator.free(offset, nbytes)
