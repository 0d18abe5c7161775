"""The few Linux calls local copies need: O_DIRECT with a fallback, page-cache residency
(mincore) and eviction (fadvise). Kept here so the store does not import the loader (and
torch) into the agent process."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
from pathlib import Path

from node_agent.store.errors import NoRoomError

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_LOW_BIT = bytes(b & 1 for b in range(256))


def open_read(path: str | os.PathLike[str], *, direct: bool) -> tuple[int, bool]:
    """Open for reading, with O_DIRECT if asked and the file system allows it; returns
    `(fd, direct_used)`. tmpfs refuses O_DIRECT (EINVAL): it is then opened buffered."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY), False


def allocate(fd: int, path: Path, nbytes: int) -> None:
    """Reserve `nbytes` of blocks for `fd` (keeping existing bytes), so a full file system
    fails here with `NoRoomError` instead of later: on tmpfs, a write through a mapping into
    a full file system would kill the process with SIGBUS."""
    if nbytes == 0:
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = os.statvfs(path.parent)
        raise NoRoomError(
            f"{path}: the file system holding it is full ({free.f_bavail * free.f_frsize} "
            f"bytes free, {nbytes} needed); the tier's budget is larger than its file system: "
            "lower the budget or free space."
        ) from None


def resident_fraction(path: str | os.PathLike[str]) -> float:
    """Fraction of `path`'s pages in the page cache (mincore over a read-only mapping)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        # Private and writable only so ctypes can take its address; nothing is written.
        mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        pages = -(-size // PAGE)
        vec = (ctypes.c_ubyte * pages)()
        probe = ctypes.c_char.from_buffer(mm)
        try:
            rc = _libc.mincore(ctypes.c_void_p(ctypes.addressof(probe)), ctypes.c_size_t(size), vec)
        finally:
            del probe
        if rc != 0:
            return 0.0
        return bytes(vec).translate(_LOW_BIT).count(1) / pages
    finally:
        mm.close()


def evict_from_page_cache(path: str | os.PathLike[str]) -> None:
    """Drop `path`'s clean pages from the page cache (cold measurements and tests)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
