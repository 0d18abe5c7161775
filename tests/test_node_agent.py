"""End to end: a real agent process, real worker processes, a real gRPC client."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from node_fixtures import SECRET, AgentProcess, pid_alive, proc_environ, start_agent

from node_agent.auth import open_channel
from node_agent.facts.sizing import DEFAULT_KV_CACHE_BYTES, WORKER_OVERHEAD_BYTES
from node_agent.proto import node_agent_pb2 as pb
from node_agent.proto import node_agent_pb2_grpc as pb_grpc

PROMPT = [5, 17, 42, 7]
TIMEOUT_S = 60.0
T = TypeVar("T")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent for the module, with a single instance slot and one torch thread per
    instance; each test unloads its own."""
    proc = start_agent(
        tmp_path_factory.mktemp("node"), "--slots", "1", "--prestart", "1", "--threads", "1"
    )
    yield proc
    assert proc.stop() == 0, "the agent did not exit cleanly on SIGTERM"


def _run(coro_fn: Callable[[pb_grpc.NodeAgentStub], Awaitable[T]], address: str) -> T:
    async def go() -> T:
        async with open_channel(address, secret=SECRET) as channel:
            return await coro_fn(pb_grpc.NodeAgentStub(channel))

    return asyncio.run(go())


def _greedy(n: int, **params: object) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=n, temperature=0.0, seed=1, **params)  # type: ignore[arg-type]


async def _wait_gone(stub: pb_grpc.NodeAgentStub, instance_id: str) -> pb.NodeStatus:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        status = await stub.Status(pb.StatusRequest(), timeout=TIMEOUT_S)
        if all(i.instance_id != instance_id for i in status.instances):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"instance {instance_id} still listed after {TIMEOUT_S} s")


async def _wait_idle_worker(stub: pb_grpc.NodeAgentStub) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while (await stub.Status(pb.StatusRequest(), timeout=TIMEOUT_S)).idle_workers < 1:
        assert time.monotonic() < deadline, f"no pre-started worker after {TIMEOUT_S} s"
        await asyncio.sleep(0.05)


def test_generate_matches_in_process_engine(
    agent: AgentProcess, tiny_ckpt_dir: Path, tiny_model_dir: Path
) -> None:
    from node_agent.engine import load_engine
    from node_agent.engine.sampling import SamplingParams
    from node_agent.engine.sequence import Request

    async def go(stub: pb_grpc.NodeAgentStub) -> tuple[pb.LoadInstanceReply, list[int]]:
        await _wait_idle_worker(stub)
        load = await stub.LoadInstance(
            pb.LoadInstanceRequest(instance_id="a", source=str(tiny_ckpt_dir)), timeout=TIMEOUT_S
        )
        request = pb.GenerateRequest(
            instance_id="a", request_id="r1", prompt_ids=PROMPT, params=_greedy(12)
        )
        ids = [e.token_id async for e in stub.Generate(request, timeout=TIMEOUT_S) if e.has_token]
        await stub.UnloadInstance(pb.UnloadInstanceRequest(instance_id="a"), timeout=TIMEOUT_S)
        await _wait_gone(stub, "a")
        return load, ids

    load, ids = _run(go, agent.address)
    engine = load_engine(tiny_model_dir)
    engine.add(engine.validate(Request("r", tuple(PROMPT), SamplingParams(12, 0.0, seed=1))))
    expected = []
    while engine.has_work():
        expected += [e.token_id for e in engine.step() if e.token_id is not None]
    assert ids == expected and len(ids) == 12
    assert load.timings.fetch_s > 0 and load.timings.read_build_s > 0
    assert load.timings.queue_s < 0.5, "a pre-started worker must not pay the torch import"
    assert load.reserved_bytes == load.weight_bytes + DEFAULT_KV_CACHE_BYTES + WORKER_OVERHEAD_BYTES
    assert not pid_alive(load.pid), "unload must terminate the instance process"


