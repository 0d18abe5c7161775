"""`InstanceManager` when an instance's process dies under a stream: the stream fails with
`InstanceGoneError` and everything the instance held is released. The instance service here
is an in-test gRPC server that never stops streaming, so only the death watcher can end it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from node_agent.facts.tiers import Origin, TierName
from node_agent.instances import (
    Budget,
    Instance,
    InstanceGoneError,
    InstanceManager,
    Reservation,
    WorkerPool,
)
from node_agent.instances.pool import Worker
from node_agent.proto import node_agent_pb2 as pb
from node_agent.proto import node_agent_pb2_grpc as pb_grpc


class _Endless(pb_grpc.InstanceServicer):
    async def Generate(self, request: Any, context: Any) -> AsyncIterator[pb.TokenEvent]:
        while True:
            yield pb.TokenEvent(has_token=True, token_id=1)
            await asyncio.sleep(0.01)


def test_stream_fails_when_the_watcher_sees_the_process_exit(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path
) -> None:
    store = make_store()
    path = store.ensure(tiny_ckpt_dir, TierName.DRAM, pin=True)

    async def go() -> tuple[InstanceManager, BaseException]:
        server = grpc.aio.server()
        pb_grpc.add_InstanceServicer_to_server(_Endless(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        proc = await asyncio.create_subprocess_exec("sleep", "60")  # stands in for the worker
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        worker = Worker(proc, Path("/nonexistent.sock"), channel, pb_grpc.InstanceStub(channel))
        manager = InstanceManager(store, {None: WorkerPool(0)}, Budget(1 << 30, 1))
        manager.budget.take_slot()
        manager.budget.reserve(100, "test")
        inst = Instance("i", str(tiny_ckpt_dir), path.name, TierName.DRAM, worker,
                        Reservation(0, 100), pb.LoadTimings(), Origin.DRAM)  # fmt: skip
        manager.instances["i"] = inst
        inst.watcher = asyncio.get_running_loop().create_task(manager._watch(inst))
        try:
            async for _ in manager.generate(pb.GenerateRequest(instance_id="i")):
                proc.kill()
            raise AssertionError("the stream ended without an error")
        except InstanceGoneError as exc:
            return manager, exc
        finally:
            await server.stop(None)

    manager, error = asyncio.run(asyncio.wait_for(go(), 30))
    assert "resume the request elsewhere" in str(error)
    assert manager.instances == {} and manager.budget.used_slots == 0
    assert manager.budget.reserved_bytes == 0
    assert not store.holdings()[TierName.DRAM][0].pinned


def test_generate_on_an_unknown_instance_raises(make_store: Callable[..., Any]) -> None:
    from node_agent.instances import UnknownInstanceError

    manager = InstanceManager(make_store(), {None: WorkerPool(0)}, Budget(1 << 30, 1))

    async def go() -> None:
        async for _ in manager.generate(pb.GenerateRequest(instance_id="x")):
            pass

    with pytest.raises(UnknownInstanceError, match="see Status"):
        asyncio.run(go())


def test_an_unload_cancelled_mid_stop_still_frees_everything(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path
) -> None:
    # A process that ignores SIGTERM keeps `stop()` in its grace period; the caller (a gRPC
    # handler whose deadline passed) is cancelled there. Nothing may leak.
    store = make_store()
    path = store.ensure(tiny_ckpt_dir, TierName.DRAM, pin=True)

    async def go() -> InstanceManager:
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", "trap '' TERM; echo trapped; while :; do sleep 0.1; done",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        # a SIGTERM that lands before the trap is set ends the shell at once: wait for it
        assert await proc.stdout.readline() == b"trapped\n"
        channel = grpc.aio.insecure_channel("unix:/nonexistent.sock")
        worker = Worker(proc, Path("/nonexistent.sock"), channel, pb_grpc.InstanceStub(channel))
        manager = InstanceManager(store, {None: WorkerPool(0)}, Budget(1 << 30, 1))
        manager.budget.take_slot()
        manager.budget.reserve(100, "test")
        manager.instances["i"] = Instance(
            "i", str(tiny_ckpt_dir), path.name, TierName.DRAM, worker, Reservation(0, 100),
            pb.LoadTimings(), Origin.DRAM,
        )  # fmt: skip
        unload = asyncio.ensure_future(manager.unload("i"))
        while proc.returncode is None and not unload.done():
            await asyncio.sleep(0.05)  # let it reach the SIGTERM grace period
            if manager.instances["i"].releasing is not None:
                break
        unload.cancel()
        await manager.close()  # waits for the shielded release to finish
        assert proc.returncode is not None, "the worker process was left running"
        return manager

    manager = asyncio.run(asyncio.wait_for(go(), 60))
    assert manager.instances == {} and manager.budget.used_slots == 0
    assert manager.budget.reserved_bytes == 0
    assert not store.holdings()[TierName.DRAM][0].pinned


def test_concurrent_acquires_with_no_prestarted_workers_both_get_one() -> None:
    async def go() -> list[int]:
        pool = WorkerPool(0, start_timeout=120)
        pool.start()
        try:
            workers = await asyncio.gather(pool.acquire(), pool.acquire())
            pids = [w.pid for w in workers]
            for worker in workers:
                await worker.stop()
            return pids
        finally:
            await pool.close()

    pids = asyncio.run(asyncio.wait_for(go(), 180))
    assert len(set(pids)) == 2
