"""A node that will be taken back (a spot notice, an orchestrator's SIGTERM): move its work off
before the deadline.

A node's watcher reports the notice at once (`Preempting` RPC; its heartbeats carry it too, so
a notice the RPC missed, or one a restarted controller never heard, still arrives). From then
on the node takes no new instances or requests (`NodeState.draining`), migrations into it are
aborted, and its instances are told to stop (each unloads once its requests have left). A drain
task then re-plans every `TICK_S` with `spot.plan.plan_drain` (a pure function): requests that
will finish with time to spare stay, the others move by live migration (reason `preemption`),
the longest move first, `max_concurrent` at a time, all meant to be handed over a margin before
the deadline. At the deadline the node is taken for gone: its remaining instances are dropped
(any request still there resumes elsewhere from its tokens) and its cached holdings are
forgotten, so placement no longer counts on them. An advisory notice (AWS's rebalance
recommendation) is logged and counted only.

Replacement capacity is asked of a `CapacityProvider` (the autoscaler's providers plug in here;
without one configured the request is logged).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from controller.lifecycle import InstanceLifecycle
from controller.metrics import Metrics
from controller.migrations import Migrator
from controller.state import ClusterState, NodeState
from controller.tasks import BackgroundTasks
from migration.live import MigrationReport, Reason
from node_agent.proto import node_agent_pb2 as pb
from spot.plan import DrainPlan, Running, plan_drain

log = logging.getLogger(__name__)

TICK_S = 0.5
"""How often a drain re-plans (and notices requests that finished or moves that ended)."""
RETRY_S = (0.5, 2.0)
"""A request whose move did not hand over is tried again after this long, doubling, capped."""
DEFAULT_PREFILL_TOKENS_PER_S = 300.0
"""The destination's prefill rate before any migration has been measured (the `small` demo
model on one CPU thread re-prefills 1800 tokens in ~5 s)."""
ADVISORY = frozenset({"rebalance"})


class CapacityProvider(Protocol):
    """Where replacement capacity comes from (the autoscaler's node providers)."""

    async def replace(self, node_id: str, why: str) -> None: ...


@dataclass
class _Drain:
    node_id: str
    notice: pb.Preemption
    deadline: float
    """Controller clock (monotonic) when the node goes."""
    moving: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    retry_at: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Request id -> (monotonic time it may be tried again, the wait after that)."""
    task: asyncio.Task[None] | None = None


class Preemptions:
    def __init__(
        self,
        state: ClusterState,
        lifecycle: InstanceLifecycle,
        migrator: Migrator,
        metrics: Metrics,
        tasks: BackgroundTasks,
        *,
        margin_s: float,
        max_concurrent: int,
        capacity: CapacityProvider | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state, self.lifecycle, self.migrator = state, lifecycle, migrator
        self.metrics, self.tasks = metrics, tasks
        self.margin_s, self.max_concurrent = margin_s, max_concurrent
        self.capacity = capacity
        self.clock = clock
        self.drains: dict[str, _Drain] = {}

    def notice(self, node_id: str, notice: pb.Preemption) -> tuple[float, int]:
        """Take a node's notice (again is a no-op): start draining it. Returns when the
        controller means to have it empty (unix time; 0 for an advisory notice) and how many
        running requests are to move or finish."""
        node = self.state.nodes.get(node_id)
        if node is None:
            raise KeyError(node_id)
        running = len(self.migrator.streams_on(node_id=node_id))
        if notice.kind in ADVISORY or notice.deadline_unix <= 0:
            if node.preemption is None or node.preemption.kind != notice.kind:
                log.warning(
                    "node %s: %s %s notice (advisory: nothing moves): %s",
                    node_id,
                    notice.source,
                    notice.kind,
                    notice.detail,
                )
                self.metrics.preemptions.labels(notice.source or "?", notice.kind or "?").inc()
                node.preemption = notice
            return 0.0, running
        drain = self.drains.get(node_id)
        if drain is not None and drain.notice.deadline_unix == notice.deadline_unix:
            if notice.drained and not drain.notice.drained:
                log.info("node %s reports it is drained", node_id)
            node.preemption = drain.notice = notice  # the same notice, maybe drained now
            return notice.deadline_unix - self.margin_s, running
        seconds_left = notice.deadline_unix - self.clock()
        deadline = time.monotonic() + seconds_left
        node.preemption = notice
        self.metrics.preemptions.labels(notice.source or "?", notice.kind).inc()
        log.warning(
            "node %s will be taken back in %.0f s (%s %s: %s): draining it, %d request(s) "
            "running there",
            node_id,
            seconds_left,
            notice.source,
            notice.kind,
            notice.detail,
            running,
        )
        if drain is not None:  # a new deadline for a drain under way
            drain.notice, drain.deadline = notice, deadline
            return notice.deadline_unix - self.margin_s, running
        drain = _Drain(node_id, notice, deadline)
        self.drains[node_id] = drain
        for inst in [i for i in self.state.instances.values() if i.node_id == node_id]:
            self.lifecycle.stop_instance(inst.instance_id, reason=f"{node_id} is preempted")
        self.migrator.abort_into(node_id=node_id, why=f"{node_id} is preempted")
        self.state.notify()
        drain.task = self.tasks.spawn(self._drain(drain))
        if self.capacity is not None:
            self.tasks.spawn(self.capacity.replace(node_id, f"{notice.source} {notice.kind}"))
        else:
            log.info("node %s: no capacity provider configured to replace it", node_id)
        return notice.deadline_unix - self.margin_s, running

    # ---- the drain ------------------------------------------------------------------------

    async def _drain(self, drain: _Drain) -> None:
        node_id = drain.node_id
        while time.monotonic() < drain.deadline:
            running = self.migrator.streams_on(node_id=node_id)
            for rid in list(drain.moving):
                if drain.moving[rid].done():
                    del drain.moving[rid]
            if not running and not drain.moving:
                log.info(
                    "node %s is empty %.1f s before its deadline",
                    node_id,
                    drain.deadline - time.monotonic(),
                )
                break
            plan = self._plan(drain, running)
            self._start_moves(drain, plan)
            await asyncio.sleep(TICK_S)
        await self._at_deadline(drain)

    def _plan(self, drain: _Drain, running: list[str]) -> DrainPlan:
        now = time.monotonic()
        requests = []
        for rid in running:
            stream = self.migrator.router.streams.get(rid)
            if stream is None:
                continue
            req = stream.request
            outputs = len(req.output_ids)
            elapsed = max(now - req.started_at, 1e-3)
            requests.append(
                Running(
                    rid,
                    context_tokens=len(req.prompt_ids) + outputs,
                    tokens_left=max(req.params.max_tokens - outputs, 0),
                    decode_tokens_per_s=max(outputs / elapsed, 1.0),
                    moving=rid in drain.moving or stream.migration is not None,
                )
            )
        return plan_drain(
            requests,
            drain.deadline - now,
            margin_s=self.margin_s,
            prefill_tokens_per_s=self.prefill_rate(),
            max_concurrent=self.max_concurrent,
        )

    def prefill_rate(self) -> float:
        """Tokens per second a destination takes a request over at: measured from the recent
        completed migrations (context / whole migration time, the median), else a default."""
        rates = sorted(
            r.context_tokens / r.duration_s
            for r in self.migrator.recent
            if r.outcome.handed_over and r.duration_s > 0
        )
        return rates[len(rates) // 2] if rates else DEFAULT_PREFILL_TOKENS_PER_S

    def _start_moves(self, drain: _Drain, plan: DrainPlan) -> None:
        now = time.monotonic()
        for move in plan.moves:
            if len(drain.moving) >= self.max_concurrent:
                return
            if drain.retry_at.get(move.request_id, (0.0, 0.0))[0] > now:
                continue  # its last move failed just now
            log.info(
                "node %s: moving request %s (est. %.1f s%s, %.1f s to the deadline)",
                drain.node_id,
                move.request_id,
                move.estimate_s,
                ", late" if move.late else "",
                drain.deadline - time.monotonic(),
            )
            drain.moving[move.request_id] = self.tasks.spawn(self._move(drain, move.request_id))

    async def _move(self, drain: _Drain, request_id: str) -> None:
        try:
            report: MigrationReport | None = await self.migrator.migrate_request(
                request_id, Reason.PREEMPTION
            )
        except Exception as exc:  # AdminError: not movable now, or nowhere to go
            log.warning("node %s: request %s could not move: %s", drain.node_id, request_id, exc)
            report = None
        outcome = "refused" if report is None else report.outcome.value
        self.metrics.preemption_requests.labels(outcome).inc()
        if report is None or not report.outcome.handed_over:
            wait = drain.retry_at.get(request_id, (0.0, RETRY_S[0] / 2))[1] * 2
            wait = min(wait, RETRY_S[1])
            drain.retry_at[request_id] = (time.monotonic() + wait, wait)

    async def _at_deadline(self, drain: _Drain) -> None:
        """Wait for the deadline, then take the node for gone and forget what it holds."""
        left = drain.deadline - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)
        node = self.state.nodes.get(drain.node_id)
        if node is None or self.drains.get(drain.node_id) is not drain:
            return
        still = self.migrator.streams_on(node_id=drain.node_id)
        if still:
            log.warning(
                "node %s reached its deadline with %d request(s) still there: they resume "
                "elsewhere from their tokens",
                drain.node_id,
                len(still),
            )
        self._forget(node)

    def _forget(self, node: NodeState) -> None:
        node.alive = False
        node.status.ClearField("tiers")
        for inst in [i for i in self.state.instances.values() if i.node_id == node.node_id]:
            self.state.drop_instance(
                inst.instance_id, ConnectionError(f"node {node.node_id} was preempted")
            )
        self.state.notify()

    def back(self, node: NodeState) -> None:
        """A node that was preempted registered again (a new machine under the same id, or
        the notice was withdrawn): it is an ordinary node again."""
        drain = self.drains.pop(node.node_id, None)
        if drain is not None and drain.task is not None:
            drain.task.cancel()
        node.preemption = None