def test_sigkill_mid_generation_fails_the_stream_and_frees_the_slot(
    agent: AgentProcess, tiny_ckpt_dir: Path
) -> None:
    async def go(stub: pb_grpc.NodeAgentStub) -> None:
        load = await stub.LoadInstance(
            pb.LoadInstanceRequest(instance_id="k", source=str(tiny_ckpt_dir)), timeout=TIMEOUT_S
        )
        status = await stub.Status(pb.StatusRequest(), timeout=TIMEOUT_S)
        (info,) = [i for i in status.instances if i.instance_id == "k"]
        assert info.pid == load.pid
        request = pb.GenerateRequest(
            instance_id="k",
            request_id="long",
            prompt_ids=PROMPT,
            params=_greedy(2000, ignore_eos=True),
        )
        stream = stub.Generate(request, timeout=TIMEOUT_S)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in stream:
                if pid_alive(info.pid):
                    os.kill(info.pid, signal.SIGKILL)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "resume the request elsewhere" in (failed.value.details() or "")
        after = await _wait_gone(stub, "k")
        assert after.devices.cpu.slots_used == 0 and after.devices.cpu.memory_reserved_bytes == 0
        assert all(not h.pinned for t in after.tiers for h in t.holdings)

    _run(go, agent.address)
    assert agent.proc.poll() is None, "the agent must survive an instance's death"


def test_instance_process_runs_the_configured_torch_threads(
    agent: AgentProcess, tiny_ckpt_dir: Path
) -> None:
    async def go(stub: pb_grpc.NodeAgentStub) -> dict[str, str]:
        load = await stub.LoadInstance(
            pb.LoadInstanceRequest(instance_id="t", source=str(tiny_ckpt_dir)), timeout=TIMEOUT_S
        )
        try:
            return proc_environ(load.pid)
        finally:
            await stub.UnloadInstance(pb.UnloadInstanceRequest(instance_id="t"), timeout=TIMEOUT_S)

    env = _run(go, agent.address)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1", "stoke node --threads 1"


def test_load_without_a_free_slot_is_resource_exhausted(
    agent: AgentProcess, tiny_ckpt_dir: Path
) -> None:
    async def go(stub: pb_grpc.NodeAgentStub) -> None:
        await stub.LoadInstance(
            pb.LoadInstanceRequest(instance_id="s1", source=str(tiny_ckpt_dir)), timeout=TIMEOUT_S
        )
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.LoadInstance(
                    pb.LoadInstanceRequest(instance_id="s2", source=str(tiny_ckpt_dir)),
                    timeout=TIMEOUT_S,
                )
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--slots" in (refused.value.details() or "")
        finally:
            await stub.UnloadInstance(pb.UnloadInstanceRequest(instance_id="s1"), timeout=TIMEOUT_S)

    _run(go, agent.address)


