"""CPU targets: map the partition files, prefetching missing pages deep; or, when asked, read
them with parallel O_DIRECT preads into fresh memory.

Either way each partition ends up as one contiguous uint8 tensor whose pages are all present,
so a first forward pass never page-faults its way through the file, and RSS grows by the
checkpoint's size once (no second copy).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from loader.arena import ArenaMap, Placement, open_arena
from loader.plan import DEFAULT_READ_SIZE, plan_reads
from loader.preader import PartitionFiles, read_parallel
from loader.sysio import PAGE, READ_FLAGS, anonymous_buffer, cached_pages, map_file, populate

_PREFETCH_STEP = 8 << 20


def _prefetch(fd: int, nbytes: int, threads: int) -> None:
    """Read the file's missing pages into the page cache with a deep queue of large requests.

    Each POSIX_FADV_WILLNEED call allocates page-cache folios and submits their reads without
    waiting for them; several threads keep many requests in flight. Page-cache pages are filled
    by the device, never zeroed first, which is what makes this cheaper than reading into fresh
    anonymous memory on machines where first-touching memory is slow (VMs). Steps already
    fully cached are skipped (cachestat): WILLNEED on cached pages still walks them.
    """

    def fetch(start: int) -> None:
        length = min(_PREFETCH_STEP, nbytes - start)
        if cached_pages(fd, start, length) != -(-length // PAGE):
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)

    starts = range(0, nbytes, _PREFETCH_STEP)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(starts)))) as pool:
        list(pool.map(fetch, starts))


def map_partition(path: Path, nbytes: int, threads: int) -> torch.Tensor:
    """Map `path` copy-on-write and populate its page tables: zero copy, every page present.

    `threads > 1` means pages are missing: they are prefetched in parallel first. The tensor
    shares the file's page-cache (or tmpfs) pages; writing to it copies only the pages written
    and never changes the file.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    fd = os.open(path, READ_FLAGS)
    try:
        mm = map_file(fd, nbytes)
        if threads > 1:
            _prefetch(fd, nbytes, threads)
    finally:
        os.close(fd)
    populate(mm, 0, nbytes)  # one call: a populate of cached pages runs at >100 GB/s
    return torch.frombuffer(mm, dtype=torch.uint8)


def arena_partitions(
    placement: Placement, parts: list[int], arena: ArenaMap | None
) -> dict[int, torch.Tensor]:
    """Partitions placed in a DRAM arena as uint8 tensors over its memory: zero copy.

    With `arena` (this process mapped that arena once, every page present) each partition is a
    slice of that mapping: nothing is mapped or faulted now. Otherwise each partition's extent
    is mapped (copy-on-write) and populated, as `map_partition` does for a file.
    """
    if arena is not None and not arena.for_gpu and arena.holds(placement):
        base = torch.frombuffer(arena.mapping, dtype=torch.uint8)
        return {p: base[placement.offsets[p] : placement.end(p)] for p in parts}
    fd, _ = open_arena(placement)
    try:
        buffers = {}
        for p in parts:
            nbytes = placement.sizes[p]
            if nbytes == 0:
                buffers[p] = torch.empty(0, dtype=torch.uint8)
                continue
            mm = map_file(fd, nbytes, placement.offsets[p])
            populate(mm, 0, nbytes)
            buffers[p] = torch.frombuffer(mm, dtype=torch.uint8)
    finally:
        os.close(fd)
    return buffers


def read_partitions(
    paths: Mapping[int, Path],
    sizes: Mapping[int, int],
    *,
    direct: bool,
    threads: int,
    read_size: int = DEFAULT_READ_SIZE,
) -> tuple[dict[int, torch.Tensor], bool]:
    """Read whole partitions into fresh page-aligned buffers with parallel preads.

    Returns `({partition: uint8 tensor}, direct_used)`; `direct_used` is False where the file
    system refused O_DIRECT and the reads fell back to buffered.
    """
    buffers = {p: anonymous_buffer(sizes[p]) for p in paths}
    views = {p: memoryview(buf) for p, buf in buffers.items()}
    all_sizes = [sizes.get(i, 0) for i in range(max(paths, default=-1) + 1)]
    tasks = plan_reads(all_sizes, read_size, partitions=list(paths))
    try:
        with PartitionFiles(paths, direct=direct) as files:
            read_parallel(files, tasks, lambda t: views[t.partition][t.offset :], threads)
            direct_used = files.direct
    finally:
        for view in views.values():
            view.release()
    tensors = {
        p: torch.frombuffer(buf, dtype=torch.uint8)[: sizes[p]] for p, buf in buffers.items()
    }
    return tensors, direct_used
