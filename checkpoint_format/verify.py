"""Check every chunk checksum of a checkpoint and say exactly which chunk of which file is bad."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from checkpoint_format.checksum import crc32_hex
from checkpoint_format.errors import (
    BadChunk,
    ChecksumMismatchError,
    TruncatedPartitionError,
    UnsafeNameError,
)
from checkpoint_format.manifest import Manifest, PartitionEntry, read_manifest


@dataclass
class VerifyReport:
    """What `verify_checkpoint` found: bytes checked and the chunks (or files) that are bad."""

    ckpt_dir: str
    checked_bytes: int = 0
    chunks: int = 0
    bad: list[BadChunk] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    def raise_if_bad(self) -> None:
        """Raise `ChecksumMismatchError` listing every bad chunk, if any."""
        if self.bad:
            raise ChecksumMismatchError(self.ckpt_dir, self.bad)


def check_partition_size(ckpt_dir: Path, part: PartitionEntry) -> None:
    """Raise `TruncatedPartitionError` unless the file exists with exactly the manifest's size
    (and `UnsafeNameError` if it is a symlink, which could point outside the directory)."""
    path = ckpt_dir / part.file
    if path.is_symlink():
        raise UnsafeNameError(
            f"{path}: partition file is a symlink; a checkpoint's files must be regular files "
            "inside its directory. Copy the real file in place of the link."
        )
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = -1
    if size != part.nbytes:
        found = "is missing" if size < 0 else f"has {size} bytes"
        raise TruncatedPartitionError(
            f"{path}: partition file {found}, the manifest says {part.nbytes}. The copy is "
            "incomplete or damaged: copy or convert the checkpoint again."
        )


def _check_chunk(path: Path, part: PartitionEntry, index: int, chunk_size: int) -> BadChunk | None:
    start = index * chunk_size
    end = min(start + chunk_size, part.nbytes)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # see loader.sysio
    try:
        data = os.pread(fd, end - start, start)
    finally:
        os.close(fd)
    actual = crc32_hex(data)
    if actual == part.chunks[index]:
        return None
    return BadChunk(part.file, index, start, end, part.chunks[index], actual)


def _check_file(ckpt_dir: Path, name: str, manifest: Manifest) -> BadChunk | None:
    entry = manifest.files[name]
    path = ckpt_dir / name
    data = path.read_bytes() if path.is_file() else b""
    actual = crc32_hex(data) if path.is_file() else "missing!"
    if actual == entry.crc32 and len(data) == entry.nbytes:
        return None
    return BadChunk(name, 0, 0, entry.nbytes, entry.crc32, actual)


def verify_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    *,
    threads: int = 4,
    on_chunk: Callable[[int], object] | None = None,
) -> VerifyReport:
    """Check sizes, every chunk checksum and every copied file of the checkpoint at `ckpt_dir`.

    Structural problems (bad manifest, wrong partition size) raise their typed errors; checksum
    mismatches are collected in the report (`report.raise_if_bad()` turns them into an error).
    `on_chunk(nbytes)` is called after each chunk, for progress bars.
    """
    root = Path(ckpt_dir)
    manifest = read_manifest(root)
    for part in manifest.partitions:
        check_partition_size(root, part)
    jobs = [(part, i) for part in manifest.partitions for i in range(len(part.chunks))]
    report = VerifyReport(str(root))

    def run(job: tuple[PartitionEntry, int]) -> BadChunk | None:
        part, i = job
        bad = _check_chunk(root / part.file, part, i, manifest.chunk_size)
        if on_chunk is not None:
            on_chunk(min(manifest.chunk_size, part.nbytes - i * manifest.chunk_size))
        return bad

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(run, jobs))
    report.bad = [b for b in results if b is not None]
    report.bad += [b for name in manifest.files if (b := _check_file(root, name, manifest))]
    report.chunks = len(jobs)
    report.checked_bytes = manifest.total_bytes
    return report
