"""The agent's side of a streamed load: a `Tap` that hands a disk -> DRAM copy's progress from
the copy's threads to the event loop, and the order a model needs its bytes in.

A cold start from the disk tier would otherwise be copy, then build, then the first forward
pass. Streamed, the worker builds while the copy runs and the first pass follows the copy layer
by layer (`node_agent.engine.streamed`), so TTFT is about the copy plus the last layer's compute.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from checkpoint_format import Manifest
from node_agent.facts.tiers import Origin

log = logging.getLogger(__name__)

_LAYER = re.compile(r"\.(\d+)\.")
STREAMED_DTYPE = "float32"  # the CPU compute dtype: anything else is converted at load


def streamable(manifest: Manifest) -> bool:
    """True if a CPU worker can use the checkpoint's bytes as they land: every tensor is
    stored in the compute dtype. Otherwise the load converts every tensor, so it waits for the
    whole copy and loads the usual way."""
    # A config kept only in the manifest cannot be read before the copy ends (it lands last).
    if "config.json" not in manifest.files:
        return False
    return all(e.dtype == STREAMED_DTYPE for e in manifest.tensors.values())


def need_order(manifest: Manifest) -> list[tuple[int, int, int]]:
    """Every tensor's byte range `(partition, start, end)`, in the order a decoder's forward
    pass reads them: embeddings, then layer 0, 1, ... (the first `.N.` in the name), then the
    rest (final norm, LM head). Writers lay tensors out by name (`layers.10` before
    `layers.2`, the LM head first), which is not the order they are used in."""

    def rank(name: str) -> tuple[int, int]:
        if (m := _LAYER.search(name)) is not None:
            return 1, int(m.group(1))
        return (0, 0) if "embed" in name else (2, 0)

    ordered = sorted(manifest.tensors.items(), key=lambda kv: (rank(kv[0]), kv[1].offset))
    return [(e.partition, e.offset, e.offset + e.nbytes) for _, e in ordered]


class LoadTap:
    """A `stream.Tap` for one load: `started` resolves with `(staging, committed,
    manifest_bytes)` when the copy begins; `landed` queues each written range on the loop.
    Create it on the loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.started: asyncio.Future[tuple[Path, Path, bytes]] = self._loop.create_future()
        self.landed_ranges: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue()
        self._detached = False  # set by the copy's threads
        self.origin = Origin.DISK
        self.directory: tuple[int, int] | None = None  # (device, inode) of the staging dir

    def order(self, manifest: Manifest) -> list[tuple[int, int, int]]:
        return need_order(manifest)

    def came_from(self, origin: Origin) -> None:
        self.origin = origin  # read on the loop after `started`, which this happens before

    @property
    def restarted(self) -> bool:
        """The store copied a second time (its entry was evicted between the commit and its
        pin): the load must not use what it mapped (the files may be the second copy's)."""
        return self._detached

    def begin(self, staging: Path, committed: Path, manifest_bytes: bytes) -> None:
        if self.directory is not None:  # begun already: this is a second copy
            self._detached = True
            return
        st = os.stat(staging)
        self.directory = (st.st_dev, st.st_ino)  # kept by the rename to `committed`
        self._call(self._start, (staging, committed, manifest_bytes))

    def _start(self, got: tuple[Path, Path, bytes]) -> None:
        if not self.started.done():
            self.started.set_result(got)

    def landed(self, partition: int, start: int, end: int) -> None:
        if not self._detached:
            self._call(self.landed_ranges.put_nowait, (partition, start, end))

    def _call(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Run `fn(arg)` on the loop. Never raises into the copy (other loads may share it):
        with the loop gone (the agent stopping) this load is over anyway."""
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError as exc:
            log.info("a streamed load's loop is closed (%s); the copy goes on without it", exc)
            self._detached = True

    def is_ours(self, path: Path) -> bool:
        """True if `path` is the directory this load's copy wrote (the same inode): not a
        second copy made after an eviction, nor another load's."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return self.directory == (st.st_dev, st.st_ino)

    def drain(self) -> list[tuple[int, int, int]]:
        """Every range queued so far."""
        got = []
        while not self.landed_ranges.empty():
            got.append(self.landed_ranges.get_nowait())
        return got
