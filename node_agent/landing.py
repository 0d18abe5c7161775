"""The contract between a copy in progress and the engine that consumes it: which byte ranges
of each partition file have landed (`Landed`), how a failed copy shows (`CopyFailedError`), and
how to open the directory being written so a rename mid-read changes nothing (`open_either`).

The store's copy reports ranges through its `Tap` (`node_agent.store.stream`); the node agent
relays them to the instance, whose engine (`engine.streamed`) records them here and waits on
them, layer by layer. Neither side imports the other: the engine knows no tiers, the store no
engine.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


class CopyFailedError(Exception):
    """The copy being waited on failed; the bytes will never land."""


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
