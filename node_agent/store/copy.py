"""Parallel local copy of a checkpoint directory (disk -> DRAM promotion, local imports).

Partitions are copied with positional reads straight into a shared mapping of the destination
file (one copy; with O_DIRECT, none through the page cache): reads of `read_size` bytes, several
threads, interleaved across partitions. When the source is not in the page cache it is read
with O_DIRECT, so promoting to DRAM does not also fill the page cache with a second copy.
With `verify`, every chunk's CRC-32 is checked as it lands. The manifest is written last.
"""

from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from checkpoint_format import MANIFEST_NAME, Manifest
from checkpoint_format.checksum import crc32_hex
from loader.sysio import open_read, resident_fraction
from node_agent.store.errors import CorruptObjectError, ShortFileError
from node_agent.store.sysio import allocate

DIRECT_BELOW_RESIDENT = 0.5  # read with O_DIRECT when less than half the file is cached


@dataclass(frozen=True)
class CopyResult:
    """What a copy moved and how fast."""

    nbytes: int
    seconds: float
    direct: bool

    @property
    def bytes_per_second(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Piece:
    part: int
    offset: int
    nbytes: int


class _Partition:
    """One source file open for reading and its destination mapped for writing."""

    def __init__(self, src: Path, dst: Path, nbytes: int, direct: bool) -> None:
        self.src, self.nbytes = src, nbytes
        self.fd, self.direct = open_read(src, direct=direct)
        self._dst_fd = -1
        try:
            self._dst_fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            allocate(self._dst_fd, dst, nbytes)
            self._map = mmap.mmap(self._dst_fd, nbytes) if nbytes else None
        except BaseException:
            if self._dst_fd >= 0:
                os.close(self._dst_fd)
            os.close(self.fd)
            raise
        self.view = memoryview(self._map) if self._map is not None else memoryview(b"")

    def read(self, piece: _Piece, expected_crc: str | None) -> str | None:
        """Fill `piece` of the destination from the source. With `expected_crc`, returns the
        piece's actual CRC-32 if it differs (None if it matches)."""
        with self.view[piece.offset : piece.offset + piece.nbytes] as dest:
            got = 0
            while got < piece.nbytes:
                with dest[got:] as rest:
                    n = os.preadv(self.fd, [rest], piece.offset + got)
                if n == 0:
                    raise ShortFileError(
                        f"{self.src}: ended at byte {piece.offset + got}, the manifest says "
                        f"{self.nbytes}; the checkpoint is truncated. Copy or convert it again."
                    )
                got += n
            if expected_crc is None:
                return None
            actual = crc32_hex(dest)
        return None if actual == expected_crc else actual

    def close(self, *, durable: bool) -> None:
        self.view.release()
        if self._map is not None:
            if durable:
                self._map.flush()
            self._map.close()
        if durable:
            os.fsync(self._dst_fd)
        os.close(self._dst_fd)
        os.close(self.fd)


def copy_checkpoint(
    src: Path,
    dst: Path,
    manifest: Manifest,
    manifest_bytes: bytes,
    *,
    threads: int,
    read_size: int,
    verify: bool,
    durable: bool,
) -> CopyResult:
    """Copy checkpoint `src` (described by `manifest`) into the existing directory `dst`.

    `verify` checks every chunk and copied file against the manifest (raises
    `CorruptObjectError` naming the file and chunk); `durable` fsyncs before the manifest is
    written (disk tier; pointless on tmpfs).
    """
    start = time.perf_counter()
    direct = _should_read_direct(src, manifest)
    parts: list[_Partition] = []
    try:
        for p in manifest.partitions:
            parts.append(_Partition(src / p.file, dst / p.file, p.nbytes, direct))
        size = manifest.chunk_size if verify else read_size
        pieces = _plan(manifest, size)
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            list(pool.map(lambda piece: _copy_piece(parts, piece, manifest, verify), pieces))
    finally:
        for part in parts:
            part.close(durable=durable)
    for name, entry in manifest.files.items():
        data = (src / name).read_bytes()
        if verify and (got := crc32_hex(data)) != entry.crc32:
            raise CorruptObjectError(str(src / name), 0, 0, entry.nbytes, entry.crc32, got)
        (dst / name).write_bytes(data)
    write_manifest(dst, manifest_bytes, durable=durable)
    nbytes = manifest.total_bytes
    return CopyResult(nbytes, time.perf_counter() - start, all(p.direct for p in parts))


def _should_read_direct(src: Path, manifest: Manifest) -> bool:
    sizes = [(src / p.file, p.nbytes) for p in manifest.partitions if p.nbytes]
    total = sum(n for _, n in sizes)
    if not total:
        return False
    cached = sum(resident_fraction(path) * n for path, n in sizes)
    return cached / total < DIRECT_BELOW_RESIDENT


def _plan(manifest: Manifest, size: int) -> list[_Piece]:
    """Pieces of at most `size` bytes, interleaved across partitions."""
    per_part = [
        [_Piece(i, off, min(size, p.nbytes - off)) for off in range(0, p.nbytes, size)]
        for i, p in enumerate(manifest.partitions)
    ]
    longest = max((len(p) for p in per_part), default=0)
    return [p[i] for i in range(longest) for p in per_part if i < len(p)]


def _copy_piece(parts: list[_Partition], piece: _Piece, manifest: Manifest, verify: bool) -> None:
    entry = manifest.partitions[piece.part]
    index = piece.offset // manifest.chunk_size  # pieces are whole chunks when verifying
    expected = entry.chunks[index] if verify else None
    actual = parts[piece.part].read(piece, expected)
    if actual is not None:
        where = str(parts[piece.part].src)
        end = piece.offset + piece.nbytes
        raise CorruptObjectError(where, index, piece.offset, end, entry.chunks[index], actual)


def write_manifest(dst: Path, manifest_bytes: bytes, *, durable: bool) -> None:
    """Write the manifest last, under a temporary name then renamed (SPEC.md)."""
    tmp = dst / f".{MANIFEST_NAME}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, manifest_bytes)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dst / MANIFEST_NAME)
