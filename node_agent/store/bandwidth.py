"""Measured bandwidths: how fast bytes come out of each tier (and the remote source).

The scheduler estimates a cold start as bytes / bandwidth of the fastest tier holding the
checkpoint, so each figure is what moving bytes *out of* that place achieved here: "remote"
from S3 downloads, "disk" from disk -> DRAM promotions, "dram" from reads of the DRAM tier.
Each is an exponentially weighted moving average of real transfers, seeded by a quick
self-measurement (`measure_read_bandwidth`) when the agent starts.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loader.sysio import evict_from_page_cache, open_read

_MIN_SAMPLE_BYTES = 1 << 20  # smaller transfers measure latency, not bandwidth


class BandwidthMeter:
    """Thread-safe EWMAs of bytes/s, one per place (an `Origin`: dram, disk, remote)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self._rates: dict[str, float] = {}
        self._lock = threading.Lock()

    def record(self, place: str, nbytes: int, seconds: float) -> None:
        """Add one transfer of `nbytes` in `seconds`; tiny or instant ones are ignored."""
        if nbytes < _MIN_SAMPLE_BYTES or seconds <= 0:
            return
        rate = nbytes / seconds
        with self._lock:
            old = self._rates.get(place)
            self._rates[place] = rate if old is None else self.alpha * rate + (1 - self.alpha) * old

    def get(self, place: str) -> float | None:
        """Bytes/s for `place`, or None if nothing was measured yet."""
        with self._lock:
            return self._rates.get(place)

    def snapshot(self) -> dict[str, float]:
        """Every measured place -> bytes/s."""
        with self._lock:
            return dict(self._rates)


def measure_read_bandwidth(
    directory: Path, nbytes: int = 64 << 20, *, threads: int = 4, read_size: int = 8 << 20
) -> float:
    """Bytes/s of parallel reads of a fresh `nbytes` test file in `directory` (then deleted).

    The file's pages are dropped from the page cache first (a no-op on tmpfs), and it is read
    with O_DIRECT where the file system allows, so a disk is measured, not the cache.
    """
    path = directory / f".bandwidth-probe.{os.getpid()}"
    try:
        _write_probe(path, nbytes)
        evict_from_page_cache(path)
        return nbytes / read_file_seconds(path, nbytes, threads=threads, read_size=read_size)
    finally:
        path.unlink(missing_ok=True)


def _write_probe(path: Path, nbytes: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for off in range(0, nbytes, len(block)):
            f.write(block[: min(len(block), nbytes - off)])
        f.flush()
        os.fsync(f.fileno())


def read_file_seconds(
    path: Path, nbytes: int, *, threads: int = 4, read_size: int = 8 << 20, direct: bool = True
) -> float:
    """Seconds to read `nbytes` of `path` into a pre-touched buffer with parallel preads
    (O_DIRECT if `direct` and the file system allows): the machine's read ceiling."""
    buf = mmap.mmap(-1, nbytes)
    view = memoryview(buf)
    view[::4096] = bytes(len(range(0, nbytes, 4096)))  # touch every page before timing
    fd, _ = open_read(path, direct=direct)
    try:

        def read(off: int) -> None:
            end, got = min(off + read_size, nbytes), off
            while got < end:
                n = os.preadv(fd, [view[got:end]], got)
                if n == 0:
                    raise OSError(f"{path}: ended early at byte {got}")
                got += n

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(read, range(0, nbytes, read_size)))
        return time.perf_counter() - start
    finally:
        os.close(fd)
        view.release()
        buf.close()
