"""Thin wrappers over the Linux calls the loader needs and Python lacks (mincore, statfs).

Every wrapper degrades to a safe answer where a call is missing, so the loader imports and
runs on any POSIX system; it is fastest on Linux.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os

PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # Linux >= 5.14; Python's mmap module does not export it
_TMPFS_MAGIC = 0x01021994
_RAMFS_MAGIC = 0x858458F6
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long
_LOW_BIT = bytes(b & 1 for b in range(256))  # mincore sets bit 0 of each byte for a resident page


def buffer_address(buf: mmap.mmap) -> int:
    """Address of the first byte of a writable mapping."""
    probe = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


def resident_pages(address: int, length: int) -> tuple[int, int]:
    """`(resident, total)` pages of the mapped range (mincore); `(0, total)` if unavailable."""
    total = -(-length // PAGE)
    if total == 0:
        return 0, 0
    vec = (ctypes.c_ubyte * total)()
    rc = _libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec)
    if rc != 0:
        return 0, total
    return bytes(vec).translate(_LOW_BIT).count(1), total


def present_pages(address: int, length: int) -> tuple[int, int]:
    """`(present, total)` pages of the range that have a page-table entry in this process.

    Reads /proc/self/pagemap (bit 63: present). Unlike mincore, which reports whether a file
    page is cached anywhere, this says whether touching the page would fault here.
    """
    first, total = address // PAGE, -(-(address % PAGE + length) // PAGE)
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = pagemap.read(total * 8)
    words = memoryview(entries).cast("Q")
    return sum(1 for word in words if word >> 63), total


def map_file(fd: int, nbytes: int, offset: int = 0) -> mmap.mmap:
    """Map `nbytes` of `fd` from `offset` (a multiple of the page size) private and writable:
    shares the page cache until a page is written."""
    return mmap.mmap(
        fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
    )


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


_SYS_CACHESTAT = 451  # same number on every Linux architecture (unified syscall table)


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """Pages of `[offset, offset+length)` of the file in the page cache, via cachestat(2).

    Linux >= 6.5 (~50 us for 1 GiB); None where the call is missing or refused.
    """
    if os.uname().sysname != "Linux":
        return None
    span, stat = _CachestatRange(offset, length), _Cachestat()
    rc = _libc.syscall(
        ctypes.c_long(_SYS_CACHESTAT), ctypes.c_int(fd), ctypes.byref(span), ctypes.byref(stat), 0
    )
    return int(stat.cache) if rc == 0 else None


def resident_fraction(path: str | os.PathLike[str]) -> float:
    """Fraction of `path`'s pages in the page cache (1.0 for an empty file).

    cachestat(2) where the kernel has it; otherwise mincore(2) over a temporary mapping, which
    costs ~10 ms per GiB.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        total = -(-size // PAGE)
        cached = cached_pages(fd, 0, size)
        if cached is None:
            mm = map_file(fd, size)
            try:
                cached, total = resident_pages(buffer_address(mm), size)
            finally:
                mm.close()
    finally:
        os.close(fd)
    return min(cached / total, 1.0)


def is_memory_fs(path: str | os.PathLike[str]) -> bool:
    """True if `path` lives on tmpfs/ramfs (e.g. /dev/shm): its bytes are always in memory."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return False
    f_type = ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    return f_type in (_TMPFS_MAGIC, _RAMFS_MAGIC)


# Checkpoint files are opened without following a final symlink: names are checked to stay in
# the directory (SPEC.md), and a symlinked partition could still point anywhere (ELOOP).
READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)


def open_read(path: str | os.PathLike[str], *, direct: bool) -> tuple[int, bool]:
    """Open for reading, with `O_DIRECT` if asked and supported; returns `(fd, direct_used)`.

    tmpfs and some network file systems refuse `O_DIRECT` with EINVAL; then the file is opened
    buffered, which on those file systems costs nothing extra.
    """
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, READ_FLAGS | os.O_DIRECT), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, READ_FLAGS), False


def anonymous_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned private anonymous memory (what O_DIRECT reads need).

    No MADV_HUGEPAGE: on the VM this was measured on, zeroing fresh 2 MiB pages made cold
    O_DIRECT loads slower (1.2-2.2 s/GiB) than 4 KiB pages (0.9-1.4 s/GiB).
    """
    return mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def populate(buf: mmap.mmap, start: int, length: int) -> None:
    """Make every page of `[start, start+length)` present (page tables filled, no later faults).

    Uses MADV_POPULATE_READ, which maps page-cache pages without copying them; on kernels
    without it, reads one byte per page, which has the same effect.
    """
    try:
        buf.madvise(MADV_POPULATE_READ, start, length)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        view = memoryview(buf)
        checksum = 0
        try:
            for offset in range(start, start + length, PAGE):
                checksum ^= view[offset]
        finally:
            view.release()


def evict_from_page_cache(path: str | os.PathLike[str]) -> None:
    """Drop `path`'s clean pages from the page cache (for cold-start measurements and tests)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
