"""Who moves running requests, and where to: the controller's side of live migration.

`Migrator` picks a destination for a request and starts its `migration.live.LiveMigration`
on the request's `TokenStream`; the stream hands over between two tokens. It serves the admin
API (`stoke migrate`), drain by migration, scale-in, and locality-driven placement, and it
logs and counts every migration (`stoke_migrations_total{reason,outcome}`, the pause and
duration histograms).

Destinations: an existing instance of the same function with a free slot, or a cold start
placed by the locality policy (`Router.acquire`), never on the source's node for a drain or a
preemption; with `to_node`, only on that node. Scale-in only routes to instances that are
already running (starting one to stop another would be no scale-in).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any

from controller.cluster import InstanceStatus
from controller.errors import AdminError, LoadRejected, NoRoom, Overloaded
from controller.make_room import plan_make_room
from controller.metrics import Metrics
from controller.policy import ColdStart, Decision
from controller.registry import FunctionRecord
from controller.router import Router
from controller.state import InstanceState, function_view
from migration.live import MigrationConfig, MigrationReport, Outcome, Reason
from migration.stream import MigrationRefused, NodeFailed, TokenStream

log = logging.getLogger(__name__)

EMPTIED_TIMEOUT_S = 120.0
"""How long a cold start waits for an instance emptied for it to unload."""


class Migrator:
    def __init__(
        self,
        router: Router,
        functions: dict[str, FunctionRecord],
        metrics: Metrics,
        config: MigrationConfig | None = None,
    ) -> None:
        self.router, self.state = router, router.state
        self.functions = functions
        self.metrics = metrics
        self.config = config or MigrationConfig()
        self.recent: deque[MigrationReport] = deque(maxlen=self.RECENT)
        """The last `RECENT` migrations' reports, newest last (for the admin API)."""
        router.on_migration = self.record
        router.make_room = self.make_room

    RECENT = 100
    LOCALITY_MIGRATION_S = 2.0
    """What moving a node's requests away is expected to take, for locality placement."""

    # ---- locality-driven placement ------------------------------------------------------------

    def make_room(
        self, fn: FunctionRecord, decision: Decision, exclude: frozenset[str]
    ) -> tuple[ColdStart, list[Awaitable[None]]] | None:
        """The router's hook: when `controller.make_room` finds a node holding `fn` in DRAM
        that migration can free sooner than `decision` starts it, carry the plan out (move
        the busy instances' requests to their siblings, stop them and the idle ones) and
        return the cold start there with the instances it must wait for."""
        view = self.state.view(exclude)
        alternative = decision.estimate_s if isinstance(decision, ColdStart) else math.inf
        functions = {name: function_view(rec) for name, rec in self.functions.items()}
        queued = self.state.queued.get(fn.name, 0)
        plan = plan_make_room(
            view, function_view(fn, queued), functions, alternative, self.LOCALITY_MIGRATION_S
        )
        if plan is None:
            return None
        after: list[Awaitable[None]] = []
        reason = f"making room for {fn.name} where its checkpoint is in DRAM"
        for victim, destination in plan.migrate.items():
            after.append(self._empty(victim, destination, reason))
        for victim in plan.evict:
            after.append(self._empty(victim, None, reason))
        log.info("%s: starting on %s after moving %s", fn.name, plan.node_id, dict(plan.migrate))
        return ColdStart(plan.node_id, plan.tier, plan.estimate_s), after

    def _empty(self, instance_id: str, destination: str | None, reason: str) -> Awaitable[None]:
        """Stop `instance_id`, moving its requests to `destination`. The awaitable resolves
        once the instance is gone, and raises `NoRoom` if a request could not leave (the
        cold start waiting on it then fails over instead of waiting for that request)."""
        inst = self.state.instances[instance_id]
        self.router.lifecycle.stop_instance(instance_id, reason=reason)
        return self._emptied(inst, self.evacuate(instance_id, Reason.LOCALITY, destination))

    def evacuate(
        self, instance_id: str, reason: Reason, to_instance: str | None = None
    ) -> list[asyncio.Task[MigrationReport | None]]:
        """Move the requests running on a (stopping) instance away: to `to_instance`, or where
        `reason` sends them; migrations still coming into it are aborted. One task per
        request, resolving to its report (None if it could not even begin to move)."""
        self.abort_into(instance_id=instance_id, why=f"{instance_id} is being stopped")
        return [
            self.router.tasks.spawn(self._move(rid, reason, to_instance))
            for rid in self.streams_on(instance_id=instance_id)
        ]

    async def _emptied(
        self, inst: InstanceState, moves: Sequence[Awaitable[MigrationReport | None]]
    ) -> None:
        reports = await asyncio.gather(*moves)
        # Moved, or ended on its own: either way it no longer runs there.
        left = [
            r
            for r in reports
            if r is None or not (r.outcome.handed_over or r.outcome is Outcome.FINISHED)
        ]
        if left:
            raise NoRoom(f"{len(left)} request(s) could not move off {inst.instance_id}")
        try:
            await asyncio.wait_for(asyncio.shield(inst.gone), EMPTIED_TIMEOUT_S)
        except TimeoutError:
            raise NoRoom(
                f"{inst.instance_id} did not unload in {EMPTIED_TIMEOUT_S:.0f} s"
            ) from None

    async def _move(
        self, request_id: str, reason: Reason, to_instance: str | None
    ) -> MigrationReport | None:
        try:
            return await self.migrate_request(request_id, reason, to_instance=to_instance)
        except AdminError as exc:
            log.info("request %s stays (it finishes where it is): %s", request_id, exc)
            return None

    def abort_into(
        self, *, instance_id: str | None = None, node_id: str | None = None, why: str
    ) -> None:
        """Abort migrations (not yet handed over) into an instance or node being emptied."""
        for stream in list(self.router.streams.values()):
            migration = stream.migration
            if migration is None:
                continue
            if (
                migration.destination_instance == instance_id
                or migration.destination_node == node_id
            ):
                migration.abort(Outcome.ABORTED, why)

    # ---- one request ----------------------------------------------------------------------

    async def migrate_request(
        self,
        request_id: str,
        reason: Reason,
        to_node: str | None = None,
        to_instance: str | None = None,
    ) -> MigrationReport:
        """Move one running request; returns its report once it has handed over or aborted.
        Raises AdminError: 404 unknown request or node, 409 not movable now, 503 nowhere."""
        stream = self.router.streams.get(request_id)
        if stream is None:
            raise AdminError(
                404,
                f"no request {request_id!r} is in flight; list running requests with "
                "`stoke requests` (GET /admin/requests).",
                "request_not_found",
            )
        if to_node is not None and to_node not in self.state.nodes:
            raise AdminError(404, f"no node {to_node!r}; list nodes with `stoke nodes`.")
        destination = (
            self._instance_slot(to_instance)
            if to_instance is not None
            else await self._destination(stream, reason, to_node)
        )
        try:
            migration = stream.migrate(destination, reason, self.config)
        except (MigrationRefused, NodeFailed) as exc:
            self.router.release(destination)
            raise AdminError(409, str(exc), "not_migratable") from None
        log.info(
            "migrating request %s from %s to %s (%s)",
            request_id,
            migration.source_node,
            destination.node_id,
            reason.value,
        )
        return await asyncio.shield(migration.done)

    async def _destination(
        self, stream: TokenStream[InstanceState], reason: Reason, to_node: str | None
    ) -> InstanceState:
        source = stream.instance
        fn = self.functions.get(stream.request.function)
        if source is None or fn is None:
            raise AdminError(409, f"request {stream.request.request_id} is not running now")
        if reason is Reason.SCALE_IN:  # only to a running instance: no cold start for it
            warm = self.router.try_route(fn)  # the source is stopping: never routed to
            if warm is None:
                raise AdminError(503, f"no other instance of {fn.name} has a free slot")
            return warm.instance
        if to_node is not None:
            exclude = frozenset(n for n in self.state.nodes if n != to_node)
        elif reason in (Reason.DRAIN, Reason.PREEMPTION, Reason.ADMIN):
            exclude = frozenset({source.node_id})
        else:
            exclude = frozenset()
        try:
            placement = await self.router.acquire(fn, exclude)
        except (Overloaded, LoadRejected) as exc:
            raise AdminError(
                503, f"no destination for the request: {exc}", "no_destination"
            ) from None
        if placement.instance.instance_id == source.instance_id:
            self.router.release(placement.instance)
            raise AdminError(409, "the only place for the request is where it runs already")
        return placement.instance

    def _instance_slot(self, instance_id: str) -> InstanceState:
        """A slot on that (ready, not stopping) instance."""
        inst = self.state.instances.get(instance_id)
        if inst is None or inst.stopping or inst.state != InstanceStatus.READY:
            raise AdminError(409, f"instance {instance_id} cannot take the request now")
        self.state.acquire(inst)
        return inst

    # ---- many requests ----------------------------------------------------------------------

    def streams_on(
        self, *, instance_id: str | None = None, node_id: str | None = None
    ) -> list[str]:
        """Request ids running on an instance, or on a node."""
        return [
            rid
            for rid, stream in self.router.streams.items()
            if stream.instance is not None
            and (instance_id is None or stream.instance.instance_id == instance_id)
            and (node_id is None or stream.instance.node_id == node_id)
        ]

    async def migrate_many(
        self, request_ids: list[str], reason: Reason, to_node: str | None = None
    ) -> list[dict[str, Any]]:
        """Move each request concurrently; one result per request (a report, or its error)."""

        async def one(rid: str) -> dict[str, Any]:
            try:
                return (await self.migrate_request(rid, reason, to_node)).to_json()
            except AdminError as exc:
                return {"request_id": rid, "outcome": "refused", "detail": str(exc)}

        return list(await asyncio.gather(*(one(rid) for rid in request_ids)))

    # ---- accounting -------------------------------------------------------------------------

    def record(self, report: MigrationReport) -> None:
        """Log and count a finished migration (the router's `on_migration`); a destination
        that could not be reached is suspect for placement."""
        if report.destination_unreachable:
            self.router.suspects.mark(
                report.destination_node, f"a migration into it failed: {report.detail}"
            )
        self.metrics.migrations.labels(report.reason.value, report.outcome.value).inc()
        if report.outcome.handed_over:
            self.metrics.migration_seconds.observe(report.duration_s)
            if report.pause_s is not None:
                self.metrics.migration_pause.observe(report.pause_s)
        self.recent.append(report)
        log.info(
            "migration of %s %s -> %s (%s): %s after %d rounds, %.3f s%s%s",
            report.request_id,
            report.source_node,
            report.destination_node,
            report.reason.value,
            report.outcome.value,
            report.rounds,
            report.duration_s,
            "" if report.pause_s is None else f", pause {report.pause_s * 1000:.1f} ms",
            f" ({report.detail})" if report.detail else "",
        )
