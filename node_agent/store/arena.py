"""The DRAM tier's memory: one shared-memory file of the tier's budget, allocated and faulted in
once, when the node starts.

Why: a tmpfs file written fresh pays, on the critical path of a cold start, for allocating,
zeroing and faulting every destination page (first-touching fresh memory ran at ~2 GB/s on the
development VM, below the disk). The arena pays that once at start-up (`fallocate` allocates
the pages, `MADV_POPULATE_WRITE` zeroes and maps them in the agent); afterwards a promotion
reads from disk with `O_DIRECT` straight into pages that already exist, and a worker maps the
whole arena once when it starts (`loader.arena.ArenaMap`), so binding a checkpoint's tensors
from DRAM maps and faults nothing.

The file survives an agent restart (like the rest of /dev/shm): a reopened tier with the same
budget keeps it and its checkpoints; a different budget recreates it (the DRAM tier is a cache:
its checkpoints are promoted again from disk).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import sys
import time
from pathlib import Path

from loader.sysio import is_memory_fs
from node_agent.facts.errors import StoreError
from node_agent.facts.units import format_size
from node_agent.store.extents import ALIGN

log = logging.getLogger(__name__)

ARENA_NAME = "arena"
MADV_POPULATE_WRITE = 23  # Linux >= 5.14; not exported by Python's mmap module
_STEP = 256 << 20  # fault in this much at a time (progress, and ^C stays responsive)
_PROGRESS_FROM = 1 << 30  # print a progress line for arenas at least this large


class Arena:
    """The arena file of one DRAM tier, mapped shared and writable in the agent (the only
    writer: promotions land here). Use `Arena.open`."""

    def __init__(self, path: Path, fd: int, size: int, fresh: bool, seconds: float) -> None:
        self.path, self.size, self.fresh, self.seconds = path, size, fresh, seconds
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)
        self._fd = fd
        self.mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        self._view = memoryview(self.mapping)

    @classmethod
    def open(cls, root: Path, budget: int) -> Arena:
        """The arena in tier directory `root`, `budget` bytes (rounded up to 4 KiB): reused if
        a whole one of that size is there, else created and faulted in (a progress line on
        stderr for large ones). Raises `StoreError` naming the fix when the file system or the
        machine's memory cannot hold it."""
        start = time.perf_counter()
        path, size = root / ARENA_NAME, -(-budget // ALIGN) * ALIGN
        fd = _reuse(path, size)
        fresh = fd is None
        if fd is None:
            fd = _create(path, size)
        try:
            arena = cls(path, fd, size, fresh, 0.0)
            if is_memory_fs(path):  # on a real disk (tests), faulting in would write it all
                arena.fault_in(announce=fresh)
        except BaseException:
            os.close(fd)
            raise
        arena.seconds = time.perf_counter() - start
        if fresh:
            log.info(
                "DRAM arena %s: %s allocated and faulted in %.2f s (%.2f s/GiB)",
                path,
                format_size(size),
                arena.seconds,
                arena.seconds_per_gib,
            )
        return arena

    @property
    def seconds_per_gib(self) -> float:
        """Start-up cost of this arena (creation and fault-in), per GiB."""
        return self.seconds / (self.size / (1 << 30)) if self.size else 0.0

    def fault_in(self, *, announce: bool) -> None:
        """Make every page present in the agent's mapping (zeroed and mapped now, once)."""
        shown = announce and self.size >= _PROGRESS_FROM
        for offset in range(0, self.size, _STEP):
            length = min(_STEP, self.size - offset)
            try:
                self.mapping.madvise(MADV_POPULATE_WRITE, offset, length)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOSYS):  # an older kernel: touch pages
                    self._touch(offset, length)
                else:
                    raise _no_memory(self.path, self.size, exc) from None
            done = offset + length
            if shown and (sys.stderr.isatty() or done == self.size):  # a log gets one line
                print(
                    f"\rstoke: DRAM arena: faulted in {format_size(done)} of "
                    f"{format_size(self.size)}",
                    end="\n" if done == self.size else "",
                    file=sys.stderr,
                    flush=True,
                )

    def _touch(self, offset: int, length: int) -> None:
        for page in range(offset, offset + length, mmap.PAGESIZE):
            self._view[page] = self._view[page]

    def view(self, offset: int, nbytes: int) -> memoryview:
        """Writable bytes `[offset, offset + nbytes)` of the arena (release when done)."""
        return self._view[offset : offset + nbytes]

    def close(self) -> None:
        """Unmap (the file and its bytes stay for the next agent)."""
        if self._fd < 0:
            return
        with contextlib.suppress(BufferError):  # a view still exported: the GC unmaps later
            self._view.release()
            self.mapping.close()
        os.close(self._fd)
        self._fd = -1


def _reuse(path: Path, size: int) -> int | None:
    """An open descriptor of the existing arena if it is ours, `size` long and fully allocated;
    None (after removing any other file there) otherwise."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    st = os.fstat(fd)
    allocated = st.st_blocks * 512 >= size or not is_memory_fs(path)  # sparse on a disk
    if st.st_size == size and st.st_uid == os.geteuid() and allocated:
        return fd
    os.close(fd)
    log.info("DRAM arena %s: %s, now %s; recreating it", path, st.st_size, size)
    path.unlink()
    return None


def _create(path: Path, size: int) -> int:
    _check_memory(path, size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if is_memory_fs(path):
            os.posix_fallocate(fd, 0, size)
        else:  # a DRAM tier on a disk (tests, a small machine): sparse, nothing to fault in
            os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM):
            raise _no_memory(path, size, exc) from None
        raise
    return fd


def _check_memory(path: Path, size: int) -> None:
    """Refuse early, with the fix, an arena larger than its file system's free space or the
    machine's available memory (faulting it in would fail halfway, or call the OOM killer)."""
    st = os.statvfs(path.parent)
    free = st.f_bavail * st.f_frsize
    available = _mem_available() if is_memory_fs(path.parent) else None
    short = size > free or (available is not None and size > available)
    if short:
        have = min(free, available) if available is not None else free
        raise StoreError(
            f"the DRAM tier needs an arena of {format_size(size)} at {path}, but only "
            f"{format_size(have)} is free there (file system {format_size(free)}"
            + (f", available memory {format_size(available)})" if available is not None else ")")
            + "; lower --dram-cache, free memory in /dev/shm, or point --dram-dir elsewhere."
        )


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _no_memory(path: Path, size: int, exc: OSError) -> StoreError:
    return StoreError(
        f"could not allocate the DRAM arena of {format_size(size)} at {path} ({exc.strerror}); "
        "lower --dram-cache or free memory in /dev/shm, then start the node again."
    )
