"""The agent registers with and heartbeats to a real in-test controller gRPC server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from node_fixtures import SECRET, self_signed_cert, start_agent

from node_agent.auth import BearerAuthInterceptor, open_channel
from node_agent.proto import controller_pb2 as cpb
from node_agent.proto import controller_pb2_grpc as cpb_grpc
from node_agent.proto import node_agent_pb2 as pb
from node_agent.proto import node_agent_pb2_grpc as pb_grpc

TIMEOUT_S = 60.0


class _Controller(cpb_grpc.ControllerServicer):
    """Records every Register and Heartbeat it receives."""

    def __init__(self) -> None:
        self.registers: asyncio.Queue[cpb.RegisterRequest] = asyncio.Queue()
        self.beats: asyncio.Queue[cpb.HeartbeatRequest] = asyncio.Queue()

    async def Register(self, request: cpb.RegisterRequest, context: object) -> cpb.RegisterReply:
        await self.registers.put(request)
        return cpb.RegisterReply(heartbeat_interval_s=0.1)

    async def Heartbeat(self, request: cpb.HeartbeatRequest, context: object) -> cpb.HeartbeatReply:
        await self.beats.put(request)
        return cpb.HeartbeatReply()


def test_agent_registers_then_heartbeats_its_state(tmp_path: Path, tiny_ckpt_dir: Path) -> None:
    async def go() -> None:
        controller = _Controller()
        server = grpc.aio.server(interceptors=[BearerAuthInterceptor(SECRET)])
        cpb_grpc.add_ControllerServicer_to_server(controller, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        agent = await asyncio.to_thread(
            start_agent,
            tmp_path, "--controller", f"127.0.0.1:{port}", "--cpu-memory", "64MiB",
            "--prestart", "0", "--heartbeat", "30",
        )  # fmt: skip
        try:
            reg = await asyncio.wait_for(controller.registers.get(), TIMEOUT_S)
            assert reg.address == agent.address and reg.node_id
            first = await asyncio.wait_for(controller.beats.get(), TIMEOUT_S)
            second = await asyncio.wait_for(controller.beats.get(), TIMEOUT_S)  # interval 0.1 s
            assert (first.sequence, second.sequence) == (1, 2)
            cpu = second.status.devices.cpu
            assert cpu.memory_budget_bytes == 64 << 20 and cpu.slots_total == 4
            assert {t.tier for t in second.status.tiers} == {"dram", "disk"}
            await _check_memory_budget_refusal(agent.address, tiny_ckpt_dir)
            await _check_drain(agent.address, tiny_ckpt_dir)
            while not (await asyncio.wait_for(controller.beats.get(), TIMEOUT_S)).status.draining:
                pass  # beats sent before the drain
        finally:
            assert await asyncio.to_thread(agent.stop) == 0
            await server.stop(None)

    asyncio.run(go())


async def _check_memory_budget_refusal(address: str, ckpt: Path) -> None:
    """64 MiB cannot hold the default 256 MiB KV cache: refused before any worker starts."""
    async with open_channel(address, secret=SECRET) as channel:
        stub = pb_grpc.NodeAgentStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.LoadInstance(pb.LoadInstanceRequest(source=str(ckpt)), timeout=TIMEOUT_S)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--cpu-memory" in (refused.value.details() or "")
        status = await stub.Status(pb.StatusRequest(), timeout=TIMEOUT_S)
        assert status.devices.cpu.slots_used == 0 and status.devices.cpu.memory_reserved_bytes == 0
        # The disk -> DRAM copy the load began runs to its end (the checkpoint stays cached);
        # its pin goes when it does.
        deadline = time.monotonic() + TIMEOUT_S
        while any(h.pinned for t in status.tiers for h in t.holdings):
            assert time.monotonic() < deadline, "the refused load's copy kept its pin"
            await asyncio.sleep(0.05)
            status = await stub.Status(pb.StatusRequest(), timeout=TIMEOUT_S)


async def _check_drain(address: str, ckpt: Path) -> None:
    """A draining node refuses new instances with UNAVAILABLE."""
    async with open_channel(address, secret=SECRET) as channel:
        stub = pb_grpc.NodeAgentStub(channel)
        assert (await stub.Drain(pb.DrainRequest(), timeout=TIMEOUT_S)).in_flight == 0
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.LoadInstance(pb.LoadInstanceRequest(source=str(ckpt)), timeout=TIMEOUT_S)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert (await stub.Status(pb.StatusRequest(), timeout=TIMEOUT_S)).draining


def test_agent_serves_tls_with_cert_files(tmp_path: Path) -> None:
    tls = self_signed_cert(tmp_path)
    agent = start_agent(
        tmp_path, "--prestart", "0", "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)
    )

    async def status(ca: Path | None) -> pb.NodeStatus:
        async with open_channel(agent.address, secret=SECRET, ca_file=ca) as channel:
            return await pb_grpc.NodeAgentStub(channel).Status(pb.StatusRequest(), timeout=10)

    try:
        assert asyncio.run(status(tls.cert)).devices.cpu.slots_total == 4
        with pytest.raises(grpc.aio.AioRpcError) as plain:
            asyncio.run(status(None))
        assert plain.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        assert agent.stop() == 0
