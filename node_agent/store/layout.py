"""The directory layout of a tier, and the check that an entry directory is whole.

```
<root>/
  .lock                  flock'd by the agent that owns the tier
  index.json             what the tier holds (index.py)
  arena                  DRAM tier only: every checkpoint's partition bytes (arena.py)
  <key>/                 one checkpoint, exactly as in checkpoint_format/SPEC.md; in the DRAM
                         tier, `arena.json` (loader/arena.py) in place of its partition files
  .staging/<key>/        a checkpoint being written (downloads resume from here)
  .trash/<key>.<n>/      evicted, being deleted
```

An entry directory appears only by renaming a complete staging directory, so a directory named
by a key is whole unless the machine lost power or someone edited it; `inspect_entry` checks
the cheap facts (manifest hash, file sizes) when a tier opens.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from checkpoint_format import MANIFEST_NAME, CheckpointError, Manifest
from loader.arena import Placement, read_placement
from node_agent.facts.errors import StoreError
from node_agent.store.identity import checkpoint_key, is_key
from node_agent.store.index import INDEX_NAME, IndexEntry

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
STAGING = ".staging"
TRASH = ".trash"


def stored_nbytes(manifest: Manifest, manifest_bytes: bytes) -> int:
    """Bytes a checkpoint occupies in a tier: partitions, copied files and the manifest."""
    files = sum(f.nbytes for f in manifest.files.values())
    return manifest.total_bytes + files + len(manifest_bytes)


@dataclass(frozen=True)
class ArenaFacts:
    """What an arena tier's scan checks placements against."""

    identity: tuple[int, int]  # (device, inode) of the arena file
    size: int


@dataclass(frozen=True)
class Inspected:
    """A whole entry: its stored bytes and (DRAM tier) its arena extents per partition."""

    nbytes: int
    extents: tuple[tuple[int, int], ...] = ()


def inspect_entry(path: Path, key: str, arena: ArenaFacts | None = None) -> Inspected | None:
    """Stored bytes of the checkpoint in `path` if it is whole and its manifest hashes to
    `key`; None (with the reason logged) otherwise. Checksums are not re-read: bytes were
    verified on the way in (see `Tier.open` for the arena after an unclean shutdown). In an
    arena tier (`arena`), an entry's partitions must be placed in that very arena file."""
    try:
        data = (path / MANIFEST_NAME).read_bytes()
    except OSError as exc:
        log.warning("%s: no readable manifest (%s); discarding the entry", path, exc)
        return None
    if checkpoint_key(data) != key:
        log.warning("%s: manifest does not hash to the directory name; discarding it", path)
        return None
    try:
        manifest = Manifest.from_json(data, source=str(path / MANIFEST_NAME))
    except CheckpointError as exc:
        log.warning("%s: %s; discarding the entry", path, exc)
        return None
    extents = _placed(path, manifest, arena)
    if extents is None:
        return None
    expected = {name: f.nbytes for name, f in manifest.files.items()}
    if arena is None:
        expected |= {p.file: p.nbytes for p in manifest.partitions}
    for name, nbytes in expected.items():
        size = _size(path / name)
        if size != nbytes:
            log.warning("%s: %s has %s bytes, expected %d; discarding", path, name, size, nbytes)
            return None
    return Inspected(stored_nbytes(manifest, data), extents)


def _placed(
    path: Path, manifest: Manifest, arena: ArenaFacts | None
) -> tuple[tuple[int, int], ...] | None:
    """The entry's arena extents (() outside an arena tier); None if they are unusable."""
    try:
        placement = read_placement(path)
    except CheckpointError as exc:
        log.warning("%s: %s; discarding the entry", path, exc)
        return None
    if arena is None:
        if placement is None:
            return ()
        log.warning("%s: placed in an arena, but this tier has none; discarding it", path)
        return None
    if placement is None:
        log.warning("%s: partition files from before the DRAM arena; discarding the entry", path)
        return None
    if not _fits(placement, manifest, arena):
        log.warning("%s: placed in another arena, or outside this one; discarding it", path)
        return None
    return tuple(zip(placement.offsets, placement.sizes, strict=True))


def _fits(placement: Placement, manifest: Manifest, arena: ArenaFacts) -> bool:
    if (placement.device, placement.inode) != arena.identity:
        return False
    if placement.sizes != tuple(p.nbytes for p in manifest.partitions):
        return False
    return all(placement.end(i) <= arena.size for i in range(len(placement.sizes)))


@dataclass(frozen=True)
class TierScan:
    """What a tier directory holds when it opens."""

    entries: list[IndexEntry]  # whole checkpoints (sources and last use from the index)
    partials: dict[str, int]  # key -> bytes of interrupted staging directories kept


def scan_tier(
    root: Path,
    recorded: dict[str, IndexEntry],
    *,
    keep_partials: bool,
    arena: ArenaFacts | None = None,
) -> TierScan:
    """Reconcile `root` with its recorded index: keep whole entry directories, delete damaged
    ones, trash, stray temporary files and (unless `keep_partials`) staging leftovers."""
    remove_tree(root / TRASH)
    entries = []
    for child in sorted(root.iterdir()):
        if is_key(child.name) and child.is_dir():
            found = inspect_entry(child, child.name, arena)
            if found is None:
                remove_tree(child)
                continue
            old = recorded.get(child.name)
            sources, used = (old.sources, old.last_used) if old else ((), child.stat().st_mtime)
            entries.append(IndexEntry(child.name, sources, found.nbytes, used, found.extents))
        elif child.name.startswith(f".{INDEX_NAME}.") and child.name.endswith(".tmp"):
            child.unlink()
    partials = {}
    for partial in sorted((root / STAGING).iterdir()):
        if keep_partials and is_key(partial.name):
            partials[partial.name] = disk_usage(partial)
        else:
            remove_tree(partial)
    return TierScan(entries, partials)


def disk_usage(path: Path) -> int:
    """Bytes allocated under `path` (sparse files count what is really written)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def remove_tree(path: Path) -> None:
    """Delete a directory tree; one that is already gone is fine."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def secure_root(root: Path) -> None:
    """Create `root` (0700) or check an existing one is ours: a real directory owned by this
    user that nobody else can write. Checkpoints in a tier are served without re-reading their
    checksums, so a directory another user controls (say, a predictable name in /dev/shm that
    they created first) could swap the weights an instance loads."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o700)
    st = os.lstat(root)
    problem = None
    if not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory (a symlink or a file)"
    elif st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not by this user ({os.geteuid()})"
    elif st.st_mode & 0o022:
        problem = f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    if problem is not None:
        raise StoreError(
            f"tier directory {root} {problem}; remove it or choose another directory "
            "(--dram-dir / --home) that only this user can write"
        )
