"""The router: finds an instance for each request (warm, or a cold start where the policy says),
streams its tokens from the node, and keeps its token-level state.

`acquire` asks the pure policy (`controller.policy.decide`) on a snapshot of the cluster and
acts on the answer in the same event-loop turn, so two requests never take the same last slot.
A cold start that a node refuses (no room after all: its heartbeat was stale) is retried on
another node. `open_stream` starts the node's generation at once and returns a `TokenStream`,
which records every emitted token id; when the node fails mid-stream (it died, its instance was
killed), the request resumes on another instance from that state, so the client's stream
continues without a lost or repeated token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from controller.nodes import NodeClients
from controller.policy import ColdStart, Refuse, Route, Wait, decide
from controller.registry import FunctionRecord
from controller.state import (
    LOADING,
    READY,
    ClusterState,
    InstanceState,
    RequestState,
    function_view,
)
from node_agent.proto import node_agent_pb2 as pb

log = logging.getLogger(__name__)

MAX_PLACEMENT_ATTEMPTS = 4
MAX_RESUMES = 2
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED)


class Overloaded(Exception):
    """No capacity now: 429 (queue full) or 503 (nothing can take it), with a retry hint."""

    def __init__(self, status: int, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class LoadRejected(Exception):
    """A node refused to load the function as deployed (its engine options cannot work, say);
    retrying elsewhere would not help: the function needs redeploying."""


class UpstreamError(Exception):
    """A node failed the request in a way that resuming cannot fix."""


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "locality"
    queue_limit: int = 64
    """Requests per function waiting for capacity before new ones get 429."""
    queue_timeout_s: float = 120.0
    """How long a request waits for capacity before it gets 503."""
    load_timeout_s: float = 600.0


@dataclass
class Placement:
    """Where a request runs, and what it cost to get there."""

    instance: InstanceState
    cold_start: bool
    expected_tier: str
    """The tier the policy chose the node for (a guess from the last heartbeat)."""

    @property
    def node_id(self) -> str:
        return self.instance.node_id

    @property
    def tier(self) -> str:
        """Where the instance was loaded from, as its node reported it (warm requests too);
        the policy's expectation only for a node too old to say."""
        return self.instance.loaded_from or self.expected_tier

    @property
    def load_ms(self) -> float:
        return self.instance.load_ms if self.cold_start else 0.0


