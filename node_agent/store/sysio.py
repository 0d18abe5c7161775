"""Block reservation and positional writes for tier files. The other Linux calls the store
needs (O_DIRECT with a fallback, page-cache residency and eviction) come from `loader.sysio`,
which imports no torch."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from node_agent.store.errors import NoRoomError


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


def write_all(fd: int, data: memoryview, offset: int) -> None:
    """`pwrite` all of `data` at `offset` of `fd` (one call may write less than asked)."""
    done = 0
    while done < len(data):
        with data[done:] as rest:
            done += os.pwrite(fd, rest, offset + done)
