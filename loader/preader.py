"""Parallel positional reads of partition files into caller-owned buffers.

`os.preadv` releases the GIL, so a few threads keep several requests in flight: that is what
an NVMe drive (or this VM's virtio disk) needs to reach its bandwidth. With `O_DIRECT` the bytes
skip the page cache and land in the destination once, with no intermediate copy.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from loader.errors import ReadError
from loader.plan import ReadTask
from loader.sysio import READ_FLAGS, open_read


class PartitionFiles:
    """Open file descriptors for a set of partition files; `read_into` fills one task.

    If a file system accepts `O_DIRECT` at open but refuses a read with EINVAL, that file
    falls back to buffered reads for the rest of the load (correct, just not direct).
    """

    def __init__(
        self, paths: Mapping[int, Path], *, direct: bool, bases: Mapping[int, int] | None = None
    ) -> None:
        """`bases`: the byte where each partition starts in its file (default 0; partitions
        placed in a DRAM arena share one file)."""
        self.paths = dict(paths)
        self.bases = dict(bases or {})
        self._fds: dict[int, tuple[int, bool]] = {}
        self._retired: list[int] = []
        self._lock = threading.Lock()
        try:
            for part, path in self.paths.items():
                self._fds[part] = open_read(path, direct=direct)
        except OSError as exc:
            self.close()
            raise ReadError(
                f"{exc.filename}: cannot open partition file ({exc.strerror})."
            ) from exc

    @property
    def direct(self) -> bool:
        """True if every file is (still) read with O_DIRECT."""
        return bool(self._fds) and all(d for _, d in self._fds.values())

    def read_into(self, task: ReadTask, dest: memoryview) -> None:
        """Read exactly `task.nbytes` at `task.offset` of its partition into `dest`."""
        got = 0
        while got < task.nbytes:
            fd, direct = self._fds[task.partition]
            try:
                at = self.bases.get(task.partition, 0) + task.offset + got
                n = os.preadv(fd, [dest[got : task.nbytes]], at)
            except OSError as exc:
                if direct and exc.errno == errno.EINVAL:
                    self._fall_back(task.partition, fd)
                    continue
                raise self._error(task, got, exc.strerror or str(exc)) from exc
            if n == 0:
                raise self._error(task, got, "the file ended early")
            got += n

    def _fall_back(self, part: int, old_fd: int) -> None:
        with self._lock:
            if self._fds[part][0] == old_fd:
                self._fds[part] = (os.open(self.paths[part], READ_FLAGS), False)
                self._retired.append(old_fd)

    def _error(self, task: ReadTask, got: int, why: str) -> ReadError:
        path = self.paths[task.partition]
        return ReadError(
            f"{path}: read of bytes {task.offset + got}..{task.offset + task.nbytes} failed: "
            f"{why}. The file changed or the disk failed; run `stoke verify` on the checkpoint."
        )

    def close(self) -> None:
        """Close every descriptor (also those replaced by a fallback)."""
        for fd in [*(fd for fd, _ in self._fds.values()), *self._retired]:
            os.close(fd)
        self._fds.clear()
        self._retired.clear()

    def __enter__(self) -> PartitionFiles:
        return self

    def __exit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_parallel(
    files: PartitionFiles,
    tasks: Sequence[ReadTask],
    dest_for: Callable[[ReadTask], memoryview],
    threads: int,
) -> None:
    """Run every task on `threads` threads; `dest_for(task)` gives the destination bytes."""
    if not tasks:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(tasks)))) as pool:
        futures = [pool.submit(files.read_into, t, dest_for(t)) for t in tasks]
        for future in futures:
            future.result()
