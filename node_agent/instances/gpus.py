"""GPU memory accounting: which GPU an instance goes to, never over-committing any of them.

The agent keeps its own ledger rather than trusting `nvidia-smi`'s free memory: an instance
that is still loading has reserved its bytes but not yet allocated them, so the measured free
memory would let a second load take them too. Each GPU's budget is its total memory minus
`GPU_SAFETY_MARGIN_BYTES`; an instance costs its weights (in the checkpoint's dtype, which the
engine keeps on CUDA) + its KV cache + `CUDA_CONTEXT_BYTES`. `choose_gpu` is a pure function
of the GPU list and the reservations; `GpuLedger` holds the reservations.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from node_agent.facts.units import format_size
from node_agent.instances.budget import NoRoomError
from node_agent.proto import node_agent_pb2 as pb

GPU_SAFETY_MARGIN_BYTES = 1 << 30
"""Memory of every GPU left out of its budget: other processes' contexts (a display, a
monitoring agent) and the caching allocator's fragmentation, which no reservation counts."""

CUDA_CONTEXT_BYTES = 768 << 20
"""GPU memory an instance's process holds besides weights and KV cache: the CUDA context with
torch's kernels (300-600 MiB depending on GPU and CUDA version), cuBLAS workspaces, and the
activations of a step."""


def gpu_budget(gpu: pb.GpuDevice) -> int:
    """The bytes of `gpu` instances may reserve."""
    return max(0, gpu.total_bytes - GPU_SAFETY_MARGIN_BYTES)


def unreserved(gpu: pb.GpuDevice, reserved: Mapping[int, int]) -> int:
    """The bytes of `gpu`'s budget no instance has reserved."""
    return max(0, gpu_budget(gpu) - reserved.get(gpu.index, 0))


def choose_gpu(gpus: Sequence[pb.GpuDevice], reserved: Mapping[int, int], need: int) -> int | None:
    """The index of the GPU to put an instance needing `need` bytes on: the one with the most
    unreserved memory among those it fits (spreading instances spreads their compute; ties go
    to the lowest index). None if it fits on none."""
    fits = [g for g in gpus if unreserved(g, reserved) >= need]
    if not fits:
        return None
    return max(fits, key=lambda g: (unreserved(g, reserved), -g.index)).index


class GpuLedger:
    """Bytes reserved on each of a node's GPUs. Thread-safe.

    `gpus` is fixed at start: GPUs do not come and go, and a later probe that fails (reported
    as no GPUs) must not turn a GPU node into a CPU one."""

    def __init__(self, gpus: Sequence[pb.GpuDevice]) -> None:
        if not gpus:
            raise ValueError("a GPU ledger needs at least one GPU; a CPU node has none")
        self.gpus = tuple(gpus)
        self._reserved = {g.index: 0 for g in self.gpus}
        self._lock = threading.Lock()

    @property
    def indexes(self) -> list[int]:
        return [g.index for g in self.gpus]

    def reserved(self) -> dict[int, int]:
        """A copy of the bytes reserved per GPU index."""
        with self._lock:
            return dict(self._reserved)

    def reserve(self, need: int, what: str) -> int:
        """Reserve `need` bytes for `what` on the GPU `choose_gpu` picks and return its index;
        `NoRoomError` (naming each GPU's free budget) if it fits on none."""
        with self._lock:
            index = choose_gpu(self.gpus, self._reserved, need)
            if index is None:
                raise NoRoomError(self._no_room(need, what))
            self._reserved[index] += need
            return index

    def release(self, index: int, nbytes: int) -> None:
        """Undo one `reserve` of `nbytes` that returned `index`."""
        with self._lock:
            assert 0 <= nbytes <= self._reserved[index], "release of GPU bytes never reserved"
            self._reserved[index] -= nbytes

    def report(self, probed: Sequence[pb.GpuDevice]) -> list[pb.GpuDevice]:
        """`probed` (the latest nvidia-smi answer) with each GPU's free memory lowered to what
        the ledger leaves unreserved, so whoever reads it never counts a loading instance's
        bytes as free."""
        reserved = self.reserved()
        by_index = {g.index: g for g in self.gpus}
        out = []
        for gpu in probed:
            copy = pb.GpuDevice()
            copy.CopyFrom(gpu)
            if gpu.index in by_index:
                copy.free_bytes = min(gpu.free_bytes, unreserved(by_index[gpu.index], reserved))
            out.append(copy)
        return out

    def _no_room(self, need: int, what: str) -> str:
        free = ", ".join(
            f"GPU {g.index}: {format_size(unreserved(g, self._reserved))} of "
            f"{format_size(gpu_budget(g))}"
            for g in self.gpus
        )
        return (
            f"{what} needs {format_size(need)} of GPU memory (weights + KV cache + CUDA "
            f"context) but no GPU has that much unreserved ({free}); unload an instance, lower "
            "its KV cache, or load it on a node with larger GPUs"
        )
