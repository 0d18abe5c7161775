"""CRC-32 per fixed-size chunk, computed while bytes stream past (no second read at write time).

zlib's CRC-32 runs at ~2.8 GB/s on one core here and releases the GIL for large buffers, so
`verify` can check chunks on several threads.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer


def crc32_hex(data: Buffer, start: int = 0) -> str:
    """CRC-32 of `data` (continuing from running value `start`) as 8 lowercase hex digits."""
    return f"{zlib.crc32(data, start) & 0xFFFFFFFF:08x}"


class ChunkHasher:
    """Feed a partition's bytes in order; get one CRC-32 per `chunk_size` slice.

    `update` may be called with pieces of any size; pieces are split at chunk boundaries.
    `finish` closes the last (possibly short) chunk and returns all checksums.
    """

    def __init__(self, chunk_size: int) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self._crc = 0
        self._filled = 0
        self._done: list[str] = []

    def update(self, data: Buffer) -> None:
        """Account for the next bytes of the partition."""
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), self.chunk_size - self._filled)
            self._crc = zlib.crc32(view[:take], self._crc)
            self._filled += take
            view = view[take:]
            if self._filled == self.chunk_size:
                self._close_chunk()

    def update_zeros(self, count: int) -> None:
        """Account for `count` zero bytes (padding) without materialising them all at once."""
        block = bytes(min(count, 1 << 20))
        while count:
            take = min(count, len(block))
            self.update(memoryview(block)[:take])
            count -= take

    def finish(self) -> tuple[str, ...]:
        """Checksums of all chunks, including the final partial one if any bytes are pending."""
        if self._filled:
            self._close_chunk()
        return tuple(self._done)

    def _close_chunk(self) -> None:
        self._done.append(f"{self._crc & 0xFFFFFFFF:08x}")
        self._crc = 0
        self._filled = 0
