"""Checkpoints placed in an arena: partition bytes at offsets of one shared-memory file.

A node's DRAM tier keeps every checkpoint's partitions in one pre-faulted file (the *arena*,
`node_agent.store.arena`) instead of one file per partition, so promoting a checkpoint writes
into memory that is already allocated, and a worker that mapped the arena once binds tensors at
offsets into memory it already has. Such a checkpoint directory holds the manifest and the small
files as usual, plus `arena.json` (this module's `Placement`) in place of its partition files:

    {"version": 1, "arena": "/dev/shm/stoke-0-n1/arena", "device": 45, "inode": 7,
     "partitions": [{"offset": 0, "nbytes": 4096}, ...]}

`device`/`inode` name the arena file itself, so a record left over from a replaced arena (the
node restarted with another budget) never binds tensors to unrelated bytes. Offsets are
multiples of 4096 (mappable, usable by `O_DIRECT`). `ArenaMap` is a process's one read-only
view of a whole arena (copy-on-write, so writing a weight never changes the arena), with every
page present, made once when a worker starts (a GPU worker's is shared read-only and
page-locked instead, `loader.cuda.pin_arena`).
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checkpoint_format import Manifest
from loader.errors import LoaderError
from loader.sysio import PAGE, READ_FLAGS, map_file, populate

PLACEMENT_NAME = "arena.json"
PLACEMENT_VERSION = 1
ALIGN = 4096


@dataclass(frozen=True)
class Placement:
    """Where a checkpoint's partitions live in an arena: `offsets[i]` holds partition i's
    `sizes[i]` bytes."""

    arena: Path
    device: int
    inode: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLACEMENT_VERSION,
            "arena": str(self.arena),
            "device": self.device,
            "inode": self.inode,
            "partitions": [
                {"offset": o, "nbytes": n} for o, n in zip(self.offsets, self.sizes, strict=True)
            ],
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Placement:
        try:
            if doc["version"] != PLACEMENT_VERSION:
                raise ValueError(f"version {doc['version']!r}, expected {PLACEMENT_VERSION}")
            parts = doc["partitions"]
            placement = cls(
                Path(str(doc["arena"])),
                int(doc["device"]),
                int(doc["inode"]),
                tuple(int(p["offset"]) for p in parts),
                tuple(int(p["nbytes"]) for p in parts),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LoaderError(f"{where}: not a valid arena placement ({exc})") from None
        pairs = zip(placement.offsets, placement.sizes, strict=True)
        if len(placement.offsets) != len(placement.sizes) or any(
            o < 0 or o % ALIGN or n < 0 for o, n in pairs
        ):
            raise LoaderError(f"{where}: arena offsets must be non-negative multiples of {ALIGN}")
        return placement

    def check(self, manifest: Manifest, where: str) -> None:
        """Raise `LoaderError` unless the placement gives every partition its manifest size."""
        want = tuple(p.nbytes for p in manifest.partitions)
        if self.sizes != want:
            raise LoaderError(
                f"{where}: the arena placement gives partitions {self.sizes} bytes, the manifest "
                f"says {want}; the directory is damaged: evict it from the DRAM tier."
            )

    def end(self, partition: int) -> int:
        """First byte after partition `partition`'s extent."""
        return self.offsets[partition] + self.sizes[partition]


def read_placement(root: Path) -> Placement | None:
    """The arena placement recorded in checkpoint directory `root`, or None if its partitions
    are ordinary files."""
    path = root / PLACEMENT_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise LoaderError(f"{path}: not JSON ({exc})") from None
    return Placement.from_json(doc, str(path))


def write_placement(root: Path, placement: Placement) -> None:
    """Record `placement` in checkpoint directory `root` (written before the directory is
    committed by a rename, so a committed directory always has a whole record)."""
    (root / PLACEMENT_NAME).write_text(json.dumps(placement.to_json(), indent=1) + "\n")


def open_arena(placement: Placement) -> tuple[int, int]:
    """Open the arena file `placement` names, checking it is the same file and large enough;
    returns `(fd, size)`. Raises `LoaderError` naming the fix otherwise."""
    try:
        fd = os.open(placement.arena, READ_FLAGS)
    except OSError as exc:
        raise LoaderError(
            f"{placement.arena}: cannot open the DRAM arena ({exc.strerror}); the node's DRAM "
            "tier was removed: ensure the checkpoint again."
        ) from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (placement.device, placement.inode) or any(
        placement.end(i) > st.st_size for i in range(len(placement.sizes))
    ):
        os.close(fd)
        raise LoaderError(
            f"{placement.arena}: not the arena this checkpoint was placed in (it was recreated); "
            "ensure the checkpoint again."
        )
    return fd, st.st_size


class ArenaMap:
    """One process's read-only view of a whole arena, made once (a worker at start).

    For the CPU: mapped copy-on-write (the arena itself is never written through it), every
    page present, so a load from the arena maps nothing and faults nothing. `for_gpu`: mapped
    shared and read-only, for `loader.cuda.pin_arena` to page-lock for the GPU (a private
    mapping could be copied by a pin; a shared read-only one cannot), then `pinned`."""

    def __init__(self, path: str | os.PathLike[str], *, for_gpu: bool = False) -> None:
        self.path = Path(path)
        self.for_gpu = for_gpu
        self.pinned = False
        fd = os.open(self.path, READ_FLAGS)
        try:
            st = os.fstat(fd)
            self.identity = (st.st_dev, st.st_ino)
            self.size = st.st_size
            if self.size < PAGE:
                raise LoaderError(f"{self.path}: an arena of {self.size} bytes is too small")
            if for_gpu:
                self.mapping = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            else:
                self.mapping = map_file(fd, self.size)
        finally:
            os.close(fd)
        if not for_gpu:  # pinning faults the pages in itself
            populate(self.mapping, 0, self.size)

    def holds(self, placement: Placement) -> bool:
        """True if `placement` is in this very arena file (same device and inode)."""
        return (placement.device, placement.inode) == self.identity and all(
            placement.end(i) <= self.size for i in range(len(placement.sizes))
        )

    def address(self) -> int:
        """Address of the first byte of the mapping (tests check tensors lie inside it)."""
        from loader.sysio import buffer_address

        return buffer_address(self.mapping)
