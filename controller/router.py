"""The router: finds an instance for each request (warm, or a cold start where the policy says)
and opens its token stream.

`acquire` asks the pure policy (`controller.policy.decide`) on a snapshot of the cluster and
acts on the answer in the same event-loop turn, so two requests never take the same last slot.
A cold start that fails on a node (no room after all: its heartbeat was stale; the node is
unreachable) is retried on another node, after a short backoff, a bounded number of times. A
node whose connection failed (a load, or a request's stream there) is *suspect* for a few
seconds (`controller.suspects`): every placement avoids it unless no other node is left.
`open_stream` starts the node's generation at once and returns a
`migration.stream.TokenStream`, for which the router is the `StreamHost`: it starts the node
calls, gives slots back, and finds another instance when the stream must resume elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, assert_never

from controller.cluster import InstanceStatus
from controller.errors import LoadRejected, Overloaded
from controller.lifecycle import InstanceLifecycle
from controller.nodes import NodeClients
from controller.policy import ColdStart, Decision, Refuse, Route, Wait, decide
from controller.registry import FunctionRecord
from controller.state import ClusterState, InstanceState, function_view
from controller.suspects import Suspects, avoided
from controller.tasks import BackgroundTasks
from migration.live import MigrateCall, MigrationReport
from migration.request import RequestState
from migration.stream import GenerateCall, NodeFailed, TokenStream
from node_agent.proto import node_agent_pb2 as pb

log = logging.getLogger(__name__)

MAX_PLACEMENT_ATTEMPTS = 4
STOP_TIMEOUT_S = 5.0
"""How long asking a source to stop for a hand-over may take (then it is cancelled instead)."""


MakeRoomHook = Callable[
    [FunctionRecord, Decision, frozenset[str]], tuple[ColdStart, list[Awaitable[None]]] | None
]
"""(function, the policy's decision, excluded nodes) -> a cold start and what it waits for."""


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "locality"
    queue_limit: int = 64
    """Requests per function waiting for capacity before new ones get 429."""
    queue_timeout_s: float = 120.0
    """How long a request waits for capacity before it gets 503."""
    load_timeout_s: float = 600.0
    retry_backoff_s: float = 0.1
    """The pause after a failed start before placement decides again; doubles per failure."""
    retry_backoff_max_s: float = 1.0
    """The longest such pause (the attempt's queue deadline bounds them all)."""


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


@dataclass
class _Attempt:
    """One `acquire` call's progress: its deadline, the nodes it avoids, its failed starts and
    whether it holds a place in its function's queue."""

    deadline: float
    excluded: set[str]
    """Nodes this request failed on, and nodes where this attempt failed to start it."""
    failures: int = 0
    queued: bool = False
    trusted_suspects: bool = False
    """Every candidate node was suspect, so this attempt tries them anyway (logged once)."""


class Router:
    def __init__(
        self,
        state: ClusterState,
        clients: NodeClients,
        config: RouterConfig | None = None,
        rng: random.Random | None = None,
        on_cold_start: Callable[[InstanceState], None] | None = None,
        on_migration: Callable[[MigrationReport], None] | None = None,
        suspects: Suspects | None = None,
    ) -> None:
        self.make_room: MakeRoomHook | None = None
        """Asked before a cold start or a wait: a start that migration can make sooner."""
        self.state = state
        self.streams: dict[str, TokenStream[InstanceState]] = {}
        """Every open stream by request id: what a live migration moves."""
        self.on_migration = on_migration
        self.clients = clients
        self.config = config or RouterConfig()
        self.rng = rng or random.Random()
        self.suspects = suspects or Suspects()
        """Nodes whose connection failed in the last few seconds: placement avoids them."""
        self.on_cold_start = on_cold_start
        self.tasks = BackgroundTasks()
        self.lifecycle = InstanceLifecycle(
            state, clients, self.tasks, self.config.load_timeout_s, self._loaded
        )

    def _loaded(self, inst: InstanceState) -> None:
        """An instance this controller started is ready: its node answers, so it is no longer
        suspect (whoever started it, the router or the scaling loop)."""
        self.suspects.clear(inst.node_id, f"{inst.instance_id} loaded there")
        if self.on_cold_start is not None:
            self.on_cold_start(inst)

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
        if inst.state != InstanceStatus.READY or inst.node_id in self.suspects:
            return None  # `acquire` waits for it, or places the request away from the suspect
        self.state.acquire(inst)
        return Placement(inst, False, inst.tier)

    async def acquire(self, fn: FunctionRecord, exclude: frozenset[str] = frozenset()) -> Placement:
        """An instance of `fn` with a slot held for this request (release with `release`),
        not on a node in `exclude`. Raises `Overloaded` when none can be had in time,
        `LoadRejected` when the function cannot start as deployed. Suspect nodes are avoided
        too, unless every node that could take it is suspect."""
        attempt = _Attempt(time.monotonic() + self.config.queue_timeout_s, set(exclude))
        try:
            while True:
                avoid = self._avoided(fn, attempt)
                decision = self._decide(fn, avoid)
                made = self._made_room(fn, decision, avoid)
                if made is not None:
                    if await self._ready(fn, made, attempt):
                        return made
                    await self._back_off(attempt)
                    continue
                match decision:
                    case Route():
                        placement = self._route(decision)
                    case ColdStart():
                        placement = self._cold_start(fn, decision)
                    case Wait():
                        await self._wait(fn, decision, attempt)
                        continue
                    case Refuse():
                        raise Overloaded(
                            503, f"{fn.name}: {decision.reason}", decision.retry_after_s
                        )
                    case _:
                        assert_never(decision)
                if await self._ready(fn, placement, attempt):
                    return placement
                await self._back_off(attempt)
        finally:
            if attempt.queued:
                self.state.queued[fn.name] -= 1

    def share(self, placement: Placement) -> Placement:
        """Another slot on `placement`'s instance, taken whatever the policy says: a sibling
        choice of the same prompt (`n` > 1) runs beside the first, so that the instance
        computes the prompt once. Released with `release`, like any slot."""
        self.state.acquire(placement.instance)
        return Placement(placement.instance, placement.cold_start, placement.expected_tier)

    def release(self, inst: InstanceState) -> None:
        """Give back a request's slot; an instance told to stop unloads once it is idle."""
        self.state.release(inst)
        if inst.stopping and inst.in_flight == 0:
            self.tasks.spawn(self.lifecycle.unload(inst))

    def _avoided(self, fn: FunctionRecord, attempt: _Attempt) -> frozenset[str]:
        """The nodes this decision leaves out: the attempt's exclusions and the suspect nodes,
        or the exclusions alone when no node that could take work would be left."""
        excluded, suspect = frozenset(attempt.excluded), self.suspects.current()
        candidates = [n.node_id for n in self.state.nodes.values() if n.alive and not n.draining]
        avoid = avoided(excluded, suspect, candidates)
        if suspect - excluded and avoid == excluded and not attempt.trusted_suspects:
            attempt.trusted_suspects = True
            log.warning(
                "%s: every node that could take the request is suspect (%s); trying them anyway",
                fn.name,
                ", ".join(sorted(suspect - excluded)),
            )
        return avoid

    def _decide(self, fn: FunctionRecord, avoid: frozenset[str]) -> Decision:
        view = self.state.view(avoid)
        queued = self.state.queued.get(fn.name, 0)
        return decide(view, function_view(fn, queued), self.config.policy, self.rng)

    def _made_room(
        self, fn: FunctionRecord, decision: Decision, avoid: frozenset[str]
    ) -> Placement | None:
        """A cold start on a node where migrating other functions' requests away makes room
        sooner than `decision` (`controller.make_room`), if the hook finds one."""
        if self.make_room is None or isinstance(decision, Route):
            return None
        made = self.make_room(fn, decision, avoid)
        if made is None:
            return None
        start, after = made
        log.info("%s: starting an instance on %s after making room there", fn.name, start.node_id)
        inst = self.lifecycle.start_instance(
            fn, start.node_id, start.tier, start.estimate_s, after=after
        )
        return Placement(inst, True, start.tier)

    def _route(self, route: Route) -> Placement:
        """To an existing instance (a loading one makes the request a cold start too)."""
        inst = self.state.instances[route.instance_id]
        return Placement(inst, inst.state == InstanceStatus.LOADING, inst.tier)

    def _cold_start(self, fn: FunctionRecord, start: ColdStart) -> Placement:
        """Start an instance where the policy says, after stopping the ones it evicts."""
        evictions = [
            self.lifecycle.stop_instance(victim, reason=f"evicted for {fn.name}")
            for victim in start.evict
        ]
        log.info(
            "%s: starting an instance on %s (from %s, ready in ~%.1f s)",
            fn.name,
            start.node_id,
            start.tier,
            start.estimate_s,
        )
        inst = self.lifecycle.start_instance(
            fn,
            start.node_id,
            start.tier,
            start.estimate_s,
            after=[t for t in evictions if t is not None],
        )
        return Placement(inst, True, start.tier)

    async def _wait(self, fn: FunctionRecord, wait: Wait, attempt: _Attempt) -> None:
        """Queue (once; 429 when the queue is full) until something changes, or 503 at the
        deadline."""
        if not attempt.queued:
            if self.state.queued.get(fn.name, 0) >= self.config.queue_limit:
                raise Overloaded(
                    429,
                    f"{fn.name}: {wait.reason}, and "
                    f"{self.config.queue_limit} requests already wait; retry later",
                    1.0,
                )
            self.state.queued[fn.name] = self.state.queued.get(fn.name, 0) + 1
            attempt.queued = True
        left = attempt.deadline - time.monotonic()
        if left <= 0:
            raise Overloaded(
                503,
                f"{fn.name}: {wait.reason}; waited "
                f"{self.config.queue_timeout_s:.0f} s for capacity",
                5.0,
            )
        await self.state.changed(min(left, 1.0))

    async def _ready(self, fn: FunctionRecord, placement: Placement, attempt: _Attempt) -> bool:
        """Hold a slot on the placement's instance and wait for it to load. False (the slot
        given back, the failure counted, the node excluded from this attempt and, when it could
        not be reached, suspect) when the load failed and placement should decide again;
        raises when it should not."""
        inst = placement.instance
        self.state.acquire(inst)
        try:
            await asyncio.shield(inst.ready)
        except asyncio.CancelledError:
            self.release(inst)
            raise
        except Exception as exc:
            self.release(inst)
            attempt.failures += 1
            log.warning(
                "%s on %s failed to start (failure %d of at most %d): %s",
                fn.name,
                inst.node_id,
                attempt.failures,
                MAX_PLACEMENT_ATTEMPTS,
                exc,
            )
            if isinstance(exc, LoadRejected):
                raise  # the same model and options fail the same way on any node
            attempt.excluded.add(inst.node_id)  # the next try goes to another node
            if isinstance(exc, ConnectionError):  # the node failed (`lifecycle._load_error`)
                self.suspects.mark(inst.node_id, f"starting {fn.name} there failed: {exc}")
            if attempt.failures >= MAX_PLACEMENT_ATTEMPTS:
                raise Overloaded(
                    503, f"{fn.name}: could not start an instance: {exc}", 5.0
                ) from None
            return False
        return True

    async def _back_off(self, attempt: _Attempt) -> None:
        """Pause after the attempt's latest failed start (doubling per failure, capped, never
        past its deadline), so that retries do not follow each other within a millisecond."""
        pause = self.config.retry_backoff_s * 2 ** max(attempt.failures - 1, 0)
        left = attempt.deadline - time.monotonic()
        await asyncio.sleep(max(0.0, min(pause, self.config.retry_backoff_max_s, left)))

    # ---- streams (`migration.stream.StreamHost`) -----------------------------------------

    def open_stream(
        self, fn: FunctionRecord, request: RequestState, placement: Placement
    ) -> TokenStream[InstanceState]:
        """Start generating `request` on `placement` now (the node works while the caller sets
        up its response) and return the stream of its token events. The stream owns the slot
        `placement` holds; `TokenStream.aclose` gives it back."""

        async def relocate(exclude: frozenset[str]) -> InstanceState:
            return (await self.acquire(fn, exclude)).instance

        stream = TokenStream(self, request, placement.instance, relocate)
        self.streams[request.request_id] = stream
        return stream

    def start_call(self, instance: InstanceState, request: RequestState) -> GenerateCall:
        """Send Generate for `request` to `instance`'s node (resuming after its output ids)."""
        node = self.state.nodes.get(instance.node_id)
        if node is None:
            raise NodeFailed(f"node {instance.node_id} unknown")
        stub = self.clients.stub(node.address)
        return stub.Generate(request.generate_request(instance.instance_id))

    def drop_instance(self, instance: InstanceState) -> None:
        """A request's stream on `instance` failed (`NodeFailed`): out of routing now, and its
        node suspect for a few seconds. One the node still runs comes back through adoption
        at its next heartbeat."""
        self.suspects.mark(instance.node_id, f"a request's stream on {instance.instance_id} failed")
        self.state.drop_instance(instance.instance_id)

    def track(self, request: RequestState) -> None:
        self.state.requests[request.request_id] = request

    def untrack(self, request: RequestState) -> None:
        self.state.requests.pop(request.request_id, None)
        self.streams.pop(request.request_id, None)

    def start_migrate_call(self, instance: InstanceState, request: RequestState) -> MigrateCall:
        """Open a `Migrate` call to `instance`'s node (the migration sends its rounds)."""
        node = self.state.nodes.get(instance.node_id)
        if node is None:
            raise NodeFailed(f"node {instance.node_id} unknown")
        return self.clients.stub(node.address).Migrate()

    async def stop_after(
        self, instance: InstanceState, request: RequestState, outputs: int
    ) -> None:
        """Ask `instance`'s node to stop `request` after `outputs` output tokens (a hand-over)."""
        node = self.state.nodes.get(instance.node_id)
        if node is None:
            raise NodeFailed(f"node {instance.node_id} unknown")
        await self.clients.stub(node.address).Cancel(
            pb.CancelRequest(
                instance_id=instance.instance_id,
                request_id=request.request_id,
                after_outputs=outputs,
            ),
            timeout=STOP_TIMEOUT_S,
        )

    def migration_done(self, report: MigrationReport) -> None:
        if self.on_migration is not None:
            self.on_migration(report)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self.tasks.spawn(coro)

    async def close(self) -> None:
        await self.tasks.close()


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
