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

import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, Generic, Protocol, TypeAlias, TypeVar

import grpc

from migration.request import RequestState
from node_agent.proto import node_agent_pb2 as pb

log = logging.getLogger(__name__)

MAX_RESUMES = 2
"""How many times one request may move to another instance after a failure."""
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED)

GenerateCall: TypeAlias = grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.TokenEvent]


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
    """What a `TokenStream` needs from whoever places requests on instances. Every method is
    called on the event loop and returns at once (no awaiting), so the host's bookkeeping stays
    atomic."""

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


Relocate: TypeAlias = Callable[[frozenset[str]], Awaitable[InstanceT]]
"""Another instance for the request, not on the given nodes, with a slot held for it (the
stream releases it). Raises what placement raises when there is none."""


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
        self._call: GenerateCall | None = None
        """The call on `_current` now; None before it starts and once it ended."""
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
                    async with contextlib.aclosing(
                        _node_stream(call, node_id, self._request)
                    ) as events:
                        async for event in events:
                            yield event
                    self._call = None
                    return
                except NodeFailed as exc:
                    resumes += 1
                    if resumes > MAX_RESUMES:
                        raise UpstreamError(str(exc)) from None
                    await self._resume(exc)
        finally:
            self._finish()

    def _current_call(self) -> tuple[GenerateCall, str]:
        """The call on the current instance (started now if it is not yet), and its node."""
        current, request = self._current, self._request
        assert current is not None
        request.instance_id, request.node_id = current.instance_id, current.node_id
        if self._call is None:
            self._call = self._host.start_call(current, request)
        return self._call, current.node_id

    async def _resume(self, failure: NodeFailed) -> None:
        """Leave the failed instance (its slot, and its place in routing) and take a slot on
        another instance, on another node; the next call resumes there."""
        failed = self._current
        assert failed is not None
        log.warning(
            "request %s lost %s (%s); resuming after %d tokens",
            self._request.request_id,
            failed.node_id,
            failure,
            len(self._request.output_ids),
        )
        self._current, self._call = None, None
        self._host.release(failed)
        self._host.drop_instance(failed)
        self._current = await self._relocate(frozenset({failed.node_id}))


async def _node_stream(
    call: GenerateCall, node_id: str, request: RequestState
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
