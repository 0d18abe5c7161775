"""Watching a copy while it runs: what a streamed promotion reports to.

A disk -> DRAM promotion can be consumed while it is still running (`CheckpointStore.
ensure_with_origin(..., tap=...)`): the copy tells its `Tap` where the staging files are, then
every piece it has written, in the order the tap asked for. An instance loading from those
files waits, layer by layer, for the ranges its weights occupy (`node_agent.landing.Landed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from checkpoint_format import Manifest
from node_agent.facts.tiers import Origin


class Tap(Protocol):
    """What a streamed promotion reports to (called from the copy's threads)."""

    def order(self, manifest: Manifest) -> list[tuple[int, int, int]]:
        """Byte ranges `(partition, start, end)` in the order they are needed; pieces are
        copied in the order of the first range they overlap (the rest after, in file order)."""
        ...

    def came_from(self, origin: Origin) -> None:
        """Where the disk tier's copy came from (this call's download, copy or conversion, or
        the disk tier itself): what the load will have been loaded from."""
        ...

    def begin(self, staging: Path, committed: Path, manifest_bytes: bytes) -> None:
        """The staging directory holds the small files (config, tokenizer) and the partition
        files at their full size (blocks reserved), no weights yet, and no manifest (written
        last, when the copy is whole): these are its bytes. When the copy is whole, `staging`
        is renamed to `committed` (the same files: whoever opened them keeps them)."""
        ...

    def landed(self, partition: int, start: int, end: int) -> None:
        """Bytes `[start, end)` of `partition` are written."""
        ...
