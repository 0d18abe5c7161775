"""`migration.stream.TokenStream` against a host of its own (no controller, no node): what it
records, when it resumes elsewhere, and that it gives back every slot it held."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from migration.live import MigrationReport
from migration.request import RequestState, SamplingParams
from migration.stream import MAX_RESUMES, NodeFailed, TokenStream, UpstreamError
from node_agent.proto import node_agent_pb2 as pb


@dataclass(frozen=True)
class Instance:
    instance_id: str
    node_id: str


class FakeCall:
    """A node's Generate stream: `events`, then `failure` (if any) instead of the end."""

    def __init__(self, events: list[pb.TokenEvent], failure: BaseException | None = None) -> None:
        self.events, self.failure, self.cancelled = events, failure, False

    async def _run(self) -> AsyncIterator[pb.TokenEvent]:
        for event in self.events:
            yield event
        if self.failure is not None:
            raise self.failure

    def __aiter__(self) -> AsyncIterator[pb.TokenEvent]:
        return self._run()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class Host:
    """A `StreamHost` that serves scripted calls per instance and records what it was asked."""

    def __init__(self, calls: dict[str, FakeCall]) -> None:
        self.calls = calls
        self.started: list[tuple[str, list[int]]] = []
        self.released: list[str] = []
        self.dropped: list[str] = []
        self.tracked: dict[str, RequestState] = {}

    def start_call(self, instance: Instance, request: RequestState) -> Any:
        self.started.append((instance.instance_id, list(request.output_ids)))
        return self.calls[instance.instance_id]

    def release(self, instance: Instance) -> None:
        self.released.append(instance.instance_id)

    def drop_instance(self, instance: Instance) -> None:
        self.dropped.append(instance.instance_id)

    def track(self, request: RequestState) -> None:
        self.tracked[request.request_id] = request

    def untrack(self, request: RequestState) -> None:
        self.tracked.pop(request.request_id, None)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> object:
        return asyncio.ensure_future(coro)

    def start_migrate_call(self, instance: Instance, request: RequestState) -> Any:
        raise AssertionError("these tests migrate nothing")

    async def stop_after(self, instance: Instance, request: RequestState, outputs: int) -> None:
        raise AssertionError("these tests migrate nothing")

    def migration_done(self, report: MigrationReport) -> None:
        raise AssertionError("these tests migrate nothing")


def token(token_id: int, finish: pb.FinishReason = pb.FINISH_REASON_UNSPECIFIED) -> pb.TokenEvent:
    return pb.TokenEvent(
        token_id=token_id, has_token=True, text=f"t{token_id}", finish_reason=finish
    )


def request(**overrides: Any) -> RequestState:
    params = SamplingParams(max_tokens=3, temperature=0.0, top_p=1.0, seed=7)
    fields: dict[str, Any] = {
        "request_id": "r1",
        "function": "f",
        "prompt_ids": [1, 2],
        "params": params,
    }
    return RequestState(**(fields | overrides))


def unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "node gone"
    )


async def drain(stream: TokenStream[Instance]) -> list[int]:
    return [event.token_id async for event in stream]


def relocate_to(*targets: Instance) -> Any:
    queue = list(targets)

    async def relocate(exclude: frozenset[str]) -> Instance:
        assert queue, f"no instance left outside {sorted(exclude)}"
        return queue.pop(0)

    return relocate


def test_a_failed_node_resumes_on_another_instance_after_the_recorded_tokens() -> None:
    a, b = Instance("a", "n1"), Instance("b", "n2")
    host = Host(
        {
            "a": FakeCall([token(10)], failure=unavailable()),
            "b": FakeCall([token(11), token(12, pb.FINISH_REASON_LENGTH)]),
        }
    )
    req = request()

    async def scenario() -> list[int]:
        return await drain(TokenStream(host, req, a, relocate_to(b)))

    assert asyncio.run(scenario()) == [10, 11, 12]
    assert req.output_ids == [10, 11, 12]
    assert host.started == [("a", []), ("b", [10])], "b resumes after the token a emitted"
    assert (host.released, host.dropped) == (["a", "b"], ["a"])
    assert (req.instance_id, req.node_id) == ("b", "n2")
    assert host.tracked == {}


def test_the_call_starts_when_the_stream_is_made_not_when_it_is_read() -> None:
    host = Host({"a": FakeCall([token(1, pb.FINISH_REASON_STOP)])})

    async def scenario() -> None:
        stream = TokenStream(host, request(), Instance("a", "n1"), relocate_to())
        assert host.started == [("a", [])] and "r1" in host.tracked
        await stream.aclose()

    asyncio.run(scenario())
    assert host.calls["a"].cancelled and host.released == ["a"] and host.tracked == {}


def test_closing_mid_stream_cancels_the_call_and_releases_once() -> None:
    host = Host({"a": FakeCall([token(1), token(2), token(3, pb.FINISH_REASON_LENGTH)])})

    async def scenario() -> None:
        stream = TokenStream(host, request(), Instance("a", "n1"), relocate_to())
        async for _ in stream:
            break
        await stream.aclose()
        await stream.aclose()

    asyncio.run(scenario())
    assert host.calls["a"].cancelled and host.released == ["a"]


def test_it_gives_up_after_max_resumes() -> None:
    instances = [Instance(f"i{k}", f"n{k}") for k in range(MAX_RESUMES + 1)]
    host = Host({i.instance_id: FakeCall([], failure=unavailable()) for i in instances})

    async def scenario() -> None:
        await drain(TokenStream(host, request(), instances[0], relocate_to(*instances[1:])))

    with pytest.raises(UpstreamError):
        asyncio.run(scenario())
    assert host.released == [i.instance_id for i in instances]


class UnknownNodeA(Host):
    """Node n1 (instance `a`) is unknown: its call cannot even start."""

    def start_call(self, instance: Instance, request: RequestState) -> Any:
        if instance.instance_id == "a":
            raise NodeFailed("node n1 unknown")
        return super().start_call(instance, request)


def test_an_unreachable_node_at_start_resumes_elsewhere() -> None:
    a, b = Instance("a", "n1"), Instance("b", "n2")
    host = UnknownNodeA({"b": FakeCall([token(5, pb.FINISH_REASON_STOP)])})

    async def scenario() -> list[int]:
        return await drain(TokenStream(host, request(), a, relocate_to(b)))

    assert asyncio.run(scenario()) == [5]
    assert (host.released, host.dropped) == (["a", "b"], ["a"])


def test_sampling_params_reach_the_node_as_asked() -> None:
    params = SamplingParams(max_tokens=9, temperature=0.5, top_p=0.9, seed=3, stop=("x",))
    wire = request(params=params, output_ids=[4]).generate_request("inst")
    assert (wire.instance_id, list(wire.prompt_ids), list(wire.output_ids)) == ("inst", [1, 2], [4])
    assert wire.params == pb.SamplingParams(
        max_tokens=9, temperature=0.5, top_p=0.9, seed=3, stop=["x"]
    )
