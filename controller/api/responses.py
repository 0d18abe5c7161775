"""OpenAI's response documents for one request's token stream: streamed as server-sent events
(`TokenResponse` over `sse`) or collected into one document (`collect`, `ResponseShape.whole`).

Both close the `TokenStream` however the response ends, so its slot is always given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from controller.api.errors import ApiError
from controller.api.logprobs import Entry, TokenText, chat_logprobs, completion_logprobs
from controller.errors import LoadRejected, Overloaded
from controller.schemas import error_body
from migration.request import RequestState
from migration.stream import TokenStream, UpstreamError
from node_agent.proto import node_agent_pb2 as pb

FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
"""OpenAI's `finish_reason` for each of the node's."""


class ResponseShape:
    """OpenAI's response documents for one request. `text_of` (a token id's text) is given
    when the request asked for log probabilities."""

    def __init__(
        self, request_id: str, model: str, chat: bool, text_of: TokenText | None = None
    ) -> None:
        self.id, self.model, self.chat = request_id, model, chat
        self.created = int(time.time())
        self.text_of = text_of
        self._offsets: dict[int, int] = {}  # a text completion's, by choice: where the next
        # token's text starts

    def logprobs(self, entries: list[Entry], index: int = 0) -> dict[str, Any] | None:
        """`choices[index].logprobs` for the next `entries` of its output (None if not
        asked)."""
        if self.text_of is None:
            return None
        if self.chat:
            return chat_logprobs(entries, self.text_of)
        doc = completion_logprobs(entries, self.text_of, self._offsets.get(index, 0))
        self._offsets[index] = self._offsets.get(index, 0) + sum(len(t) for t in doc["tokens"])
        return doc

    def _doc(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(
        self,
        delta: dict[str, Any],
        finish: str | None,
        logprobs: dict[str, Any] | None = None,
        index: int = 0,
    ) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
            return self._doc("chat.completion.chunk", [choice])
        choice = {
            "index": index,
            "text": delta.get("content", ""),
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        return self._doc("text_completion", [choice])

    def usage_chunk(self, *states: RequestState) -> dict[str, Any]:
        doc = self._doc("chat.completion.chunk" if self.chat else "text_completion", [])
        doc["usage"] = usage(*states)
        return doc

    def whole(self, collected: Collected, state: RequestState) -> dict[str, Any]:
        return self.choices([collected], [state])

    def choices(self, outputs: list[Collected], states: list[RequestState]) -> dict[str, Any]:
        """The whole response: `outputs` as choices 0, 1, ...; usage counts every state (the
        prompt once)."""
        docs = []
        for index, collected in enumerate(outputs):
            text, finish = collected.text, collected.finish
            logprobs = self.logprobs(collected.entries, index)
            if self.chat:
                message = {"role": "assistant", "content": text}
                docs.append(
                    {
                        "index": index,
                        "message": message,
                        "logprobs": logprobs,
                        "finish_reason": finish,
                    }
                )
            else:
                docs.append(
                    {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
                )
        doc = self._doc("chat.completion" if self.chat else "text_completion", docs)
        doc["usage"] = usage(*states)
        return doc


def usage(*states: RequestState) -> dict[str, int]:
    """OpenAI's `usage`: the prompt once, the completion tokens of every generation."""
    prompt, completion = len(states[0].prompt_ids), sum(len(s.output_ids) for s in states)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


STREAM_FAILURES = (UpstreamError, Overloaded, LoadRejected)
"""How a request's stream can fail once it runs: its node failed it, or its node failed and no
other could resume it."""


def failure(exc: Exception) -> ApiError:
    """OpenAI's error for one of `STREAM_FAILURES`: 502 when the node failed the request, 503
    when its node failed and no other could take over."""
    if isinstance(exc, (Overloaded, LoadRejected)):
        return ApiError(
            503,
            f"the node failed this request and no other could resume it: {exc}",
            "server_error",
            "resume_failed",
        )
    return ApiError(502, f"the node failed this request: {exc}", "server_error")


def sse_data(doc: dict[str, Any]) -> bytes:
    """One server-sent event carrying `doc`."""
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


def sse_failure(exc: Exception) -> bytes:
    """The stream's last event when it fails: the response has started, so a failure can only
    be told in the stream."""
    error = failure(exc)
    return sse_data(error_body(str(error), error.type, error.code))


async def unless_disconnected(request: Request, task: asyncio.Future[Any]) -> Any:
    """`await task`, but cancel it if the client goes away first."""
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise asyncio.CancelledError("client disconnected")


class TokenResponse(StreamingResponse):
    """The SSE response of one `TokenStream`, which it closes however the response ends:
    streamed to the end, the client gone before or during it, or the response start failing."""

    def __init__(
        self, streams: list[TokenStream[Any]], content: AsyncIterator[bytes], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self._streams:
                # each on its own: one still being iterated elsewhere (a pump of several
                # choices, cancelled with the response) closes itself and must not stop the rest
                with contextlib.suppress(RuntimeError):
                    await stream.aclose()


@dataclass
class Collected:
    """A whole output: its text, OpenAI's finish reason, and each token's log probabilities
    (when the request asked for them)."""

    text: str = ""
    finish: str = "stop"
    entries: list[Entry] = field(default_factory=list)
    prompt_entries: list[pb.TokenLogprobs] = field(default_factory=list)
    """The prompt's tokens' log probabilities after the first (when asked: `echo`)."""


def entries_of(event: pb.TokenEvent) -> list[Entry]:
    """The event's token with its log probabilities, if it carries them."""
    if event.has_token and event.HasField("logprobs"):
        return [(event.token_id, event.logprobs)]
    return []


async def collect(events: TokenStream[Any], on_token: Callable[[], None]) -> Collected:
    """The whole output; `UpstreamError` if the node failed it."""
    parts: list[str] = []
    collected = Collected()
    async with contextlib.aclosing(events) as stream:
        async for event in stream:
            if event.has_token:
                on_token()
            parts.append(event.text)
            collected.entries += entries_of(event)
            if event.prompt_logprobs and not collected.prompt_entries:
                # once: a migration's destination computes them again for its first token
                collected.prompt_entries = list(event.prompt_logprobs)
            if event.finish_reason == pb.FINISH_REASON_ERROR:
                raise UpstreamError(event.error or "the instance failed")
            if event.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                collected.finish = FINISH.get(event.finish_reason, "stop")
    collected.text = "".join(parts)
    return collected


async def sse(
    shape: ResponseShape,
    events: TokenStream[Any],
    state: RequestState,
    include_usage: bool,
    on_token: Callable[[], None],
) -> AsyncIterator[bytes]:
    """The stream as SSE chunks, ending in `data: [DONE]` (or an error chunk: the response has
    started, so a failure can only be told in the stream)."""
    if shape.chat:
        yield sse_data(shape.chunk({"role": "assistant", "content": ""}, None))
    try:
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                if event.has_token:
                    on_token()
                if event.finish_reason == pb.FINISH_REASON_ERROR:
                    raise UpstreamError(event.error or "the instance failed")
                finish = FINISH.get(event.finish_reason)
                entries = entries_of(event)
                if event.text or entries:
                    logprobs = shape.logprobs(entries)
                    yield sse_data(shape.chunk({"content": event.text}, None, logprobs))
                if finish:
                    yield sse_data(shape.chunk({}, finish))
    except STREAM_FAILURES as exc:
        yield sse_failure(exc)
        return
    if include_usage:
        yield sse_data(shape.usage_chunk(state))
    yield b"data: [DONE]\n\n"
