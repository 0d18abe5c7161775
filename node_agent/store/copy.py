"""Parallel local copy of a checkpoint directory (disk -> DRAM promotion, local imports).

Partitions are copied in pieces of `read_size` bytes by several threads, interleaved across
partitions, into destination files whose blocks are reserved first (`allocate`). How a piece
moves depends on where its bytes are (measured on 2 GiB, disk -> /dev/shm, `stoke bench fetch`):

- source not in the page cache: `O_DIRECT` reads into a small reused per-thread buffer, then
  `pwrite` into the destination. Reading straight into a mapping of the destination was ~15%
  slower: every destination page then faults, and tmpfs zeroes it before the read overwrites
  it, while `pwrite` of whole pages skips the zeroing. Nothing lands in the page cache, so
  promoting to DRAM does not also leave a second copy there.
- source cached and no checks asked: `sendfile` from the source into the destination, one copy
  inside the kernel (about as fast as `cp`; reading through a user buffer costs a second copy).
- with `verify`: the buffered path, so every chunk's CRC-32 is checked before it is written.
- into the DRAM arena (`into`: the partitions' extents, already faulted in): the source is read
  straight into the arena's pages, with `O_DIRECT` when it is not cached. No allocation, no
  zeroing, no second copy: a cold promotion runs at the disk's `O_DIRECT` ceiling.
- out of the DRAM arena (`from_memory`): each piece is written from the arena's pages.

The manifest is written last.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import queue
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from checkpoint_format import MANIFEST_NAME, Manifest
from checkpoint_format.checksum import crc32_hex
from loader.sysio import anonymous_buffer, open_read, resident_fraction
from node_agent.store.errors import CorruptObjectError, ShortFileError
from node_agent.store.stream import Tap
from node_agent.store.sysio import allocate, write_all

_NO_SENDFILE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)  # file systems that refuse it
DIRECT_BELOW_RESIDENT = 0.5  # read with O_DIRECT when less than half the file is cached
ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses are multiples of this
# sendfile pieces: 4 x 64 MiB ran at 2.0-2.3 GB/s where 4 x 8 MiB ran at 1.7-1.8 (4.3 GB,
# disk page cache -> /dev/shm, alternated; `cp` 1.5-1.9 in the same runs)
SENDFILE_PIECE = 64 << 20


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


class _Buffers:
    """Page-aligned scratch buffers of `nbytes` (rounded up to `ALIGN`), one per thread at a
    time; made on first use and reused, so their pages fault once, not once per piece."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = -(-nbytes // ALIGN) * ALIGN
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._all: list[mmap.mmap] = []

    @contextmanager
    def borrow(self) -> Iterator[memoryview]:
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            buf = anonymous_buffer(self.nbytes)
            self._all.append(buf)  # list.append is atomic under the GIL
        view = memoryview(buf)
        try:
            yield view
        finally:
            view.release()
            self._free.put(buf)

    def close(self) -> None:
        for buf in self._all:
            buf.close()


