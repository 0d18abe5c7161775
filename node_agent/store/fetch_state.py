"""The resume sidecar of a download: which parts are complete and verified.

It lives in the staging directory next to the partial files, is rewritten atomically after
each verified part, and is only trusted after re-checking: on resume every recorded part is
read back from the partial file and its CRC-32s are checked again (a part whose bytes did
not reach the disk before a crash is simply fetched again).
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Iterable
from pathlib import Path

from node_agent.store.fetch_plan import Part
from node_agent.store.index import atomic_write_json, read_json

SIDECAR = ".fetch-state.json"
_VERSION = 1


class FetchState:
    """Completed part ids of one download into `staging` (thread-safe)."""

    def __init__(self, staging: Path, key: str, part_size: int) -> None:
        self.path = staging / SIDECAR
        self.key, self.part_size = key, part_size
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def load(self) -> set[str]:
        """Part ids a previous attempt recorded (empty if none, or for another key/part size)."""
        doc = read_json(self.path)
        if (
            isinstance(doc, dict)
            and doc.get("version") == _VERSION
            and doc.get("key") == self.key
            and doc.get("part_size") == self.part_size
            and isinstance(doc.get("done"), list)
        ):
            return {str(part_id) for part_id in doc["done"]}
        return set()

    def start(self, done: Iterable[str]) -> None:
        """Begin this attempt with `done` (the re-verified part ids) and record them."""
        with self._lock:
            self._done = set(done)
            self._save()

    def mark_done(self, part_id: str) -> int:
        """Record a verified part; returns how many are recorded."""
        with self._lock:
            self._done.add(part_id)
            self._save()
            return len(self._done)

    def remove(self) -> None:
        """Delete the sidecar (the download is complete)."""
        self.path.unlink(missing_ok=True)

    def _save(self) -> None:
        doc = {
            "version": _VERSION,
            "key": self.key,
            "part_size": self.part_size,
            "done": sorted(self._done),
        }
        # No fsync: recorded parts are re-verified on resume, so a lost update only costs time.
        atomic_write_json(self.path, doc, durable=False)


def part_is_intact(path: Path, part: Part) -> bool:
    """True if the bytes of `part` in the partial file `path` meet all its checksums."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        for check in part.checks:
            data = os.pread(fd, check.end - check.start, check.start)
            if len(data) != check.end - check.start:
                return False
            if f"{zlib.crc32(data) & 0xFFFFFFFF:08x}" != check.crc:
                return False
    finally:
        os.close(fd)
    return True
