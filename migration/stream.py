"""One request's token stream from the node running it, which survives that node.

`TokenStream` holds the request's *current call* (a node's `Generate` stream) on its *current
instance*, records every token in the request's `RequestState`, and when the call fails in a
way another node can fix (the node died, its instance was killed) moves the request to another
instance, which resumes after the recorded `output_ids`: the client's stream goes on without a
lost or repeated token.

The stream does not place requests itself: whoever does (the controller's router) implements
`StreamHost` and hands the stream a `relocate` callable that finds another instance. This
package sits below the controller and never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Generic, Protocol, TypeAlias, TypeVar

import grpc

from migration.live import (
    LiveMigration,
    MigrateCall,
    MigrationConfig,
    MigrationReport,
    Outcome,
    Phase,
    Reason,
)
from migration.request import RequestState
from node_agent.proto import node_agent_pb2 as pb

log = logging.getLogger(__name__)

MAX_RESUMES = 2
"""How many times one request may move to another instance after a failure."""
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED)

GenerateCall: TypeAlias = grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.TokenEvent]


class TokenCall(Protocol):
    """A node call carrying a request's token events: a `Generate` call, or a committed
    migration's destination."""

    def __aiter__(self) -> AsyncIterator[pb.TokenEvent]: ...

    def cancel(self) -> bool: ...


class MigrationRefused(Exception):
    """A migration cannot begin: the request is not running, is finishing, or already moves."""


class NodeFailed(Exception):
    """The current call failed in a way another instance can fix: the request resumes there."""


class UpstreamError(Exception):
    """A node failed the request in a way that resuming cannot fix."""


class InstanceRef(Protocol):
    """The instance a stream runs on, as far as the stream needs to know it."""

    @property
    def instance_id(self) -> str: ...

    @property
    def node_id(self) -> str: ...


InstanceT = TypeVar("InstanceT", bound=InstanceRef)
InstanceT_contra = TypeVar("InstanceT_contra", bound=InstanceRef, contravariant=True)


class StreamHost(Protocol[InstanceT_contra]):
    """What a `TokenStream` needs from whoever places requests on instances. Every method but
    `stop_after` is called on the event loop and returns at once (no awaiting), so the host's
    bookkeeping stays atomic."""

    def start_call(self, instance: InstanceT_contra, request: RequestState) -> GenerateCall:
        """Send `Generate` for `request` to `instance`'s node, resuming after
        `request.output_ids`; the call's events are not awaited yet. Raises `NodeFailed` when
        the node cannot be reached at all (the stream then resumes elsewhere)."""
        ...

    def release(self, instance: InstanceT_contra) -> None:
        """Give back the slot the request held on `instance` (once per instance it ran on)."""
        ...

    def drop_instance(self, instance: InstanceT_contra) -> None:
        """`instance` failed mid-stream: take it out of routing now rather than at its node's
        next heartbeat."""
        ...

    def track(self, request: RequestState) -> None:
        """`request` is in flight (its stream exists); called once, first."""
        ...

    def untrack(self, request: RequestState) -> None:
        """`request` is no longer in flight; called at least once, last (idempotent)."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> object:
        """Run `coro` in a task the host owns (and cancels when it closes)."""
        ...

    def start_migrate_call(self, instance: InstanceT_contra, request: RequestState) -> MigrateCall:
        """Open a `Migrate` call to `instance`'s node for `request` (nothing sent yet)."""
        ...

    async def stop_after(
        self, instance: InstanceT_contra, request: RequestState, outputs: int
    ) -> None:
        """Ask `instance`'s node to stop `request` once it has emitted `outputs` output tokens
        (`CancelRequest.after_outputs`): its call then ends with that token, finished
        `HANDED_OVER`. Raises if the node could not be asked (the stream copes either way)."""
        ...

    def migration_done(self, report: MigrationReport) -> None:
        """A migration of a stream's request ended (`report.outcome` says how): log and count
        it. For a hand-over, called once the destination's first token is through."""
        ...


Relocate: TypeAlias = Callable[[frozenset[str]], Awaitable[InstanceT]]
"""Another instance for the request, not on the given nodes (every node the request failed
on so far), with a slot held for it (the stream releases it). Raises what placement raises
when there is none."""


