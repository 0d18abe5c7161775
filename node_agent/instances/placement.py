"""Where an instance runs and what it costs the node: `reserve` before its worker loads it,
`release` when it is unloaded or dies.

On a CPU node everything is host memory: weights (as the engine holds them on the CPU) + KV
cache + `WORKER_OVERHEAD_BYTES`, in the node's `Budget`. On a GPU node the weights, KV cache
and CUDA context go on one GPU (`GpuLedger`) and only the worker's own overhead on the host.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from checkpoint_format import Manifest
from checkpoint_format.dtypes import FLOATING, ITEMSIZE
from node_agent.facts.errors import ConfigError
from node_agent.facts.model_config import ModelConfig
from node_agent.facts.sizing import (
    CPU_COMPUTE_ITEMSIZE,
    WORKER_OVERHEAD_BYTES,
    model_len,
    sequence_kv_bytes,
)
from node_agent.facts.units import format_size
from node_agent.instances.budget import Budget
from node_agent.instances.errors import LoadRejectedError
from node_agent.instances.gpus import CUDA_CONTEXT_BYTES, GpuLedger

__all__ = ["CPU_COMPUTE_ITEMSIZE", "Reservation", "check_kv_cache", "release", "reserve"]


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


def kv_itemsize(manifest: Manifest, on_gpu: bool) -> int:
    """Bytes per KV element as the engine computes: float32 on the CPU; on a GPU, the dtype most
    of the checkpoint's floating tensors have (`engine.weights.compute_dtype`)."""
    floats = Counter(t.dtype for t in manifest.tensors.values() if t.dtype in FLOATING)
    if not on_gpu or not floats:
        return CPU_COMPUTE_ITEMSIZE
    return ITEMSIZE[floats.most_common(1)[0][0]]


def check_kv_cache(
    ckpt: Path, manifest: Manifest, kv_bytes: int, max_model_len: int, on_gpu: bool
) -> None:
    """Raise `LoadRejectedError` unless a `kv_bytes` KV cache holds one sequence of
    `max_model_len` tokens (0: the engine's default) of the model in `ckpt`: the check the
    engine would fail after a worker had been spent on it."""
    try:
        cfg = ModelConfig.from_dir(ckpt)
    except ConfigError as exc:
        raise LoadRejectedError(str(exc)) from None
    need = sequence_kv_bytes(cfg, kv_itemsize(manifest, on_gpu), max_model_len or None)
    if kv_bytes < need:
        tokens = model_len(cfg, max_model_len or None)
        raise LoadRejectedError(
            f"a KV cache of {format_size(kv_bytes)} ({kv_bytes} bytes) cannot hold one sequence "
            f"of {tokens} tokens of this model, which needs {format_size(need)} ({need} bytes): "
            "raise the function's engine.kv_cache or lower engine.max_model_len"
        )


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
