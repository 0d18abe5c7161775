"""Where an instance runs and what it costs the node: `reserve` before its worker loads it,
`release` when it is unloaded or dies.

On a CPU node everything is host memory: weights (as the engine holds them on the CPU) + KV
cache + `WORKER_OVERHEAD_BYTES`, in the node's `Budget`. On a GPU node the weights, KV cache
and CUDA context go on one GPU (`GpuLedger`) and only the worker's own overhead on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from checkpoint_format import Manifest
from checkpoint_format.dtypes import FLOATING
from node_agent.instances.budget import WORKER_OVERHEAD_BYTES, Budget
from node_agent.instances.gpus import CUDA_CONTEXT_BYTES, GpuLedger

CPU_COMPUTE_ITEMSIZE = 4
"""The engine computes in float32 on the CPU (`engine.weights.compute_dtype`)."""


@dataclass(frozen=True)
class Reservation:
    """What one instance holds: host bytes in the node's budget and, on a GPU node, bytes on
    GPU `gpu`."""

    weight_bytes: int
    """The weights as the instance holds them (part of the host or the GPU bytes)."""
    host_bytes: int
    gpu: int | None = None
    gpu_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Every byte charged for the instance, host and GPU: what Status reports."""
        return self.host_bytes + self.gpu_bytes


def cpu_weight_bytes(manifest: Manifest) -> int:
    """Bytes the weights occupy in a CPU instance: floating tensors widened to float32 (a 16-bit
    checkpoint doubles), and never less than the checkpoint's files (a float32 checkpoint is
    mapped whole)."""
    widened = sum(
        math.prod(t.shape) * CPU_COMPUTE_ITEMSIZE if t.dtype in FLOATING else t.nbytes
        for t in manifest.tensors.values()
    )
    return max(widened, manifest.total_bytes)


def reserve(
    budget: Budget, gpus: GpuLedger | None, manifest: Manifest, kv_bytes: int, what: str
) -> Reservation:
    """Charge an instance of `manifest` with a `kv_bytes` KV cache to the node (on a GPU node,
    to the GPU `gpus` picks); `NoRoomError` if it does not fit, with nothing charged."""
    if gpus is None:
        weights = cpu_weight_bytes(manifest)
        host = weights + kv_bytes + WORKER_OVERHEAD_BYTES
        budget.reserve(host, what)
        return Reservation(weights, host)
    weights = manifest.total_bytes
    need = weights + kv_bytes + CUDA_CONTEXT_BYTES
    index = gpus.reserve(need, what)
    try:
        budget.reserve(WORKER_OVERHEAD_BYTES, what)
    except BaseException:
        gpus.release(index, need)
        raise
    return Reservation(weights, WORKER_OVERHEAD_BYTES, index, need)


def release(budget: Budget, gpus: GpuLedger | None, held: Reservation) -> None:
    """Undo one `reserve`."""
    budget.release(held.host_bytes)
    if held.gpu is not None:
        assert gpus is not None, "a GPU reservation on a node without GPUs"
        gpus.release(held.gpu, held.gpu_bytes)