class Router:
    def __init__(
        self,
        state: ClusterState,
        clients: NodeClients,
        config: RouterConfig | None = None,
        rng: random.Random | None = None,
        on_cold_start: Callable[[InstanceState], None] | None = None,
    ) -> None:
        self.state = state
        self.clients = clients
        self.config = config or RouterConfig()
        self.rng = rng or random.Random()
        self.on_cold_start = on_cold_start
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- placement -----------------------------------------------------------------------

    def try_route(self, fn: FunctionRecord) -> Placement | None:
        """A slot on a ready instance of `fn` if the policy routes there right now, taken
        without waiting (the warm path needs no task); None when `acquire` must decide."""
        if self.state.queued.get(fn.name, 0):
            return None  # others already wait for capacity: queue behind them
        view = self.state.routing_view(fn.name)
        decision = decide(view, function_view(fn, 0), self.config.policy, self.rng)
        if not isinstance(decision, Route):
            return None
        inst = self.state.instances[decision.instance_id]
        if inst.state != READY:
            return None
        self.state.acquire(inst)
        return Placement(inst, False, inst.tier)

    async def acquire(self, fn: FunctionRecord, exclude: frozenset[str] = frozenset()) -> Placement:
        """An instance of `fn` with a slot held for this request (release with `release`)."""
        deadline = time.monotonic() + self.config.queue_timeout_s
        excluded = set(exclude)
        failures = 0
        queued = False
        try:
            while True:
                view = self.state.view(frozenset(excluded))
                decision = decide(
                    view,
                    function_view(fn, self.state.queued.get(fn.name, 0)),
                    self.config.policy,
                    self.rng,
                )
                if isinstance(decision, Route):
                    inst = self.state.instances[decision.instance_id]
                    cold, tier = inst.state == LOADING, inst.tier
                elif isinstance(decision, ColdStart):
                    evictions = [
                        self.stop_instance(victim, reason=f"evicted for {fn.name}")
                        for victim in decision.evict
                    ]
                    inst = self.start_instance(
                        fn,
                        decision.node_id,
                        decision.tier,
                        decision.estimate_s,
                        after=[t for t in evictions if t is not None],
                    )
                    cold, tier = True, decision.tier
                elif isinstance(decision, Wait):
                    if not queued:
                        if self.state.queued.get(fn.name, 0) >= self.config.queue_limit:
                            raise Overloaded(
                                429,
                                f"{fn.name}: {decision.reason}, and "
                                f"{self.config.queue_limit} requests already wait; retry later",
                                1.0,
                            )
                        self.state.queued[fn.name] = self.state.queued.get(fn.name, 0) + 1
                        queued = True
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Overloaded(
                            503,
                            f"{fn.name}: {decision.reason}; waited "
                            f"{self.config.queue_timeout_s:.0f} s for capacity",
                            5.0,
                        )
                    await self.state.changed(min(left, 1.0))
                    continue
                else:
                    assert isinstance(decision, Refuse)
                    raise Overloaded(503, f"{fn.name}: {decision.reason}", decision.retry_after_s)
                self.state.acquire(inst)
                try:
                    await asyncio.shield(inst.ready)
                except asyncio.CancelledError:
                    self.release(inst)
                    raise
                except Exception as exc:
                    self.release(inst)
                    failures += 1
                    log.warning("%s on %s failed to start: %s", fn.name, inst.node_id, exc)
                    if isinstance(exc, LoadRejected):
                        raise  # the same model and options fail the same way on any node
                    if isinstance(exc, _NoRoom):
                        excluded.add(inst.node_id)
                    if failures >= MAX_PLACEMENT_ATTEMPTS:
                        raise Overloaded(
                            503, f"{fn.name}: could not start an instance: {exc}", 5.0
                        ) from None
                    continue
                return Placement(inst, cold, tier)
        finally:
            if queued:
                self.state.queued[fn.name] -= 1

    def release(self, inst: InstanceState) -> None:
        """Give back a request's slot; an instance told to stop unloads once it is idle."""
        self.state.release(inst)
        if inst.stopping and inst.in_flight == 0:
            self._spawn(self._unload(inst))

    # ---- instance lifecycle --------------------------------------------------------------

    def start_instance(
        self,
        fn: FunctionRecord,
        node_id: str,
        tier: str,
        estimate_s: float,
        after: list[asyncio.Task[None]] | None = None,
    ) -> InstanceState:
        """Record a loading instance and load it on `node_id` in the background, once the
        unloads in `after` (evictions making room for it) are done."""
        inst = self.state.new_instance(fn, node_id, tier, estimate_s)
        self._spawn(self._load(inst, fn, after or []))
        return inst

    def stop_instance(self, instance_id: str, reason: str) -> asyncio.Task[None] | None:
        """Stop routing to it; unload it now if idle, else when its last request ends.
        Returns the unload task when it starts now."""
        inst = self.state.instances.get(instance_id)
        if inst is None or inst.stopping:
            return None
        inst.stopping = True
        log.info("stopping %s on %s: %s", instance_id, inst.node_id, reason)
        self.state.notify()
        if inst.in_flight == 0 and inst.state == READY:
            return self._spawn(self._unload(inst))
        return None

    async def _load(
        self, inst: InstanceState, fn: FunctionRecord, after: list[asyncio.Task[None]]
    ) -> None:
        if after:
            await asyncio.gather(*after, return_exceptions=True)
        node = self.state.nodes.get(inst.node_id)
        if node is None:
            self.state.drop_instance(
                inst.instance_id, ConnectionError(f"node {inst.node_id} unknown")
            )
            return
        engine = fn.spec.engine
        request = pb.LoadInstanceRequest(
            instance_id=inst.instance_id,
            source=fn.model.source,
            tier=_load_tier(node.status, fn.model.checkpoint_bytes),
            engine=pb.EngineOptions(
                kv_cache_bytes=engine.kv_cache_bytes or 0,
                max_batch_size=engine.max_batch_size or 0,
                max_model_len=fn.context_length,
            ),
        )
        try:
            reply = await self.clients.stub(node.address).LoadInstance(
                request, timeout=self.config.load_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            error: Exception
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                error = _NoRoom(exc.details() or "no room")
            elif exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                error = LoadRejected(exc.details() or "the node refused to load it")
            else:
                error = ConnectionError(f"{exc.code().name}: {exc.details()}")
            self.state.drop_instance(inst.instance_id, error)
            return
        inst.state = READY
        inst.loaded_from = reply.loaded_from
        inst.reserved_bytes = reply.reserved_bytes or inst.reserved_bytes
        inst.load_ms = reply.timings.total_s * 1000
        if inst.in_flight == 0:
            inst.idle_since = time.monotonic()
        if not inst.ready.done():
            inst.ready.set_result(None)
        if self.on_cold_start is not None:
            self.on_cold_start(inst)
        self.state.notify()
        if inst.instance_id not in self.state.instances or (inst.stopping and inst.in_flight == 0):
            await self._unload(inst)

    async def _unload(self, inst: InstanceState) -> None:
        """Unload on the node; until it is done the instance (marked stopping, so it takes no
        requests) still counts against the node's memory and slots."""
        inst.stopping = True
        node = self.state.nodes.get(inst.node_id)
        try:
            if node is not None and node.alive:
                await self.clients.stub(node.address).UnloadInstance(
                    pb.UnloadInstanceRequest(instance_id=inst.instance_id), timeout=60
                )
                self.state.unloaded[inst.instance_id] = inst.node_id
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                self.state.unloaded[inst.instance_id] = inst.node_id
            else:
                log.warning("unload %s on %s: %s", inst.instance_id, inst.node_id, exc.details())
        finally:
            self.state.drop_instance(inst.instance_id)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- generation ----------------------------------------------------------------------

    def open_stream(
        self, fn: FunctionRecord, request: RequestState, placement: Placement
    ) -> TokenStream:
        """Start generating `request` on `placement` now (the node works while the caller sets
        up its response) and return the stream of its token events. The stream owns the slot
        `placement` holds; `TokenStream.aclose` gives it back."""
        return TokenStream(self, fn, request, placement.instance)

    def _start_call(
        self, inst: InstanceState, request: RequestState
    ) -> grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.TokenEvent]:
        """Send Generate for `request` to `inst`'s node (resuming after `request.output_ids`)."""
        node = self.state.nodes.get(inst.node_id)
        if node is None:
            raise _NodeFailed(f"node {inst.node_id} unknown")
        params = request.params
        return self.clients.stub(node.address).Generate(
            pb.GenerateRequest(
                instance_id=inst.instance_id,
                request_id=request.request_id,
                prompt_ids=request.prompt_ids,
                output_ids=request.output_ids,
                params=pb.SamplingParams(
                    max_tokens=params["max_tokens"],
                    temperature=params["temperature"],
                    top_p=params["top_p"],
                    seed=params["seed"],
                    stop=params["stop"],
                ),
            )
        )


