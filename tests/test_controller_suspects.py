"""Suspect nodes (`controller.suspects`) and the exclusions placement applies after failures:
the suspect set's expiry (an injected clock, no sleeps), the all-suspect fallback, the router
merging suspects into each attempt's exclusions and spreading failed starts over other nodes,
and a resumed request avoiding every node it failed on (`migration.stream`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.cluster import InstanceStatus
from controller.errors import Overloaded
from controller.models import ModelInfo
from controller.nodes import NodeClients
from controller.registry import FunctionRecord
from controller.router import MAX_PLACEMENT_ATTEMPTS, Router, RouterConfig
from controller.spec import spec_from_dict
from controller.state import ClusterState, InstanceState, NodeState
from controller.suspects import Suspects, avoided
from migration.live import MigrationReport
from migration.request import RequestState, SamplingParams
from migration.stream import TokenStream
from node_agent.proto import node_agent_pb2 as pb

SOURCE = "/models/m"
NODES = ("n1", "n2", "n3")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def unavailable(details: str = "failed to connect: Connection refused") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details
    )


# ---- the suspect set --------------------------------------------------------------------------


def test_a_marked_node_is_suspect_until_its_hold_expires() -> None:
    clock = Clock()
    suspects = Suspects(hold_s=5.0, clock=clock)
    suspects.mark("n1", "refused")
    assert suspects.current() == {"n1"} and "n1" in suspects
    clock.now += 4.9
    assert suspects.current() == {"n1"}
    clock.now += 0.1
    assert suspects.current() == frozenset() and "n1" not in suspects


def test_a_new_failure_extends_the_hold() -> None:
    clock = Clock()
    suspects = Suspects(hold_s=5.0, clock=clock)
    suspects.mark("n1", "refused")
    clock.now += 4.0
    suspects.mark("n1", "refused again")
    clock.now += 4.0
    assert suspects.current() == {"n1"}, "5 s from the latest failure, not the first"
    clock.now += 1.0
    assert suspects.current() == frozenset()


def test_a_node_proved_healthy_is_cleared_at_once(caplog: pytest.LogCaptureFixture) -> None:
    suspects = Suspects(hold_s=5.0, clock=Clock())
    suspects.mark("n1", "refused")
    caplog.clear()
    with caplog.at_level("INFO", logger="controller.suspects"):
        suspects.clear("n1", "f-1 loaded there")
        suspects.clear("n2", "f-2 loaded there")
    assert suspects.current() == frozenset()
    assert [r.getMessage() for r in caplog.records] == [
        "node n1 is no longer suspect: f-1 loaded there"
    ], "only a node that was suspect is logged"


def test_becoming_suspect_is_logged_once_with_why(caplog: pytest.LogCaptureFixture) -> None:
    suspects = Suspects(hold_s=5.0, clock=Clock())
    with caplog.at_level("INFO", logger="controller.suspects"):
        suspects.mark("n1", "LoadInstance refused")
        suspects.mark("n1", "a stream failed")
    lines = [r.getMessage() for r in caplog.records if r.levelname != "DEBUG"]
    assert lines == ["node n1 is suspect for 5 s: LoadInstance refused"]


def test_suspects_join_the_exclusions_while_another_candidate_is_left() -> None:
    assert avoided(frozenset({"n1"}), frozenset({"n2"}), NODES) == {"n1", "n2"}


def test_when_every_candidate_is_suspect_only_the_exclusions_count() -> None:
    assert avoided(frozenset({"n1"}), frozenset({"n2", "n3"}), NODES) == {"n1"}
    assert avoided(frozenset(), frozenset(NODES), NODES) == frozenset()


# ---- the router ---------------------------------------------------------------------------


class Stub:
    """A node's `LoadInstance`: refused like a dead node's when its node is in `dead`."""

    def __init__(self, clients: FakeClients, node_id: str) -> None:
        self.clients, self.node_id = clients, node_id

    async def LoadInstance(self, request: pb.LoadInstanceRequest, timeout: float) -> Any:
        self.clients.loads.append((self.node_id, asyncio.get_running_loop().time()))
        if self.node_id in self.clients.dead:
            raise unavailable()
        return pb.LoadInstanceReply(loaded_from="dram")


class FakeClients(NodeClients):
    """Stubs by node address (`<node>:1`), recording every load and when it was sent."""

    def __init__(self, dead: set[str] | None = None) -> None:
        super().__init__("secret")
        self.dead = dead or set()
        self.loads: list[tuple[str, float]] = []

    def stub(self, address: str) -> Any:
        return Stub(self, address.split(":")[0])


def node_status(**overrides: Any) -> pb.NodeStatus:
    fields: dict[str, Any] = {
        "devices": pb.Devices(cpu=pb.CpuBudget(memory_budget_bytes=8 << 30, slots_total=2))
    }
    return pb.NodeStatus(**(fields | overrides))


def function(tmp_path: Path, **autoscaling: Any) -> FunctionRecord:
    spec = spec_from_dict({"model": SOURCE, "autoscaling": autoscaling})
    return FunctionRecord("f", spec, ModelInfo(SOURCE, tmp_path, 1, "float32", 64), 0.0, 0.0)


def router(clients: FakeClients, clock: Clock, **config: Any) -> Router:
    """A router over three live nodes (ties in placement go to n1, then n2, then n3)."""
    state = ClusterState()
    for node_id in NODES:
        state.nodes[node_id] = NodeState(node_id, f"{node_id}:1", node_status(), 0.0)
    defaults: dict[str, Any] = {"retry_backoff_s": 0.05, "queue_timeout_s": 5.0}
    return Router(
        state, clients, RouterConfig(**(defaults | config)), suspects=Suspects(5.0, clock)
    )


def ready_instance(
    r: Router, fn: FunctionRecord, node_id: str, in_flight: int = 0
) -> InstanceState:
    inst = r.state.new_instance(fn, node_id, "dram", 0.0)
    inst.state, inst.in_flight = InstanceStatus.READY, in_flight
    inst.ready.set_result(None)
    return inst


def test_a_cold_start_avoids_a_suspect_node(tmp_path: Path) -> None:
    async def scenario() -> None:
        clients, clock = FakeClients(), Clock()
        r = router(clients, clock)
        r.suspects.mark("n1", "refused")
        placement = await r.acquire(function(tmp_path))
        assert placement.node_id == "n2" and [n for n, _ in clients.loads] == ["n2"]
        clock.now += 5.0  # suspicion over: the tie goes to n1 again
        placement = await r.acquire(function(tmp_path, target_concurrency=1))
        assert placement.node_id == "n1"

    asyncio.run(scenario())


def test_the_suspects_are_tried_when_every_node_is_suspect(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        clients = FakeClients()
        r = router(clients, Clock())
        for node_id in NODES:
            r.suspects.mark(node_id, "a blip")
        placement = await r.acquire(function(tmp_path), exclude=frozenset({"n1"}))
        assert placement.node_id == "n2", "suspects are tried, the request's exclusions not"

    with caplog.at_level("WARNING", logger="controller.router"):
        asyncio.run(scenario())
    assert any("is suspect (n2, n3); trying them anyway" in r.getMessage() for r in caplog.records)


def test_a_failed_start_moves_on_to_another_node_after_a_pause(tmp_path: Path) -> None:
    """A refused `LoadInstance` excludes its node for the rest of the attempt and makes it
    suspect for every other placement; the next try waits a backoff that doubles."""

    async def scenario() -> None:
        clients, clock = FakeClients(dead={"n1", "n2"}), Clock()
        r = router(clients, clock)
        placement = await r.acquire(function(tmp_path))
        assert placement.node_id == "n3"
        assert [n for n, _ in clients.loads] == ["n1", "n2", "n3"], "each node tried once"
        gaps = [b - a for (_, a), (_, b) in zip(clients.loads, clients.loads[1:], strict=False)]
        assert gaps[0] >= 0.05 and gaps[1] >= 0.1, gaps
        assert r.suspects.current() == {"n1", "n2"}

    asyncio.run(scenario())


def test_failed_starts_are_bounded_and_never_repeat_a_node(tmp_path: Path) -> None:
    async def scenario() -> None:
        clients = FakeClients(dead=set(NODES))
        r = router(clients, Clock())
        with pytest.raises(Overloaded) as refused:
            await r.acquire(function(tmp_path))
        assert refused.value.status == 503
        assert sorted(n for n, _ in clients.loads) == sorted(NODES)
        assert len(clients.loads) <= MAX_PLACEMENT_ATTEMPTS

    asyncio.run(scenario())


def test_a_failed_stream_makes_its_node_suspect_for_routing_too(tmp_path: Path) -> None:
    """`drop_instance` (a stream failed there) marks the node: the warm path leaves its other
    instance alone and `acquire` routes to the busier one on another node."""

    async def scenario() -> None:
        fn = function(tmp_path, target_concurrency=4)
        r = router(FakeClients(), Clock())
        failed = ready_instance(r, fn, "n1", in_flight=1)
        ready_instance(r, fn, "n1")
        elsewhere = ready_instance(r, fn, "n2", in_flight=2)
        r.drop_instance(failed)
        assert "n1" in r.suspects
        assert r.try_route(fn) is None
        assert (await r.acquire(fn)).instance is elsewhere

    asyncio.run(scenario())


def test_an_instance_that_loads_on_a_suspect_node_clears_it(tmp_path: Path) -> None:
    """A start the router did not place (the scaling loop's) proves the node answers."""

    async def scenario() -> None:
        r = router(FakeClients(), Clock())
        r.suspects.mark("n1", "a stream failed")
        inst = r.lifecycle.start_instance(function(tmp_path), "n1", "dram", 0.0)
        await inst.ready
        assert "n1" not in r.suspects

    asyncio.run(scenario())


# ---- a request's own exclusions -----------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    instance_id: str
    node_id: str


class FailingCall:
    """A `Generate` call that emits one token, then fails as a dead node's does."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id

    async def _events(self) -> AsyncIterator[pb.TokenEvent]:
        yield pb.TokenEvent(token_id=self.token_id, has_token=True, text="x")
        raise unavailable("Socket closed")

    def __aiter__(self) -> AsyncIterator[pb.TokenEvent]:
        return self._events()

    def cancel(self) -> bool:
        return True


class FinishingCall(FailingCall):
    async def _events(self) -> AsyncIterator[pb.TokenEvent]:
        yield pb.TokenEvent(
            token_id=self.token_id, has_token=True, text="x", finish_reason=pb.FINISH_REASON_LENGTH
        )


class Host:
    """A `StreamHost` whose calls are scripted per instance."""

    def __init__(self, calls: dict[str, FailingCall]) -> None:
        self.calls = calls

    def start_call(self, instance: Instance, request: RequestState) -> Any:
        return self.calls[instance.instance_id]

    def release(self, instance: Instance) -> None:
        pass

    def drop_instance(self, instance: Instance) -> None:
        pass

    def track(self, request: RequestState) -> None:
        pass

    def untrack(self, request: RequestState) -> None:
        pass

    def spawn(self, coro: Coroutine[Any, Any, None]) -> object:
        return asyncio.ensure_future(coro)

    def start_migrate_call(self, instance: Instance, request: RequestState) -> Any:
        raise AssertionError("nothing migrates here")

    async def stop_after(self, instance: Instance, request: RequestState, outputs: int) -> None:
        raise AssertionError("nothing migrates here")

    def migration_done(self, report: MigrationReport) -> None:
        raise AssertionError("nothing migrates here")


def test_each_resume_avoids_every_node_the_request_failed_on() -> None:
    a, b, c = Instance("i-a", "n1"), Instance("i-b", "n2"), Instance("i-c", "n3")
    host = Host({"i-a": FailingCall(1), "i-b": FailingCall(2), "i-c": FinishingCall(3)})
    asked: list[frozenset[str]] = []
    targets = [b, c]

    async def relocate(exclude: frozenset[str]) -> Instance:
        asked.append(exclude)
        return targets.pop(0)

    async def scenario() -> list[int]:
        params = SamplingParams(max_tokens=3, temperature=0.0, top_p=1.0, seed=7)
        request = RequestState(request_id="r1", function="f", prompt_ids=[1], params=params)
        stream = TokenStream(host, request, a, relocate)
        try:
            return [event.token_id async for event in stream]
        finally:
            await stream.aclose()

    assert asyncio.run(scenario()) == [1, 2, 3]
    assert asked == [{"n1"}, {"n1", "n2"}]
