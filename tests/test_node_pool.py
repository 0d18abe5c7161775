"""`WorkerPool` with real worker processes: how a worker is started (threads, GPU pinning,
token) and that it keeps serving whatever it prints."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from node_fixtures import proc_argv, proc_environ

from node_agent.auth import SECRET_ENV, open_channel
from node_agent.instances import Worker, WorkerPool, WorkerSpec
from node_agent.instances.spawn import TOKEN_ENV
from node_agent.proto import node_agent_pb2 as pb
from node_agent.proto import node_agent_pb2_grpc as pb_grpc

TIMEOUT_S = 120.0
CHATTY = Path(__file__).with_name("chatty_worker.py")
T = TypeVar("T")


def _with_worker(spec: WorkerSpec, check: Callable[[Worker], Awaitable[T]]) -> T:
    """Start one worker from `spec` (no idle ones kept), run `check` on it, stop it."""

    async def go() -> T:
        pool = WorkerPool(0, spec, start_timeout=TIMEOUT_S)
        pool.start()
        try:
            worker = await pool.acquire()
            try:
                return await check(worker)
            finally:
                await worker.stop()
        finally:
            await pool.close()

    return asyncio.run(asyncio.wait_for(go(), 2 * TIMEOUT_S))


def test_worker_runs_torch_with_the_configured_threads() -> None:
    async def check(worker: Worker) -> tuple[int | None, dict[str, str]]:
        return worker.torch_threads, proc_environ(worker.pid)

    # 3 is neither this machine's core count nor torch's default here, so only the setting
    # can produce it.
    threads, env = _with_worker(WorkerSpec(threads=3), check)
    assert threads == 3, "torch.get_num_threads() in the worker, from its ready line"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"


def test_gpu_worker_sees_only_its_gpu_in_nvidia_smi_order(tmp_path: Path) -> None:
    """It is given the DRAM arena too (to page-lock it); where it cannot (no such GPU here),
    it still becomes ready."""
    arena = tmp_path / "arena"
    arena.write_bytes(bytes(1 << 16))

    async def check(worker: Worker) -> tuple[dict[str, str], list[str]]:
        return proc_environ(worker.pid), proc_argv(worker.pid)

    env, argv = _with_worker(WorkerSpec(gpu=1, arena=arena), check)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert argv[argv.index("--device") + 1] == "cuda"
    assert argv[argv.index("--arena") + 1] == str(arena)


def test_cpu_worker_sees_no_gpu() -> None:
    async def check(worker: Worker) -> tuple[dict[str, str], list[str]]:
        return proc_environ(worker.pid), proc_argv(worker.pid)

    env, argv = _with_worker(WorkerSpec(), check)
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert argv[argv.index("--device") + 1] == "cpu"


async def _health(address: str, secret: str | None) -> pb.HealthReply:
    async with open_channel(address, secret=secret) as channel:
        return await pb_grpc.InstanceStub(channel).Health(pb.HealthRequest(), timeout=30)


async def _generate(address: str, secret: str | None) -> list[pb.TokenEvent]:
    async with open_channel(address, secret=secret) as channel:
        request = pb.GenerateRequest(request_id="r", prompt_ids=[1])
        return [e async for e in pb_grpc.InstanceStub(channel).Generate(request, timeout=30)]


def test_worker_refuses_calls_without_its_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "the-node-secret")

    async def check(worker: Worker) -> None:
        address = f"unix:{worker.socket}"
        for secret in (None, "not-the-token"):
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await _health(address, secret)
            assert unary.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as stream:
                await _generate(address, secret)
            assert stream.value.code() is grpc.StatusCode.UNAUTHENTICATED
        token = proc_environ(worker.pid)[TOKEN_ENV]
        assert (await _health(address, token)).pid == worker.pid
        assert (await worker.stub.Health(pb.HealthRequest(), timeout=30)).pid == worker.pid
        assert not any(token in arg for arg in proc_argv(worker.pid)), "token on the cmdline"
        assert SECRET_ENV not in proc_environ(worker.pid), "a worker must not get the secret"

    _with_worker(WorkerSpec(), check)


def test_worker_that_prints_a_lot_after_its_ready_line_keeps_serving() -> None:
    # Each Health prints 1 MiB first: nobody reading the pipe after the ready line would
    # block the worker in that print (a Linux pipe holds 64 KiB) and the call would time out.
    async def check(worker: Worker) -> list[int]:
        replies = [await worker.stub.Health(pb.HealthRequest(), timeout=60) for _ in range(3)]
        return [reply.pid for reply in replies]

    spec = WorkerSpec(program=(sys.executable, str(CHATTY)))
    pids = _with_worker(spec, check)
    assert len(pids) == 3 and len(set(pids)) == 1
