"""What an instance is charged (`placement.reserve`), and `InstanceManager.load` refusing what
does not fit before any worker starts. GPU nodes are faked with a GPU list: no GPU needed."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoint_format import Manifest, read_manifest
from checkpoint_format.manifest import TensorEntry
from node_agent.facts.sizing import WORKER_OVERHEAD_BYTES
from node_agent.facts.tiers import TierName
from node_agent.instances import (
    Budget,
    GpuLedger,
    InstanceManager,
    NoRoomError,
    WorkerPool,
    WorkerSpec,
    WorkerStartError,
)
from node_agent.instances.gpus import CUDA_CONTEXT_BYTES, gpu_budget
from node_agent.instances.placement import cpu_weight_bytes, release, reserve
from node_agent.proto import node_agent_pb2 as pb

KV = 1 << 20
GIB = 1 << 30


def fake_gpu(index: int = 0, total: int = 16 * GIB) -> pb.GpuDevice:
    return pb.GpuDevice(index=index, name="fake", total_bytes=total, free_bytes=total)


def test_cpu_instance_is_charged_weights_kv_and_the_worker_overhead(tiny_ckpt_dir: Path) -> None:
    manifest = read_manifest(tiny_ckpt_dir)
    need = manifest.total_bytes + KV + WORKER_OVERHEAD_BYTES  # float32 checkpoint
    budget = Budget(need, 1)
    held = reserve(budget, None, manifest, KV, "i")
    assert held.total_bytes == budget.reserved_bytes == need and held.gpu is None
    release(budget, None, held)
    assert budget.reserved_bytes == 0


def test_cpu_weights_are_counted_in_float32(tiny_ckpt_dir: Path) -> None:
    # The engine computes in float32 on the CPU: a bfloat16 checkpoint doubles in memory.
    manifest = read_manifest(tiny_ckpt_dir)
    half = {
        name: dataclasses.replace(t, dtype="bfloat16", nbytes=t.nbytes // 2)
        for name, t in manifest.tensors.items()
    }
    bf16 = Manifest(manifest.chunk_size, (), half)  # no partitions: the tensors alone count
    floats = sum(t.nbytes for t in manifest.tensors.values())
    assert cpu_weight_bytes(bf16) == floats  # twice the bfloat16 bytes
    int8 = {"q": TensorEntry(0, 0, 1000, "int8", (1000,))}
    assert cpu_weight_bytes(Manifest(1 << 20, (), int8)) == 1000


def test_gpu_instance_goes_on_a_gpu_with_only_its_overhead_on_the_host(
    tiny_ckpt_dir: Path,
) -> None:
    manifest = read_manifest(tiny_ckpt_dir)
    budget, ledger = Budget(GIB, 1), GpuLedger([fake_gpu(0), fake_gpu(1, total=32 * GIB)])
    held = reserve(budget, ledger, manifest, KV, "i")
    assert held.gpu == 1 and held.gpu_bytes == manifest.total_bytes + KV + CUDA_CONTEXT_BYTES
    assert budget.reserved_bytes == held.host_bytes == WORKER_OVERHEAD_BYTES
    release(budget, ledger, held)
    assert budget.reserved_bytes == 0 and ledger.reserved() == {0: 0, 1: 0}


def test_gpu_reservation_is_undone_when_the_host_has_no_room(tiny_ckpt_dir: Path) -> None:
    ledger = GpuLedger([fake_gpu()])
    with pytest.raises(NoRoomError, match="--cpu-memory"):
        reserve(Budget(WORKER_OVERHEAD_BYTES - 1, 1), ledger, read_manifest(tiny_ckpt_dir), KV, "i")
    assert ledger.reserved() == {0: 0}


def _refused_load(
    store: Any, source: Path, budget: Budget, gpus: GpuLedger | None
) -> tuple[BaseException, InstanceManager]:
    """The error `manager.load` raises. Its pools keep no idle worker, so a load that got past
    the memory check would have to start one (returning a different error, or none)."""
    devices = [None] if gpus is None else gpus.indexes
    pools = {d: WorkerPool(0, start_timeout=5) for d in devices}
    manager = InstanceManager(store, pools, budget, gpus)
    engine = pb.EngineOptions(kv_cache_bytes=KV, max_model_len=256)  # KV holds a sequence
    request = pb.LoadInstanceRequest(instance_id="i", source=str(source), engine=engine)

    async def go() -> BaseException:
        try:
            await manager.load(request)
        except Exception as exc:
            return exc
        finally:
            await manager.close()
            for pool in pools.values():
                await pool.close()
        raise AssertionError("the load was not refused")

    return asyncio.run(asyncio.wait_for(go(), 60)), manager


def _assert_nothing_held(manager: InstanceManager, store: Any) -> None:
    assert manager.instances == {} and manager.budget.used_slots == 0
    assert manager.budget.reserved_bytes == 0
    assert manager.gpus is None or not any(manager.gpus.reserved().values())
    assert not any(h.pinned for h in store.holdings()[TierName.DRAM])


def test_load_that_fits_without_the_worker_overhead_only_is_refused(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path
) -> None:
    store = make_store()
    weights = cpu_weight_bytes(read_manifest(tiny_ckpt_dir))
    budget = Budget(weights + KV + WORKER_OVERHEAD_BYTES - 1, 1)
    error, manager = _refused_load(store, tiny_ckpt_dir, budget, None)
    assert isinstance(error, NoRoomError), error
    assert "--cpu-memory" in str(error)
    _assert_nothing_held(manager, store)


def test_load_that_fits_no_gpu_is_refused(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path
) -> None:
    store = make_store()
    need = read_manifest(tiny_ckpt_dir).total_bytes + KV + CUDA_CONTEXT_BYTES
    small = fake_gpu(0, total=need - 1 + (16 * GIB - gpu_budget(fake_gpu())))  # 1 byte short
    error, manager = _refused_load(store, tiny_ckpt_dir, Budget(GIB, 1), GpuLedger([small]))
    assert isinstance(error, NoRoomError), error
    assert "GPU 0" in str(error)
    _assert_nothing_held(manager, store)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_gpu_load_without_cuda_fails_clearly_and_frees_everything(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path
) -> None:
    # The GPU path run where torch sees no GPU (a CPU-only build, a broken driver): the
    # worker refuses the Load with a message that says so, and nothing is left reserved.
    store = make_store()
    ledger = GpuLedger([fake_gpu()])
    manager = InstanceManager(store, {0: WorkerPool(0, WorkerSpec(gpu=0))}, Budget(GIB, 1), ledger)
    request = pb.LoadInstanceRequest(instance_id="g", source=str(tiny_ckpt_dir))

    async def go() -> None:
        try:
            await manager.load(request)
        finally:
            await manager.close()
            await manager.pools[0].close()

    with pytest.raises(WorkerStartError, match="no CUDA device"):
        asyncio.run(asyncio.wait_for(go(), 180))
    _assert_nothing_held(manager, store)