class TokenStream(Generic[InstanceT]):
    """One request's token events, resumed on another instance if its node fails mid-stream
    (up to `MAX_RESUMES` times, from the recorded `output_ids`).

    The node call starts when the stream is made, not when it is first iterated; the stream
    holds the request's slot and its call until the events end or `aclose` is called, which
    the owner must do whether it iterated or not (idempotent)."""

    def __init__(
        self,
        host: StreamHost[InstanceT],
        request: RequestState,
        instance: InstanceT,
        relocate: Relocate[InstanceT],
    ) -> None:
        self._host, self._request, self._relocate = host, request, relocate
        self._current: InstanceT | None = instance
        """The instance the request runs on now (its slot held); None once released."""
        self._call: TokenCall | None = None
        """The call on `_current` now; None before it starts and once it ended."""
        self._migration: LiveMigration | None = None
        self._destination: InstanceT | None = None
        """A live migration under way, and the instance it moves to (its slot held)."""
        self._handed_over: tuple[MigrationReport, float] | None = None
        """A hand-over whose destination has not yet sent a token (report, when)."""
        self._stop_at: int | None = None
        """The source was asked to stop once it has emitted this many output tokens."""
        self._failed_nodes: set[str] = set()
        """Every node the request failed on: each resume avoids them all."""
        host.track(request)
        request.instance_id, request.node_id = instance.instance_id, instance.node_id
        try:
            self._call = host.start_call(instance, request)
        except NodeFailed:
            pass  # the first iteration meets it again, and resumes elsewhere
        except BaseException:
            self._finish()  # no stream for the caller to close: give the slot back now
            raise
        self._events = self._run()

    @property
    def request(self) -> RequestState:
        return self._request

    @property
    def instance(self) -> InstanceT | None:
        """The instance the request runs on now (None before a resume has found one)."""
        return self._current

    @property
    def migration(self) -> LiveMigration | None:
        """The live migration under way, if any."""
        return self._migration

    # ---- live migration --------------------------------------------------------------------

    def migrate(
        self, destination: InstanceT, reason: Reason, config: MigrationConfig
    ) -> LiveMigration:
        """Begin moving the request to `destination` while it keeps generating here (see
        `migration.live`); the stream takes over the slot held there. The hand-over happens
        between two of this stream's tokens; if the migration aborts, the slot is released
        and the request never left. Raises `MigrationRefused` (the slot is not taken then)."""
        current, request = self._current, self._request
        if self._migration is not None:
            raise MigrationRefused(
                f"request {request.request_id} is already moving to "
                f"{self._migration.destination_node}"
            )
        if current is None or self._call is None:
            raise MigrationRefused(f"request {request.request_id} is not running right now")
        if destination.instance_id == current.instance_id:
            raise MigrationRefused(f"request {request.request_id} already runs there")
        if len(request.output_ids) + 1 >= request.params.max_tokens:
            raise MigrationRefused(f"request {request.request_id} is finishing")
        call = self._host.start_migrate_call(destination, request)
        migration = LiveMigration(
            request, destination.instance_id, destination.node_id, call, reason, config
        )
        self._migration, self._destination = migration, destination
        migration.on_ready = self._stop_source
        self._host.spawn(migration.run())
        migration.done.add_done_callback(self._migration_ended)
        return migration

    def _migration_ended(self, done: asyncio.Future[MigrationReport]) -> None:
        report = done.result()
        if report.outcome.handed_over:
            return  # the hand-over reports once the destination's first token is through
        destination = self._destination
        self._migration = self._destination = None
        self._stop_at = None  # if the source still stops there, it goes on here
        if destination is not None:
            self._host.release(destination)
        self._host.migration_done(report)

    def _stop_source(self) -> None:
        """The migration is ready: ask the source to stop after the token it is computing
        now, so that no step of its runs beside the destination's first (on a shared machine
        the two would slow each other) and the hand-over comes at a boundary it knows."""
        current = self._current
        if current is None or self._stop_at is not None:
            return
        self._stop_at = len(self._request.output_ids) + 1
        self._host.spawn(self._ask_to_stop(current, self._stop_at))

    async def _ask_to_stop(self, source: InstanceT, outputs: int) -> None:
        try:
            await self._host.stop_after(source, self._request, outputs)
        except Exception as exc:  # the node could not be asked: hand over at the next token
            log.warning(
                "request %s: could not ask %s to stop for the hand-over (%s); cancelling instead",
                self._request.request_id,
                source.node_id,
                exc,
            )
            if self._stop_at == outputs:
                self._stop_at = 0

    def _overshot(self) -> bool:
        """The source went past the token it was asked to stop after (its node could not be
        asked, or did not stop), or was not asked: hand over now, cancelling it."""
        return self._stop_at is None or len(self._request.output_ids) > self._stop_at + 1

    def _hand_over(self, outcome: Outcome) -> None:
        """Switch the request to the migration's destination now (the source's call has been
        closed, and its slot released by the caller when it failed)."""
        migration, destination = self._migration, self._destination
        assert migration is not None and destination is not None
        migration.commit(outcome)
        self._stop_at = None
        source = self._current
        self._migration = self._destination = None
        self._current, self._call = destination, _Committed(migration)
        if source is not None:
            self._host.release(source)
        self._handed_over = (migration.done.result(), time.monotonic())

    def _report_hand_over(self, paused: bool) -> None:
        """Report a hand-over not yet reported: with its pause when the destination's first
        token is through (`paused`), without one when the stream ended or failed first."""
        if self._handed_over is not None:
            report, since = self._handed_over
            self._handed_over = None
            pause = time.monotonic() - since if paused else None
            self._host.migration_done(dataclasses.replace(report, pause_s=pause))

    def __aiter__(self) -> AsyncGenerator[pb.TokenEvent, None]:
        return self._events

    async def aclose(self) -> None:
        """Stop: cancel the node's generation if it is still going, give the slot back."""
        await self._events.aclose()
        self._finish()  # the events never started: their `finally` did not run

    def close_soon(self) -> None:
        """`aclose` in a task of the host's (from a callback, where nothing can await)."""
        self._host.spawn(self.aclose())

    def _finish(self) -> None:
        self._report_hand_over(paused=False)
        if self._migration is not None:
            self._migration.abort(Outcome.CANCELLED, "the request's stream was closed")
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._current is not None:
            self._host.release(self._current)
            self._current = None
        self._host.untrack(self._request)

    async def _run(self) -> AsyncGenerator[pb.TokenEvent, None]:
        resumes = 0
        try:
            while True:
                try:
                    call, node_id = self._current_call()
                    handing_over = stopped = False
                    async with contextlib.aclosing(
                        _node_stream(call, node_id, self._request)
                    ) as events:
                        async for event in events:
                            self._report_hand_over(paused=True)
                            stopped = event.finish_reason == pb.FINISH_REASON_HANDED_OVER
                            if stopped:  # where it was asked to: the client sees a token
                                event = _unfinished(event)
                            elif self._migration is not None:
                                if _goes_on(event):
                                    self._migration.follow()
                                else:  # before the yield: the reader may close the stream there
                                    self._migration.abort(
                                        Outcome.FINISHED, "the request finished first"
                                    )
                            yield event
                            # Decided after the yield: the migration may have ended meanwhile
                            # (a slow client holds the stream here).
                            migration = self._migration
                            if migration is not None and migration.ready and _goes_on(event):
                                handing_over = self._overshot()  # cancel it at this token
                            if stopped or handing_over:
                                break
                    if stopped and (self._migration is None or not self._migration.prefilled):
                        self._resume_here()  # the migration ended meanwhile
                        continue
                    if stopped or handing_over:  # the source's call is over (or cancelled)
                        self._hand_over(Outcome.COMPLETED)
                        continue
                    self._call = None
                    if self._migration is not None:
                        self._migration.abort(Outcome.FINISHED, "the request finished first")
                    return
                except NodeFailed as exc:
                    if self._take_over(exc):
                        continue
                    resumes += 1
                    if resumes > MAX_RESUMES:
                        raise UpstreamError(str(exc)) from None
                    await self._resume(exc)
        finally:
            self._finish()

    def _take_over(self, failure: NodeFailed) -> bool:
        """The source failed mid-migration: if the destination already holds the request's
        KV, it takes over from the recorded tokens (True); else the migration is abandoned
        and the request resumes the usual way (False)."""
        migration = self._migration
        if migration is None or migration.phase is Phase.DONE:
            return False
        if not migration.prefilled:
            migration.abort(Outcome.ABORTED, f"the source failed first ({failure})")
            return False
        self._leave_failed(failure, f"mid-migration; {migration.destination_node} takes over")
        self._hand_over(Outcome.TAKEOVER)
        return True

    def _resume_here(self) -> None:
        """The source stopped for a hand-over whose migration then ended: the next call goes
        on on the same instance, from the recorded tokens."""
        log.info(
            "request %s: the migration ended as its source stopped; it goes on on %s",
            self._request.request_id,
            self._current.node_id if self._current is not None else "?",
        )
        self._call, self._stop_at = None, None

    def _current_call(self) -> tuple[TokenCall, str]:
        """The call on the current instance (started now if it is not yet), and its node."""
        current, request = self._current, self._request
        assert current is not None
        request.instance_id, request.node_id = current.instance_id, current.node_id
        if self._call is None:
            self._call = self._host.start_call(current, request)
        return self._call, current.node_id

    async def _resume(self, failure: NodeFailed) -> None:
        """Leave the failed instance (its slot, and its place in routing) and take a slot on
        another instance, on a node the request has not failed on; the next call resumes
        there."""
        self._report_hand_over(paused=False)
        current = self._current
        assert current is not None
        avoid = frozenset({*self._failed_nodes, current.node_id})
        self._leave_failed(failure, f"resuming on a node other than {', '.join(sorted(avoid))}")
        self._current = await self._relocate(avoid)

    def _leave_failed(self, failure: NodeFailed, then: str) -> InstanceT:
        """Give back the failed instance's slot, take it out of routing and remember its node
        as one the request failed on; returns it."""
        failed = self._current
        assert failed is not None
        self._failed_nodes.add(failed.node_id)
        log.warning(
            "request %s lost %s (%s) after %d tokens; %s",
            self._request.request_id,
            failed.node_id,
            failure,
            len(self._request.output_ids),
            then,
        )
        self._current, self._call = None, None
        self._host.release(failed)
        self._host.drop_instance(failed)
        return failed