class _Partition:
    """One source file open for reading and its destination open for writing, blocks reserved."""

    def __init__(
        self,
        src: Path,
        dst: Path,
        nbytes: int,
        direct: bool,
        *,
        src_view: memoryview | None = None,
        dst_view: memoryview | None = None,
    ) -> None:
        """`src_view` / `dst_view`: the partition's bytes are in (go to) this memory, an arena
        extent, instead of the file `src` (`dst`)."""
        self.src, self.dst, self.nbytes = src, dst, nbytes
        self.src_view, self.dst_view = src_view, dst_view
        self.fd, self.direct = (
            (-1, False) if src_view is not None else open_read(src, direct=direct)
        )
        # sendfile reads through the page cache, from file to file
        self.can_send = not self.direct and src_view is None and dst_view is None
        self.dst_fd = -1
        if dst_view is not None:
            return
        try:
            self.dst_fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            allocate(self.dst_fd, dst, nbytes)
        except BaseException:
            if self.dst_fd >= 0:
                os.close(self.dst_fd)
            if self.fd >= 0:
                os.close(self.fd)
            raise

    def read(self, piece: _Piece, buf: memoryview) -> memoryview:
        """Read `piece` of the source into the start of `buf`; returns the filled part (the
        source's own memory, without a copy, when it is an arena extent)."""
        if self.src_view is not None:
            return self.src_view[piece.offset : piece.offset + piece.nbytes]
        want = piece.nbytes
        if self.direct:
            want = -(-want // ALIGN) * ALIGN  # an unaligned tail is read whole, then cut
        got = 0
        while got < piece.nbytes:
            with buf[got:want] as rest:
                n = os.preadv(self.fd, [rest], piece.offset + got)
            got += n
            # At the end of the file, an O_DIRECT read stops short at an unaligned offset that
            # the next read could not start at: a short read there is the end too.
            if n == 0 or (got < piece.nbytes and self.direct and got % ALIGN):
                raise self._short(piece.offset + got)
        return buf[: piece.nbytes]

    def write(self, piece: _Piece, data: memoryview) -> None:
        """Write `data` (the bytes of `piece`) into the destination."""
        write_all(self.dst_fd, data, piece.offset)

    def send(self, piece: _Piece) -> None:
        """Copy `piece` from source to destination inside the kernel (buffered sources only).

        `sendfile` writes at the output's file position, so each call gets its own
        descriptor; the source offset is explicit."""
        out = os.open(self.dst, os.O_WRONLY)
        try:
            os.lseek(out, piece.offset, os.SEEK_SET)
            sent = 0
            while sent < piece.nbytes:
                n = os.sendfile(out, self.fd, piece.offset + sent, piece.nbytes - sent)
                if n == 0:
                    raise self._short(piece.offset + sent)
                sent += n
        finally:
            os.close(out)

    def _short(self, at: int) -> ShortFileError:
        return ShortFileError(
            f"{self.src}: ended at byte {at}, the manifest says {self.nbytes}; the checkpoint "
            "is truncated. Copy or convert it again."
        )

    def close(self, *, durable: bool) -> None:
        if self.dst_fd >= 0:
            if durable:
                os.fsync(self.dst_fd)
            os.close(self.dst_fd)
        if self.fd >= 0:
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
    tap: Tap | None = None,
    committed: Path | None = None,
    into: Mapping[int, memoryview] | None = None,
    from_memory: Mapping[int, memoryview] | None = None,
) -> CopyResult:
    """Copy checkpoint `src` (described by `manifest`) into the existing directory `dst`.

    `verify` checks every chunk and copied file against the manifest (raises
    `CorruptObjectError` naming the file and chunk); `durable` fsyncs before the manifest is
    written (disk tier; pointless on tmpfs). A source shorter than its manifest says raises
    `ShortFileError`. `tap` (a streamed promotion) orders the pieces as it asks and hears of
    each one written, once the destination files exist; `committed` is where `dst` will be
    renamed to when whole (default `dst`). `into`: each partition goes into this memory (its
    DRAM arena extent, whole pages long) instead of a file in `dst`; `from_memory`: each
    partition is read from this memory (an arena extent) instead of its file in `src`.
    """
    start = time.perf_counter()
    direct = from_memory is None and _should_read_direct(src, manifest)
    if verify:
        size = manifest.chunk_size
    elif direct or into is not None or from_memory is not None:
        size = read_size
    else:
        size = max(read_size, SENDFILE_PIECE)
    # The small files (config, tokenizer) first: a streamed load reads them at once.
    for name, entry in manifest.files.items():
        data = (src / name).read_bytes()
        if verify and (got := crc32_hex(data)) != entry.crc32:
            raise CorruptObjectError(str(src / name), 0, 0, entry.nbytes, entry.crc32, got)
        (dst / name).write_bytes(data)
    parts: list[_Partition] = []
    buffers = _Buffers(size)
    try:
        for i, p in enumerate(manifest.partitions):
            src_view = from_memory[i] if from_memory is not None else None
            dst_view = into[i] if into is not None else None
            part = _Partition(
                src / p.file, dst / p.file, p.nbytes, direct, src_view=src_view, dst_view=dst_view
            )
            parts.append(part)
        plan = _plan(manifest, size)
        if tap is not None:
            plan = _ordered(plan, tap.order(manifest))
            tap.begin(dst, committed or dst, manifest_bytes)
        copy = partial(_copy_piece, parts, buffers, manifest, verify, tap)
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            list(pool.map(copy, plan))
    finally:
        for part in parts:
            part.close(durable=durable)
        buffers.close()
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


def _ordered(plan: list[_Piece], needed: list[tuple[int, int, int]]) -> list[_Piece]:
    """`plan` with the pieces overlapping `needed`'s ranges first, in the order of the first
    range each overlaps; the others after, in their planned order."""
    rank: dict[_Piece, int] = {}
    by_part: dict[int, list[_Piece]] = {}
    for piece in plan:
        by_part.setdefault(piece.part, []).append(piece)
    offsets = {part: [p.offset for p in pieces] for part, pieces in by_part.items()}
    for r, (part, start, end) in enumerate(needed):
        pieces = by_part.get(part, [])
        first = max(0, bisect.bisect_right(offsets.get(part, []), start) - 1)
        for piece in pieces[first:]:
            if piece.offset >= end:
                break
            if piece.offset + piece.nbytes > start:
                rank.setdefault(piece, r)
    last = len(needed)
    return sorted(plan, key=lambda p: rank.get(p, last))  # stable: ties keep the plan's order


def _copy_piece(
    parts: list[_Partition],
    buffers: _Buffers,
    manifest: Manifest,
    verify: bool,
    tap: Tap | None,
    piece: _Piece,
) -> None:
    _move_piece(parts[piece.part], buffers, manifest, verify, piece)
    if tap is not None:
        tap.landed(piece.part, piece.offset, piece.offset + piece.nbytes)


def _move_piece(
    part: _Partition, buffers: _Buffers, manifest: Manifest, verify: bool, piece: _Piece
) -> None:
    if part.dst_view is not None:  # straight into the arena's (already faulted) pages
        with part.dst_view[piece.offset :] as dst, part.read(piece, dst) as data:
            if verify:
                _check_chunk(part, piece, manifest, data)
        return
    if part.src_view is not None:  # out of the arena: no buffer needed
        with part.read(piece, part.src_view) as data:
            if verify:
                _check_chunk(part, piece, manifest, data)
            part.write(piece, data)
        return
    if not verify and part.can_send:
        try:
            part.send(piece)
            return
        except OSError as exc:
            if exc.errno not in _NO_SENDFILE:
                raise
            part.can_send = False  # then this piece and the rest go through a buffer
    with buffers.borrow() as buf, part.read(piece, buf) as data:
        if verify:
            _check_chunk(part, piece, manifest, data)
        part.write(piece, data)


def _check_chunk(part: _Partition, piece: _Piece, manifest: Manifest, data: memoryview) -> None:
    entry = manifest.partitions[piece.part]
    index = piece.offset // manifest.chunk_size  # pieces are whole chunks when verifying
    if (actual := crc32_hex(data)) != entry.chunks[index]:
        end = piece.offset + piece.nbytes
        raise CorruptObjectError(
            str(part.src), index, piece.offset, end, entry.chunks[index], actual
        )


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
