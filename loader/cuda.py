"""GPU targets: partitions stream through a pinned host ring into one device buffer each.

Everything CUDA is touched only inside these functions, after `check_cuda_device` has said the
device exists, so this module imports (and its planning is tested) on machines without a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loader.errors import DeviceError
from loader.plan import DEFAULT_READ_SIZE, ReadTask, plan_reads
from loader.preader import PartitionFiles
from loader.ring import RingPipeline, RingStats

DEFAULT_SLOTS = 12
_ALIGN = 4096


def check_cuda_device(device: torch.device) -> None:
    """Raise `DeviceError` unless `device` is a CUDA device that exists here."""
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {device} requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}). Load with device='cpu' or run on a GPU node."
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not 0 <= index < torch.cuda.device_count():
        raise DeviceError(
            f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) "
            "exist here. Pick an index in range."
        )


def pinned_slots(count: int, slot_bytes: int) -> list[torch.Tensor]:
    """`count` page-aligned pinned host buffers of `slot_bytes` each, from one allocation."""
    block = torch.empty(count * slot_bytes + _ALIGN, dtype=torch.uint8, pin_memory=True)
    skip = -block.data_ptr() % _ALIGN
    return [block[skip + i * slot_bytes : skip + (i + 1) * slot_bytes] for i in range(count)]


class CudaCopyBackend:
    """Copies host slots to device buffers on CUDA streams; a CUDA event marks each copy done."""

    def __init__(
        self, slots: list[torch.Tensor], dests: Mapping[int, torch.Tensor], streams: int = 2
    ) -> None:
        self.slots, self.dests = slots, dests
        device = next(iter(dests.values())).device
        self.streams = [torch.cuda.Stream(device=device) for _ in range(streams)]
        self._next = 0

    def submit(self, slot: int, task: ReadTask) -> Any:
        stream = self.streams[self._next % len(self.streams)]
        self._next += 1
        with torch.cuda.stream(stream):
            dest = self.dests[task.partition][task.offset : task.offset + task.nbytes]
            dest.copy_(self.slots[slot][: task.nbytes], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def wait(self, handle: Any) -> None:
        handle.synchronize()


def read_partitions_cuda(
    paths: Mapping[int, Path],
    sizes: Mapping[int, int],
    device: torch.device,
    *,
    direct: bool,
    threads: int,
    read_size: int = DEFAULT_READ_SIZE,
    slots: int = DEFAULT_SLOTS,
    bases: Mapping[int, int] | None = None,
) -> tuple[dict[int, torch.Tensor], RingStats]:
    """Load whole partitions into one device buffer each through a pinned ring.

    Host memory used is `slots * read_size` regardless of the checkpoint's size. `bases`:
    where each partition starts in its file (a DRAM arena holds many; default 0).
    """
    check_cuda_device(device)
    dests = {p: torch.empty(sizes[p], dtype=torch.uint8, device=device) for p in paths}
    host = pinned_slots(slots, read_size)
    arrays: list[Any] = [s.numpy() for s in host]
    views = [memoryview(a) for a in arrays]
    all_sizes = [sizes.get(i, 0) for i in range(max(paths, default=-1) + 1)]
    tasks = plan_reads(all_sizes, read_size, partitions=list(paths))
    with PartitionFiles(paths, direct=direct, bases=bases) as files:
        pipeline = RingPipeline(
            slots=slots,
            threads=threads,
            read_into=lambda slot, task: files.read_into(task, views[slot]),
            backend=CudaCopyBackend(host, dests),
        )
        stats = pipeline.run(tasks)
    torch.cuda.synchronize(device)
    return dests, stats
