"""Watching a copy while it runs: which byte ranges of each partition file have landed.

A disk -> DRAM promotion can be consumed while it is still running (`CheckpointStore.
ensure_with_origin(..., tap=...)`): the copy tells its `Tap` where the staging files are, then
every piece it has written, in the order the tap asked for. An instance loading from those
files waits, layer by layer, for the ranges its weights occupy (`Landed.wait`).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from checkpoint_format import Manifest
from node_agent.store.origin import Origin


class CopyFailedError(Exception):
    """The copy being waited on failed; the bytes will never land."""


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


class Landed:
    """The ranges of each partition written so far; thread-safe, waitable.

    Ranges are kept merged, so a check is a binary search however many pieces landed."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = list(sizes)
        self._spans: list[list[tuple[int, int]]] = [[] for _ in sizes]  # sorted, disjoint
        self._cond = threading.Condition()
        self._failed: str | None = None

    def add(self, partition: int, start: int, end: int) -> None:
        """Record `[start, end)` of `partition` as written and wake waiters."""
        if not 0 <= partition < len(self.sizes) or not 0 <= start <= end <= self.sizes[partition]:
            raise ValueError(
                f"range [{start}, {end}) of partition {partition} is outside the checkpoint "
                f"(partition sizes {self.sizes})"
            )
        if start == end:
            return
        with self._cond:
            spans = self._spans[partition]
            i = bisect.bisect_left(spans, (start, start))
            if i > 0 and spans[i - 1][1] >= start:  # touches or overlaps the one before
                i -= 1
            j = i
            while j < len(spans) and spans[j][0] <= end:
                start, end = min(start, spans[j][0]), max(end, spans[j][1])
                j += 1
            spans[i:j] = [(start, end)]
            self._cond.notify_all()

    def covers(self, partition: int, start: int, end: int) -> bool:
        """True if every byte of `[start, end)` of `partition` has landed."""
        if start >= end:
            return True
        with self._cond:
            return self._covers(partition, start, end)

    def _covers(self, partition: int, start: int, end: int) -> bool:
        spans = self._spans[partition]
        i = bisect.bisect_right(spans, (start, float("inf"))) - 1
        return i >= 0 and spans[i][0] <= start and spans[i][1] >= end

    @property
    def complete(self) -> bool:
        """True once every byte of every partition has landed."""
        return all(self.covers(p, 0, n) for p, n in enumerate(self.sizes))

    def wait(self, partition: int, start: int, end: int, timeout: float | None = None) -> None:
        """Block until `[start, end)` of `partition` has landed. Raises `CopyFailedError` if
        the copy failed first, `TimeoutError` after `timeout` seconds."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._failed is not None or self._covers(partition, start, end), timeout
            )
            if self._failed is not None:
                raise CopyFailedError(self._failed)
            if not ok:
                raise TimeoutError(
                    f"bytes [{start}, {end}) of partition {partition} did not land within "
                    f"{timeout} s"
                )

    def fail(self, reason: str) -> None:
        """The copy failed: every current and future `wait` raises `CopyFailedError`."""
        with self._cond:
            if self._failed is None:  # the first reason is the cause; later ones are echoes
                self._failed = reason
            self._cond.notify_all()

    @property
    def failed(self) -> str | None:
        """Why the copy failed, or None."""
        with self._cond:
            return self._failed


@contextlib.contextmanager
def open_either(staging: Path, committed: Path) -> Iterator[Path]:
    """A path to the directory `staging`, or to `committed` if it was renamed there already,
    that keeps meaning the same directory however it is renamed later (/proc/self/fd/N): files
    read through it all come from one directory, and none vanishes mid-way."""
    try:
        fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        fd = os.open(committed, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
