"""`InstanceManager` when an instance's process dies under a stream: the stream fails with
`InstanceGoneError` and everything the instance held is released. The instance service here
is an in-test gRPC server that never stops streaming, so only the death watcher can end it."""

from __future__ import annotations

import asyncio
import time
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


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Wait (polling the event loop, not sleeping blind) until `condition()` holds."""
    for _ in range(6000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


def _manager_with_one_prestarted(store: Any) -> tuple[InstanceManager, WorkerPool]:
    pool = WorkerPool(1, start_timeout=120)
    return InstanceManager(store, {None: pool}, Budget(1 << 30, 2)), pool


def test_a_taken_worker_is_replaced_at_its_instances_first_token_not_during_its_cold_start(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path
) -> None:
    """The replacement's start-up (torch import, arena mapping) must not compete with the cold
    start's first forward pass: nothing starts until the first event is out."""
    store = make_store()

    async def go() -> tuple[int, int, int]:
        manager, pool = _manager_with_one_prestarted(store)
        pool.start()
        try:
            await _until(lambda: pool.idle == 1, "the pre-started worker is ready")
            inst = await manager.load(pb.LoadInstanceRequest(source=str(tiny_ckpt_dir)))
            after_load = pool.idle + pool.starting
            params = pb.SamplingParams(max_tokens=3)
            request = pb.GenerateRequest(
                instance_id=inst.instance_id, request_id="r", prompt_ids=[1, 2, 3], params=params
            )
            stream = manager.generate(request)
            await anext(stream)
            at_first_token = pool.idle + pool.starting
            async for _ in stream:
                pass
            await _until(lambda: pool.idle == 1, "the replacement is ready")
            return after_load, at_first_token, pool.idle
        finally:
            await manager.close()
            await pool.close()

    after_load, at_first_token, idle = asyncio.run(asyncio.wait_for(go(), 180))
    assert after_load == 0, "a replacement started during the cold start"
    assert at_first_token == 1 and idle == 1


def test_a_taken_worker_is_replaced_after_a_while_when_no_request_comes(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node_agent.instances import manager as manager_module

    monkeypatch.setattr(manager_module, "REPLACE_AFTER_S", 0.5)
    store = make_store()

    async def go() -> tuple[int, float]:
        manager, pool = _manager_with_one_prestarted(store)
        pool.start()
        try:
            await _until(lambda: pool.idle == 1, "the pre-started worker is ready")
            await manager.load(pb.LoadInstanceRequest(source=str(tiny_ckpt_dir)))
            loaded = time.monotonic()
            after_load = pool.idle + pool.starting
            await _until(lambda: pool.starting + pool.idle == 1, "a replacement starts")
            return after_load, time.monotonic() - loaded
        finally:
            await manager.close()
            await pool.close()

    after_load, waited = asyncio.run(asyncio.wait_for(go(), 180))
    assert after_load == 0 and waited >= 0.4


def test_a_failed_load_replaces_its_worker_at_once(
    make_store: Callable[..., Any], tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    store = make_store()

    async def go() -> int:
        manager, pool = _manager_with_one_prestarted(store)
        pool.start()
        try:
            await _until(lambda: pool.idle == 1, "the pre-started worker is ready")
            with pytest.raises(Exception):  # noqa: B017 - whichever error the store raises
                await manager.load(pb.LoadInstanceRequest(source=str(bad)))
            return pool.idle + pool.starting
        finally:
            await manager.close()
            await pool.close()

    assert asyncio.run(asyncio.wait_for(go(), 180)) == 1