class TokenStream:
    """One request's token events, resumed on another instance if its node fails mid-stream
    (up to `MAX_RESUMES` times, from the recorded `output_ids`).

    The node call starts when the stream is made, not when it is first iterated; the stream
    holds the request's slot and its call until the events end or `aclose` is called, which
    the owner must do whether it iterated or not (idempotent)."""

    def __init__(
        self, router: Router, fn: FunctionRecord, request: RequestState, inst: InstanceState
    ) -> None:
        self._router, self._fn, self._request = router, fn, request
        self._current: InstanceState | None = inst
        self._call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.TokenEvent] | None = None
        router.state.requests[request.request_id] = request
        request.instance_id, request.node_id = inst.instance_id, inst.node_id
        try:
            self._call = router._start_call(inst, request)
        except _NodeFailed:
            pass  # the first iteration meets it again, and resumes elsewhere
        except BaseException:
            self._finish()  # no stream for the caller to close: give the slot back now
            raise
        self._events = self._run()

    def __aiter__(self) -> AsyncGenerator[pb.TokenEvent, None]:
        return self._events

    async def aclose(self) -> None:
        """Stop: cancel the node's generation if it is still going, give the slot back."""
        await self._events.aclose()
        self._finish()  # the events never started: their `finally` did not run

    def close_soon(self) -> None:
        """`aclose` in a task of the router's own (from a callback, where nothing can await)."""
        self._router._spawn(self.aclose())

    def _finish(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._current is not None:
            self._router.release(self._current)
            self._current = None
        self._router.state.requests.pop(self._request.request_id, None)

    async def _run(self) -> AsyncGenerator[pb.TokenEvent, None]:
        router, request = self._router, self._request
        resumes = 0
        try:
            while True:
                assert self._current is not None
                current = self._current
                request.instance_id, request.node_id = current.instance_id, current.node_id
                try:
                    call, self._call = self._call or router._start_call(current, request), None
                    async with contextlib.aclosing(_node_stream(call, current, request)) as events:
                        async for event in events:
                            yield event
                    return
                except _NodeFailed as exc:
                    resumes += 1
                    if resumes > MAX_RESUMES:
                        raise UpstreamError(str(exc)) from None
                    log.warning(
                        "request %s lost %s (%s); resuming after %d tokens",
                        request.request_id,
                        current.node_id,
                        exc,
                        len(request.output_ids),
                    )
                    self._current = None
                    router.release(current)
                    # It failed mid-stream: take it out of routing now rather than at the next
                    # heartbeat (one the node still runs comes back through adoption).
                    router.state.drop_instance(current.instance_id)
                    exclude = frozenset({current.node_id})
                    self._current = (await router.acquire(self._fn, exclude)).instance
        finally:
            self._finish()


async def _node_stream(
    call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.TokenEvent],
    inst: InstanceState,
    request: RequestState,
) -> AsyncGenerator[pb.TokenEvent, None]:
    """`call`'s events, each token recorded in `request`; a node failure as `_NodeFailed`."""
    finished = False
    try:
        async for event in call:
            if event.has_token:
                request.output_ids.append(event.token_id)
            if event.finish_reason == pb.FINISH_REASON_ABORT and not event.has_token:
                raise _NodeFailed(event.error or "aborted on the node")
            if event.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                finished = True
            yield event
            if finished:
                return
    except grpc.aio.AioRpcError as exc:
        if exc.code() in _RESUMABLE:
            raise _NodeFailed(f"{exc.code().name}: {exc.details()}") from None
        raise UpstreamError(f"node {inst.node_id}: {exc.code().name}: {exc.details()}") from None
    finally:
        if not finished:
            call.cancel()
    if not finished:
        raise _NodeFailed("the stream ended without a finish reason")


class _NoRoom(Exception):
    pass


class _NodeFailed(Exception):
    pass


def _load_tier(status: pb.NodeStatus, nbytes: int) -> str:
    """DRAM when the checkpoint fits the node's DRAM tier, else disk."""
    for tier in status.tiers:
        if tier.tier == "dram":
            return "dram" if nbytes <= tier.budget_bytes else "disk"
    return "dram"


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
