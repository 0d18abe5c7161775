"""An asyncio front for `LLMEngine`: submit a request, iterate its tokens, cancel it.

The engine runs in one background thread (torch releases the GIL during compute, so the event
loop stays responsive). Callers' additions and cancellations go through an inbox that the thread
drains between steps; events come back to each caller's event loop via `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from node_agent.engine.engine import LLMEngine
from node_agent.engine.errors import EngineError
from node_agent.engine.sequence import FinishReason, Request, Sequence, TokenEvent

log = logging.getLogger(__name__)


class GenerationError(EngineError):
    """The engine failed while running a request (not the request's fault)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent]


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, _Stream] = {}
        self._inbox: deque[Sequence | str] = deque()  # a Sequence to add, or an id to abort
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="stoke-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent]:
        """Stream one request's events; the last has `finish_reason` set.

        Raises RequestError before the first event if the request is invalid, and
        GenerationError if the engine fails mid-way. Closing the iterator early (a client that
        went away) cancels the request and frees its capacity.
        """
        seq = self.engine.validate(request)
        if request.request_id in self._streams:
            raise EngineError(f"request id {request.request_id!r} is already in flight")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request.request_id] = stream
        self._post(seq)
        finished = False
        try:
            while not finished:
                event = await stream.queue.get()
                finished = event.finish_reason is not None
                if event.error is not None:
                    raise GenerationError(f"generation failed: {event.error}")
                yield event
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self._post(request.request_id)

    def cancel(self, request_id: str) -> None:
        """Stop a request; its stream ends with an `abort` event."""
        self._post(request_id)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is queued or running; False if `timeout` passed first."""
        with self._wakeup:
            return self._wakeup.wait_for(
                lambda: not self._inbox and not self.engine.has_work(), timeout
            )

    def stop(self) -> None:
        """Stop the engine thread (in-flight requests are not finished)."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        self._thread.join()

    def _post(self, item: Sequence | str) -> None:
        with self._wakeup:
            self._inbox.append(item)
            self._wakeup.notify_all()

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not self._inbox and not self.engine.has_work():
                    self._wakeup.wait()
                if self._stopping:
                    return
                inbox = list(self._inbox)
                self._inbox.clear()
            events = self._apply(inbox)
            try:
                events += self.engine.step()
            except Exception as exc:  # a failed step must not kill the engine thread
                log.exception("engine step failed")
                events += self.engine.fail_all(f"{type(exc).__name__}: {exc}")
            self._dispatch(events)
            with self._wakeup:
                self._wakeup.notify_all()  # wake wait_idle()

    def _apply(self, inbox: list[Sequence | str]) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        for item in inbox:
            if isinstance(item, str):
                event = self.engine.abort(item)
                if event is not None:
                    events.append(event)
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
            if stream is not None:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, event)