def _goes_on(event: pb.TokenEvent) -> bool:
    return event.finish_reason == pb.FINISH_REASON_UNSPECIFIED


class _Committed:
    """A committed migration's destination, read like a `Generate` call."""

    def __init__(self, migration: LiveMigration) -> None:
        self._migration = migration

    def __aiter__(self) -> AsyncIterator[pb.TokenEvent]:
        return self._events()

    async def _events(self) -> AsyncGenerator[pb.TokenEvent, None]:
        """The destination's tokens; any failure before its first token (the commit did not
        get through, its engine failed at once) resumes the request from the recorded tokens."""
        first = True
        try:
            async for event in self._migration.tokens():
                first = False
                yield event
        except grpc.aio.AioRpcError as exc:
            if first:
                raise NodeFailed(
                    f"the destination failed at the hand-over: {exc.details()}"
                ) from None
            raise
        except asyncio.InvalidStateError as exc:
            raise NodeFailed(f"the destination's call ended at the hand-over: {exc}") from None

    def cancel(self) -> bool:
        self._migration.cancel()
        return True


async def _node_stream(
    call: TokenCall, node_id: str, request: RequestState
) -> AsyncGenerator[pb.TokenEvent, None]:
    """`call`'s events, each token recorded in `request`; a node failure as `NodeFailed`."""
    finished = False
    try:
        async for event in call:
            if event.has_token:
                request.output_ids.append(event.token_id)
            if event.finish_reason == pb.FINISH_REASON_ABORT and not event.has_token:
                raise NodeFailed(event.error or "aborted on the node")
            if event.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                finished = True
            yield event
            if finished:
                return
    except grpc.aio.AioRpcError as exc:
        if exc.code() in _RESUMABLE:
            raise NodeFailed(f"{exc.code().name}: {exc.details()}") from None
        raise UpstreamError(f"node {node_id}: {exc.code().name}: {exc.details()}") from None
    finally:
        if not finished:
            call.cancel()
    if not finished:
        raise NodeFailed("the stream ended without a finish reason")


def _unfinished(event: pb.TokenEvent) -> pb.TokenEvent:
    """A hand-over's last token as the client sees it: the token, not an end."""
    copy = pb.TokenEvent()
    copy.CopyFrom(event)
    copy.finish_reason = pb.FINISH_REASON_UNSPECIFIED
    return copy