def test_unknown_instance_is_not_found(agent: AgentProcess) -> None:
    async def go(stub: pb_grpc.NodeAgentStub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            request = pb.GenerateRequest(
                instance_id="nope", request_id="x", prompt_ids=PROMPT, params=_greedy(2)
            )
            async for _ in stub.Generate(request, timeout=TIMEOUT_S):
                pass
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND

    _run(go, agent.address)


def test_resumed_request_continues_identically(agent: AgentProcess, tiny_ckpt_dir: Path) -> None:
    async def go(stub: pb_grpc.NodeAgentStub) -> tuple[list[int], list[int]]:
        await stub.LoadInstance(
            pb.LoadInstanceRequest(instance_id="r", source=str(tiny_ckpt_dir)), timeout=TIMEOUT_S
        )
        try:
            full = pb.GenerateRequest(
                instance_id="r", request_id="f", prompt_ids=PROMPT, params=_greedy(10)
            )
            ids = [e.token_id async for e in stub.Generate(full, timeout=TIMEOUT_S) if e.has_token]
            resumed = pb.GenerateRequest(
                instance_id="r", request_id="g", prompt_ids=PROMPT, params=_greedy(10),
                output_ids=ids[:4],
            )  # fmt: skip
            rest = [
                e.token_id async for e in stub.Generate(resumed, timeout=TIMEOUT_S) if e.has_token
            ]
            bad = pb.GenerateRequest(instance_id="r", request_id="b", prompt_ids=PROMPT)
            with pytest.raises(grpc.aio.AioRpcError) as invalid:  # max_tokens 0
                [e async for e in stub.Generate(bad, timeout=TIMEOUT_S)]
            assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "max_tokens" in (invalid.value.details() or "")
            return ids, rest
        finally:
            await stub.UnloadInstance(pb.UnloadInstanceRequest(instance_id="r"), timeout=TIMEOUT_S)

    ids, rest = _run(go, agent.address)
    assert len(ids) == 10 and rest == ids[4:]


def test_cancel_ends_the_stream_with_abort(agent: AgentProcess, tiny_ckpt_dir: Path) -> None:
    async def go(stub: pb_grpc.NodeAgentStub) -> list[pb.TokenEvent]:
        await stub.LoadInstance(
            pb.LoadInstanceRequest(instance_id="c", source=str(tiny_ckpt_dir)), timeout=TIMEOUT_S
        )
        try:
            request = pb.GenerateRequest(
                instance_id="c", request_id="long", prompt_ids=PROMPT,
                params=_greedy(2000, ignore_eos=True),
            )  # fmt: skip
            events: list[pb.TokenEvent] = []
            async for event in stub.Generate(request, timeout=TIMEOUT_S):
                if not events:
                    cancel = pb.CancelRequest(instance_id="c", request_id="long")
                    await stub.Cancel(cancel, timeout=TIMEOUT_S)
                events.append(event)
            return events
        finally:
            await stub.UnloadInstance(pb.UnloadInstanceRequest(instance_id="c"), timeout=TIMEOUT_S)

    events = _run(go, agent.address)
    assert events[-1].finish_reason == pb.FINISH_REASON_ABORT and len(events) < 2000


def test_prefetch_then_evict(agent: AgentProcess, tiny_ckpt_dir: Path) -> None:
    async def go(stub: pb_grpc.NodeAgentStub) -> tuple[pb.PrefetchReply, int, pb.NodeStatus]:
        fetched = await stub.Prefetch(
            pb.PrefetchRequest(source=str(tiny_ckpt_dir), tier="disk"), timeout=TIMEOUT_S
        )
        evict = pb.EvictRequest(checkpoint_key=fetched.checkpoint_key, tier="disk")
        freed = (await stub.Evict(evict, timeout=TIMEOUT_S)).freed_bytes
        return fetched, freed, await stub.Status(pb.StatusRequest(), timeout=TIMEOUT_S)

    fetched, freed, status = _run(go, agent.address)
    assert fetched.bytes > 0 and freed == fetched.bytes
    (disk,) = [t for t in status.tiers if t.tier == "disk"]
    assert all(h.key != fetched.checkpoint_key for h in disk.holdings)


def test_load_of_a_missing_source_is_invalid_argument(agent: AgentProcess, tmp_path: Path) -> None:
    async def go(stub: pb_grpc.NodeAgentStub) -> pb.NodeStatus:
        missing = pb.LoadInstanceRequest(source=str(tmp_path / "nothing-here"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.LoadInstance(missing, timeout=TIMEOUT_S)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        return await stub.Status(pb.StatusRequest(), timeout=TIMEOUT_S)

    assert _run(go, agent.address).devices.cpu.slots_used == 0


def test_load_reports_where_the_store_found_the_checkpoint(
    agent: AgentProcess, tiny_ckpt_dir: Path
) -> None:
    async def load(stub: pb_grpc.NodeAgentStub, iid: str) -> tuple[str, str]:
        reply = await stub.LoadInstance(
            pb.LoadInstanceRequest(instance_id=iid, source=str(tiny_ckpt_dir)), timeout=TIMEOUT_S
        )
        status = await stub.Status(pb.StatusRequest(), timeout=TIMEOUT_S)
        (info,) = [i for i in status.instances if i.instance_id == iid]
        await stub.UnloadInstance(pb.UnloadInstanceRequest(instance_id=iid), timeout=TIMEOUT_S)
        assert info.loaded_from == reply.loaded_from, "Status must say what the Load said"
        return reply.checkpoint_key, reply.loaded_from

    async def evict(stub: pb_grpc.NodeAgentStub, key: str, *tiers: str) -> None:
        for tier in tiers:
            await stub.Evict(pb.EvictRequest(checkpoint_key=key, tier=tier), timeout=TIMEOUT_S)

    async def go(stub: pb_grpc.NodeAgentStub) -> list[str]:
        for tier in ("disk", "dram"):  # held in both, whatever earlier tests left, then in none
            fetched = await stub.Prefetch(
                pb.PrefetchRequest(source=str(tiny_ckpt_dir), tier=tier), timeout=TIMEOUT_S
            )
        key = fetched.checkpoint_key
        await evict(stub, key, "dram", "disk")
        origins = [(await load(stub, "o1"))[1], (await load(stub, "o2"))[1]]
        await evict(stub, key, "dram")
        return [*origins, (await load(stub, "o3"))[1]]

    assert _run(go, agent.address) == ["local", "dram", "disk"]


def test_evict_succeeds_as_soon_as_status_no_longer_lists_the_unloaded_instance(
    agent: AgentProcess, tiny_ckpt_dir: Path
) -> None:
    """The instance's worker is stopped (SIGSTOP) so its exit waits on the test: while it is
    being unloaded Status lists it as STOPPING, and once Status drops it its pin is gone."""

    async def go(stub: pb_grpc.NodeAgentStub) -> tuple[list[int], int]:
        load = await stub.LoadInstance(
            pb.LoadInstanceRequest(instance_id="p", source=str(tiny_ckpt_dir)), timeout=TIMEOUT_S
        )
        os.kill(load.pid, signal.SIGSTOP)
        seen: list[int] = []
        unload = asyncio.ensure_future(
            stub.UnloadInstance(pb.UnloadInstanceRequest(instance_id="p"), timeout=TIMEOUT_S)
        )
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                status = await stub.Status(pb.StatusRequest(), timeout=TIMEOUT_S)
                listed = [i.state for i in status.instances if i.instance_id == "p"]
                if not listed:
                    break
                if listed[0] == pb.INSTANCE_STATE_STOPPING and not seen:
                    os.kill(load.pid, signal.SIGCONT)  # now let it handle the SIGTERM
                seen += listed
                assert time.monotonic() < deadline, "the instance was never unloaded"
            evict = pb.EvictRequest(checkpoint_key=load.checkpoint_key, tier="dram")
            freed = (await stub.Evict(evict, timeout=TIMEOUT_S)).freed_bytes
        finally:
            if pid_alive(load.pid):
                os.kill(load.pid, signal.SIGCONT)
            await unload
        return seen, freed

    seen, freed = _run(go, agent.address)
    assert freed > 0
    assert pb.INSTANCE_STATE_STOPPING in seen


def test_a_kv_cache_too_small_for_one_sequence_is_refused_before_a_worker_loads(
    agent: AgentProcess, tiny_ckpt_dir: Path
) -> None:
    async def go(stub: pb_grpc.NodeAgentStub) -> tuple[grpc.aio.AioRpcError, pb.NodeStatus]:
        await _wait_idle_worker(stub)
        request = pb.LoadInstanceRequest(
            instance_id="kv",
            source=str(tiny_ckpt_dir),
            engine=pb.EngineOptions(kv_cache_bytes=1024, max_model_len=256),
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.LoadInstance(request, timeout=TIMEOUT_S)
        return refused.value, await stub.Status(pb.StatusRequest(), timeout=TIMEOUT_S)

    error, status = _run(go, agent.address)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT  # not retryable, not "overloaded"
    details = error.details() or ""
    assert "engine.kv_cache" in details and "256 tokens" in details and "1024 bytes" in details
    assert status.idle_workers >= 1, "the pre-started worker must not be spent on it"
    assert status.devices.cpu.slots_used == 0 and not status.instances
