"""The node's side of live migration through a real agent and real worker processes: the
`Migrate` call's rounds, its commit, and an abandoned migration freeing what it held."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from node_fixtures import SECRET, AgentProcess, start_agent

from node_agent.auth import open_channel
from node_agent.proto import node_agent_pb2 as pb
from node_agent.proto import node_agent_pb2_grpc as pb_grpc

PROMPT = [5, 17, 42, 7, 99, 3]
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    proc = start_agent(
        tmp_path_factory.mktemp("node"), "--slots", "1", "--prestart", "1", "--threads", "1"
    )
    yield proc
    assert proc.stop() == 0


def _params(n: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=n, temperature=0.7, seed=77, ignore_eos=True)


class Rounds:
    """The controller's half of a Migrate call: an outbox the call reads from."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[pb.MigrateFeed | None] = asyncio.Queue()

    def send(self, msg: pb.MigrateFeed | None) -> None:
        self.queue.put_nowait(msg)

    async def feed(self) -> AsyncIterator[pb.MigrateFeed]:
        while (msg := await self.queue.get()) is not None:
            yield msg


def _begin(instance_id: str, request_id: str, output_ids: list[int], n: int) -> pb.MigrateFeed:
    return pb.MigrateFeed(
        begin=pb.GenerateRequest(
            instance_id=instance_id,
            request_id=request_id,
            prompt_ids=PROMPT,
            params=_params(n),
            output_ids=output_ids,
        )
    )


def test_rounds_then_commit_continue_the_request_exactly(
    agent: AgentProcess, tiny_ckpt_dir: Path
) -> None:
    async def go() -> tuple[list[int], list[int], list[int]]:
        async with open_channel(agent.address, secret=SECRET) as channel:
            stub = pb_grpc.NodeAgentStub(channel)
            await stub.LoadInstance(
                pb.LoadInstanceRequest(
                    instance_id="m", source=str(tiny_ckpt_dir),
                    engine=pb.EngineOptions(max_batch_size=1),
                ),
                timeout=TIMEOUT_S,
            )  # fmt: skip
            try:
                ref_req = pb.GenerateRequest(
                    instance_id="m", request_id="ref", prompt_ids=PROMPT, params=_params(20)
                )
                ref = [e.token_id async for e in stub.Generate(ref_req) if e.has_token]
                rounds = Rounds()
                call = stub.Migrate(rounds.feed(), timeout=TIMEOUT_S)
                rounds.send(_begin("m", "mig", ref[:4], 20))
                prefilled = [(await call.read()).prefilled]
                rounds.send(pb.MigrateFeed(catch_up=pb.TokenIds(ids=ref[4:9])))
                prefilled.append((await call.read()).prefilled)
                rounds.send(pb.MigrateFeed(commit=pb.TokenIds(ids=ref[9:11])))
                rest: list[int] = []
                async for event in call:
                    assert event.WhichOneof("kind") == "token"
                    if event.token.has_token:
                        rest.append(event.token.token_id)
                rounds.send(None)
                # Abandoned after its first round: the call ends, the slot (batch of one) frees.
                rounds = Rounds()
                call = stub.Migrate(rounds.feed(), timeout=TIMEOUT_S)
                rounds.send(_begin("m", "gone", ref[:2], 20))
                assert (await call.read()).prefilled == len(PROMPT) + 2
                call.cancel()
                again = [
                    e.token_id async for e in stub.Generate(ref_req, timeout=20) if e.has_token
                ]
                assert again == ref, "the abandoned migration still held the only KV slot"
                # A source asked to stop after 6 outputs (the hand-over) ends with the 6th token
                # (or its next one, if it was past it when asked), HANDED_OVER, and frees its
                # slot. Long, so that it cannot finish first.
                src_req = pb.GenerateRequest(
                    instance_id="m", request_id="src", prompt_ids=PROMPT, params=_params(1500)
                )
                source = stub.Generate(src_req, timeout=TIMEOUT_S)
                stopped = [await source.read()]
                await stub.Cancel(
                    pb.CancelRequest(instance_id="m", request_id="src", after_outputs=6)
                )
                stopped += [e async for e in source]
                ids = [e.token_id for e in stopped]
                assert 6 <= len(ids) < 1500 and ids[:20] == ref[: len(ids)]
                reasons = {e.finish_reason for e in stopped[:-1]}
                assert reasons == {pb.FINISH_REASON_UNSPECIFIED}
                assert stopped[-1].has_token
                assert stopped[-1].finish_reason == pb.FINISH_REASON_HANDED_OVER
                again = [
                    e.token_id async for e in stub.Generate(ref_req, timeout=20) if e.has_token
                ]
                assert again == ref, "the stopped source still held the only KV slot"
                return ref, prefilled, rest
            finally:
                await stub.UnloadInstance(pb.UnloadInstanceRequest(instance_id="m"))

    ref, prefilled, rest = asyncio.run(go())
    assert prefilled == [len(PROMPT) + 4, len(PROMPT) + 9]
    assert ref[:11] + rest == ref and len(ref) == 20


def test_a_migration_to_an_unknown_instance_or_without_begin_is_refused(
    agent: AgentProcess,
) -> None:
    async def go() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        async with open_channel(agent.address, secret=SECRET) as channel:
            stub = pb_grpc.NodeAgentStub(channel)
            codes = []
            for first in (
                _begin("nope", "r", [], 5),
                pb.MigrateFeed(commit=pb.TokenIds(ids=[1])),
            ):
                rounds = Rounds()
                rounds.send(first)
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    async for _ in stub.Migrate(rounds.feed(), timeout=TIMEOUT_S):
                        pass
                codes.append(failed.value.code())
            return codes[0], codes[1]

    unknown, no_begin = asyncio.run(go())
    assert unknown is grpc.StatusCode.NOT_FOUND
    assert no_begin is grpc.StatusCode.INVALID_ARGUMENT
