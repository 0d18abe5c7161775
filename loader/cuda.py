"""GPU targets: partitions stream through a pinned host ring into one device buffer each, or
copy straight from the node's DRAM arena when this process page-locked it.

Pinned host memory is allocated once per process, not per load: a GPU worker calls
`reserve_ring` before it reports ready, and every load after that stages through that ring
(a load that finds none reserved, or the ring busy, allocates its own). The worker also maps
the node's DRAM arena shared and read-only and registers it with CUDA (`pin_arena`): a load
from the DRAM tier then copies each partition from the arena to the device in one DMA, with no
staging at all (ServerlessLLM's pinned pool, with the DRAM tier itself as the pool).

Everything CUDA is touched only inside these functions, after `check_cuda_device` has said the
device exists, so this module imports (and its planning is tested) on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from loader.arena import ArenaMap, Placement
from loader.errors import DeviceError
from loader.plan import DEFAULT_READ_SIZE, ReadTask, plan_reads
from loader.preader import PartitionFiles
from loader.ring import RingPipeline, RingStats

DEFAULT_SLOTS = 12
_ALIGN = 4096
# cudaHostRegister flags (CUDA runtime API, cuda_runtime_api.h): usable from every device's
# context, and read-only (CUDA >= 11.1; the pages are never written, so a shared read-only
# mapping can be registered).
_REGISTER_PORTABLE = 0x01
_REGISTER_READ_ONLY = 0x08


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


class PinnedRing:
    """`slots` pinned host buffers of `slot_bytes` each, for staging reads on their way to a
    GPU; `lock` is held by the load using them."""

    def __init__(self, slots: int = DEFAULT_SLOTS, slot_bytes: int = DEFAULT_READ_SIZE) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        self.buffers = pinned_slots(slots, slot_bytes)
        arrays: list[Any] = [b.numpy() for b in self.buffers]
        self.views = [memoryview(a) for a in arrays]
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes


_reserved: PinnedRing | None = None


def reserve_ring(slots: int = DEFAULT_SLOTS, slot_bytes: int = DEFAULT_READ_SIZE) -> PinnedRing:
    """Allocate this process's pinned ring now (once; later calls return it), so that no load
    allocates pinned memory on its critical path. Raises `DeviceError` without CUDA."""
    global _reserved
    check_cuda_device(torch.device("cuda"))
    if _reserved is None:
        _reserved = PinnedRing(slots, slot_bytes)
    return _reserved


@contextlib.contextmanager
def staging_ring(read_size: int, slots: int = DEFAULT_SLOTS) -> Iterator[PinnedRing]:
    """The reserved ring for one load, if its slots hold `read_size` and no other load has it;
    otherwise a ring of `slots` x `read_size` for this load alone."""
    ring = _reserved
    if ring is not None and ring.slot_bytes >= read_size and ring.lock.acquire(blocking=False):
        try:
            yield ring
        finally:
            ring.lock.release()
        return
    yield PinnedRing(slots, read_size)


def pin_arena(arena: ArenaMap) -> None:
    """Page-lock `arena` (mapped `for_gpu`) for DMA, once per process: GPU loads of checkpoints
    placed in it then copy straight from it (`arena_to_device`). Raises `DeviceError` when
    CUDA refuses (no GPU, or a driver without read-only registration); loads from the arena
    then stage through the ring, as from any file."""
    if not arena.for_gpu:
        raise DeviceError(f"{arena.path}: map the arena for_gpu before pinning it")
    check_cuda_device(torch.device("cuda"))
    if arena.pinned:
        return
    cudart = torch.cuda.cudart()
    flags = _REGISTER_PORTABLE | _REGISTER_READ_ONLY
    address, got = _base(arena).data_ptr(), []
    # On a throwaway thread: a failure stays the calling thread's last CUDA error (torch's
    # bindings cannot clear it), and the next kernel launch there would report it as its own.
    register = threading.Thread(
        target=lambda: got.append(cudart.cudaHostRegister(address, arena.size, flags))
    )
    register.start()
    register.join()
    err = got[0] if got else None
    if err is None:
        raise DeviceError(f"{arena.path}: registering the DRAM arena with CUDA raised; see above")
    if err != cudart.cudaError.success:
        raise DeviceError(
            f"{arena.path}: CUDA would not page-lock the DRAM arena (error {int(err)}: "
            f"{cudart.cudaGetErrorString(err)}); loads from the DRAM tier go through the pinned "
            "ring instead"
        )
    arena.pinned = True


def unpin_arena(arena: ArenaMap) -> None:
    """Undo `pin_arena` (before the mapping goes: a range left registered after its unmapping
    makes a later registration at the same address fail)."""
    if arena.pinned:
        torch.cuda.cudart().cudaHostUnregister(_base(arena).data_ptr())
        arena.pinned = False


def arena_to_device(
    arena: ArenaMap, placement: Placement, parts: list[int], device: torch.device
) -> dict[int, torch.Tensor]:
    """Partitions placed in the pinned `arena`, copied to one device buffer each, straight from
    the arena's pages (one DMA per partition, no staging)."""
    assert arena.pinned and arena.holds(placement)
    check_cuda_device(device)
    base = _base(arena)
    dests = {}
    for p in parts:
        dest = torch.empty(placement.sizes[p], dtype=torch.uint8, device=device)
        dest.copy_(base[placement.offsets[p] : placement.end(p)], non_blocking=True)
        dests[p] = dest
    torch.cuda.synchronize(device)
    return dests


def _base(arena: ArenaMap) -> torch.Tensor:
    """The whole arena as a uint8 CPU tensor (its read-only mapping: never written)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        return torch.frombuffer(arena.mapping, dtype=torch.uint8)


class CudaCopyBackend:
    """Copies host slots to device buffers on CUDA streams; a CUDA event marks each copy done."""

    def __init__(
        self, slots: list[torch.Tensor], dests: Mapping[int, torch.Tensor], streams: int = 2
    ) -> None:
        self.slots, self.dests = slots, dests
        device = next(iter(dests.values())).device
        self.streams = [torch.cuda.Stream(device=device) for _ in range(streams)]
        for stream in self.streams:  # the buffers were allocated on the current stream
            stream.wait_stream(torch.cuda.current_stream(device))
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

    Host memory used is the ring's (`staging_ring`: the process's reserved one, or `slots *
    read_size` for this load), regardless of the checkpoint's size. `bases`: where each
    partition starts in its file (a DRAM arena holds many; default 0).
    """
    check_cuda_device(device)
    dests = {p: torch.empty(sizes[p], dtype=torch.uint8, device=device) for p in paths}
    all_sizes = [sizes.get(i, 0) for i in range(max(paths, default=-1) + 1)]
    tasks = plan_reads(all_sizes, read_size, partitions=list(paths))
    with (
        staging_ring(read_size, slots) as ring,
        PartitionFiles(paths, direct=direct, bases=bases) as files,
    ):
        pipeline = RingPipeline(
            slots=ring.slots,
            threads=threads,
            read_into=lambda slot, task: files.read_into(task, ring.views[slot]),
            backend=CudaCopyBackend(ring.buffers, dests),
        )
        stats = pipeline.run(tasks)
        torch.cuda.synchronize(device)  # the ring's slots are in use until every copy is done
    return dests, stats
