"""An asyncio front for `LLMEngine`: submit a request, iterate its tokens, cancel it.

The engine runs in one background thread (torch releases the GIL during compute, so the event
loop stays responsive). Callers' additions and cancellations go through an inbox that the thread
drains between steps; events come back to each caller's event loop via `call_soon_threadsafe`.
Inside, every submission gets a unique id, so a caller reusing a request id (a retry, a resumed
migration) can never receive events meant for an earlier request of the same name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

from node_agent.engine.engine import LLMEngine
from node_agent.engine.sequence import FinishReason, Request, Sequence, TokenEvent
from node_agent.facts.errors import EngineError

log = logging.getLogger(__name__)


class GenerationError(EngineError):
    """The engine failed while running a request (not the request's fault)."""


@dataclass(frozen=True)
class _Extend:
    """Inbox item: tokens for a held sequence, and whether it is released (`LLMEngine.extend`)."""

    internal: str
    token_ids: list[int]
    release: bool


@dataclass(frozen=True)
class _StopAfter:
    """Inbox item: finish a request once it has emitted `outputs` (`LLMEngine.stop_after`)."""

    internal: str
    outputs: int


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent]


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, _Stream] = {}  # by internal id
        self._active: dict[str, str] = {}  # caller's request id -> internal id
        # internal id -> what `cancel`/`extend` sent for it while its request was validated:
        # posted right after its Sequence, never before it (the engine would ignore them)
        self._validating: dict[str, list[str | _Extend | _StopAfter]] = {}
        self._ids = itertools.count()
        # A Sequence to add, an id to abort, tokens for a held sequence, or a stop to arrange.
        self._inbox: deque[Sequence | str | _Extend | _StopAfter] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="stoke-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: Request, held: bool = False) -> AsyncIterator[TokenEvent]:
        """Stream one request's events; the last has `finish_reason` set.

        Raises RequestError before the first event if the request is invalid, and
        GenerationError if the engine fails or stops mid-way. Closing the iterator early (a
        client that went away) cancels the request and frees its capacity.

        `held`: the destination of a live migration. The request's known tokens are prefilled
        but nothing is sampled; each time it has caught up, an event with `prefilled` set (the
        number of known tokens) is sent. `extend` adds the tokens the source emitted since, and
        once released it streams tokens like any other request.
        """
        if request.request_id in self._active:
            raise EngineError(f"request id {request.request_id!r} is already in flight")
        internal = f"{request.request_id}#{next(self._ids)}"
        # a sibling names its source by the caller's id; the engine knows it by its internal one
        prefix = self._active.get(request.prefix_from) if request.prefix_from else None
        validate = partial(
            self.engine.validate,
            dataclasses.replace(request, request_id=internal, prefix_from=prefix),
        )
        self._active[request.request_id] = internal  # the id is taken from here on
        self._validating[internal] = []
        try:
            # A response_format may compile a grammar (the model's first builds its vocabulary,
            # ~0.2 s): off the event loop, where every other stream of this engine is served.
            seq = (
                await asyncio.to_thread(validate) if request.params.response_format else validate()
            )
        except BaseException:
            del self._active[request.request_id]
            del self._validating[internal]
            raise
        seq.held = held
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[internal] = stream
        self._post(seq)
        for item in self._validating.pop(internal):
            self._post(item)
        finished = False
        try:
            while not finished:
                event = await stream.queue.get()
                finished = event.finish_reason is not None
                if event.error is not None:
                    raise GenerationError(f"generation failed: {event.error}")
                yield dataclasses.replace(event, request_id=request.request_id)
        finally:
            self._streams.pop(internal, None)
            if self._active.get(request.request_id) == internal:
                del self._active[request.request_id]
            if not finished:
                self._post(internal)

    def extend(self, request_id: str, token_ids: list[int], release: bool) -> None:
        """Hand a held request (see `generate`) more known tokens, and release it to generate
        if `release`. An invalid extension ends its stream with a GenerationError."""
        internal = self._active.get(request_id)
        if internal is None:
            raise EngineError(f"request {request_id!r} is not in flight here")
        self._send(internal, _Extend(internal, list(token_ids), release))

    def cancel(self, request_id: str, after_outputs: int = 0) -> None:
        """Stop a request; its stream ends with an `abort` event. With `after_outputs`, once it
        has emitted that many output tokens instead (see `LLMEngine.stop_after`): its last
        event is that token, finished `handed_over`. Unknown ids are ignored."""
        internal = self._active.get(request_id)
        if internal is not None:
            self._send(internal, _StopAfter(internal, after_outputs) if after_outputs else internal)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is queued or running; False if `timeout` passed first."""
        with self._wakeup:
            return self._wakeup.wait_for(
                lambda: not self._inbox and not self.engine.has_work(), timeout
            )

    def stop(self) -> None:
        """Stop the engine thread; requests still in flight end with a GenerationError."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        self._thread.join()

    def _send(self, internal: str, item: str | _Extend | _StopAfter) -> None:
        """Post `item` for the request known internally as `internal`, after its Sequence."""
        waiting = self._validating.get(internal)
        if waiting is not None:
            waiting.append(item)
        else:
            self._post(item)

    def _post(self, item: Sequence | str | _Extend | _StopAfter) -> None:
        with self._wakeup:
            self._inbox.append(item)
            self._wakeup.notify_all()

    def _run(self) -> None:
        try:
            while self._step_once():
                pass
        except BaseException:
            log.exception("engine thread died")
            raise
        finally:
            self._dispatch(self.engine.fail_all("the engine stopped"))
            for internal in list(self._streams):  # submitted but never added
                self._dispatch([TokenEvent(internal, None, "", FinishReason.ERROR, "stopped")])

    def _step_once(self) -> bool:
        with self._wakeup:
            while not self._stopping and not self._inbox and not self.engine.has_work():
                self._wakeup.wait()
            if self._stopping:
                return False
            inbox = list(self._inbox)
            self._inbox.clear()
        events: list[TokenEvent] = []
        try:
            events += self._apply(inbox)
            events += self.engine.step()
        except Exception as exc:  # a failed step must not kill the engine thread
            log.exception("engine step failed")
            events += self.engine.fail_all(f"{type(exc).__name__}: {exc}")
        self._dispatch(events)
        with self._wakeup:
            self._wakeup.notify_all()  # wake wait_idle()
        return True

    def _apply(self, inbox: list[Sequence | str | _Extend | _StopAfter]) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        for item in inbox:
            if isinstance(item, str):
                event = self.engine.abort(item)
                if event is not None:
                    events.append(event)
            elif isinstance(item, _StopAfter):
                self.engine.stop_after(item.internal, item.outputs)
            elif isinstance(item, _Extend):
                try:
                    self.engine.extend(item.internal, item.token_ids, item.release)
                except EngineError as exc:
                    self.engine.abort(item.internal)
                    events.append(TokenEvent(item.internal, None, "", FinishReason.ERROR, str(exc)))
            else:
                try:
                    self.engine.add(item)
                except EngineError as exc:
                    events.append(
                        TokenEvent(item.request_id, None, "", FinishReason.ERROR, str(exc))
                    )
        return events

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is None:
                continue
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, event)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                self._streams.pop(event.request_id, None)
