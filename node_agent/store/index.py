"""A tier's index: a small JSON file of what the tier holds, rewritten atomically.

Written to a temporary name in the same directory, fsynced, then renamed over the old one, so
a crash leaves either the old or the new index, never half of one. The index records facts
(key, the sources it is known to come from, size, last use); whether an entry is usable is
re-derived from the directory when a tier opens (`Tier.open`).

Each entry keeps `sources` (most recent first) and, for readers of older indexes, `source` (the
first of them); an index written before `sources` existed is read as that one source. A DRAM
tier's entries also record their `extents` in the arena (`[offset, nbytes]` per partition):
only committed ones, since an entry is saved only once its copy is whole. `clean` is true only
in the index a tier writes when it closes: a tier that opens without it was not shut down
cleanly (killed), and re-checks its arena's bytes (`Tier.open`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_VERSION = 1


@dataclass(frozen=True)
class IndexEntry:
    """One held checkpoint as recorded in the index."""

    key: str
    sources: tuple[str, ...]  # every source known to hold these bytes, most recent first
    nbytes: int
    last_used: float  # seconds since the epoch
    extents: tuple[tuple[int, int], ...] = ()  # (offset, nbytes) per partition, in an arena

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "key": self.key,
            "source": self.sources[0] if self.sources else "",
            "sources": list(self.sources),
            "nbytes": self.nbytes,
            "last_used": self.last_used,
        }
        if self.extents:
            doc["extents"] = [list(e) for e in self.extents]
        return doc


def atomic_write_json(path: Path, doc: Any, *, durable: bool = True) -> None:
    """Replace `path` with `doc` as JSON: temp file, fsync (if `durable`), rename (atomic on
    POSIX: readers see the old or the new file, never a mix)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"
    # Never through a planted symlink: drop any stale temp name, then create it exclusively.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """`path` parsed as JSON, or None if missing or unreadable (logged: the caller rebuilds)."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); rebuilding it from the directory", path, exc)
        return None


def load_index(root: Path) -> dict[str, IndexEntry]:
    """Entries recorded in `root`'s index; empty if there is none or it is damaged."""
    doc = read_json(root / INDEX_NAME)
    if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION:
        return {}
    entries: dict[str, IndexEntry] = {}
    for raw in doc.get("entries", []):
        try:
            entry = IndexEntry(
                key=str(raw["key"]),
                sources=_sources(raw),
                nbytes=int(raw["nbytes"]),
                last_used=float(raw["last_used"]),
                extents=tuple((int(o), int(n)) for o, n in raw.get("extents", [])),
            )
        except (KeyError, TypeError, ValueError):
            log.warning("%s: skipping a malformed entry %r", root / INDEX_NAME, raw)
            continue
        entries[entry.key] = entry
    return entries


def _sources(raw: dict[str, Any]) -> tuple[str, ...]:
    """An entry's sources: its `sources` list, else (an older index) its one `source`."""
    listed = raw.get("sources")
    if listed is None:
        listed = [raw["source"]]
    if not isinstance(listed, list):
        raise TypeError(f"sources must be a list, not {type(listed).__name__}")
    return tuple(str(s) for s in listed if s)


def closed_cleanly(root: Path) -> bool:
    """True if `root`'s index was last written by a tier closing (see the module doc)."""
    doc = read_json(root / INDEX_NAME)
    return isinstance(doc, dict) and doc.get("clean") is True


def save_index(root: Path, entries: list[IndexEntry], *, clean: bool = False) -> None:
    """Write `entries` as `root`'s index; `clean` only when the tier is closing."""
    doc = {"version": INDEX_VERSION, "entries": [e.to_json() for e in entries], "clean": clean}
    atomic_write_json(root / INDEX_NAME, doc)
