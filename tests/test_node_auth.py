"""Shared-secret auth and TLS on a real grpc.aio server on a loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from node_fixtures import self_signed_cert

from node_agent.auth import BearerAuthInterceptor, TlsFiles, add_port, open_channel
from node_agent.proto import node_agent_pb2 as pb
from node_agent.proto import node_agent_pb2_grpc as pb_grpc

SECRET = "s3cret-for-tests"


class _Echo(pb_grpc.NodeAgentServicer):
    async def Status(self, request: pb.StatusRequest, context: object) -> pb.NodeStatus:
        return pb.NodeStatus(node_id="echo")

    async def Generate(
        self, request: pb.GenerateRequest, context: object
    ) -> AsyncIterator[pb.TokenEvent]:
        for i in request.prompt_ids:
            yield pb.TokenEvent(has_token=True, token_id=i)


async def _serve(tls: TlsFiles | None = None) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[BearerAuthInterceptor(SECRET)])
    pb_grpc.add_NodeAgentServicer_to_server(_Echo(), server)
    port = add_port(server, "127.0.0.1:0", tls)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _status(address: str, secret: str | None, ca: Path | None = None) -> pb.NodeStatus:
    async with open_channel(address, secret=secret, ca_file=ca) as channel:
        return await pb_grpc.NodeAgentStub(channel).Status(pb.StatusRequest(), timeout=10)


async def _stream(address: str, secret: str | None) -> list[int]:
    async with open_channel(address, secret=secret) as channel:
        call = pb_grpc.NodeAgentStub(channel).Generate(
            pb.GenerateRequest(prompt_ids=[3, 4]), timeout=10
        )
        return [event.token_id async for event in call]


def test_right_secret_is_served() -> None:
    async def go() -> None:
        server, address = await _serve()
        try:
            assert (await _status(address, SECRET)).node_id == "echo"
            assert await _stream(address, SECRET) == [3, 4]
        finally:
            await server.stop(None)

    asyncio.run(go())


@pytest.mark.parametrize("secret", [None, "wrong"])
def test_missing_or_wrong_secret_is_unauthenticated(secret: str | None) -> None:
    async def go() -> None:
        server, address = await _serve()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await _status(address, secret)
            assert unary.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as stream:
                await _stream(address, secret)
            assert stream.value.code() is grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(None)

    asyncio.run(go())


def test_tls_listener_serves_a_client_that_trusts_its_cert(tmp_path: Path) -> None:
    tls = self_signed_cert(tmp_path)

    async def go() -> None:
        server, address = await _serve(tls)
        try:
            assert (await _status(address, SECRET, ca=tls.cert)).node_id == "echo"
            with pytest.raises(grpc.aio.AioRpcError) as plain:  # plaintext client: refused
                await _status(address, SECRET)
            assert plain.value.code() is grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(go())
