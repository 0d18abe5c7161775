"""Several outputs from one prompt (`n`, `best_of`) and the echoed prompt (`echo`).

Each generation is a request of its own to the node (`<id>-<i>`), with its own token-level
state, so each is resumed or migrated on its own like any request. They share one instance:
the first takes a slot as placement decides, the others take slots beside it
(`Router.share`) and name the first as `prefix_from`, so the instance copies the prompt's K/V
from it instead of computing the prompt again.

Generation i samples with `seed + i` (mod 2**63): with a `seed`, a request with `n` > 1 gives
the same choices every time, and choice i equals a request with `n` = 1 and seed + i. Without
one, the seed is random and so is every choice.

`best_of` generates that many and returns the `n` with the highest cumulative log probability
(the sum over its tokens of the model's log probability, as the `logprobs` field reports it),
best first; usage counts every generated token, as OpenAI bills them. `echo` puts the prompt
before each choice's text; with `logprobs`, its tokens come first in the choice's log
probabilities, the first token's as null (nothing comes before it): each generation then
computes the prompt itself, for its log probabilities.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from controller.api.logprobs import Entry
from controller.api.responses import (
    FINISH,
    STREAM_FAILURES,
    Collected,
    ResponseShape,
    TokenResponse,
    collect,
    entries_of,
    failure,
    sse_data,
    sse_failure,
    unless_disconnected,
)
from controller.registry import FunctionRecord
from controller.router import Placement, Router
from migration.request import RequestState, SamplingParams
from migration.stream import TokenStream, UpstreamError
from node_agent.proto import node_agent_pb2 as pb

SEEDS = 2**63


@dataclass(frozen=True)
class Asked:
    """What the request asked of its choices."""

    n: int
    generations: int
    """`best_of`, or `n`."""
    logprobs: int | None
    """Alternatives per token the client asked for; None: no log probabilities."""
    echo: str | None
    """The prompt's text, to put before each choice's; None: no echo."""

    @property
    def ranks(self) -> bool:
        return self.generations > self.n


@dataclass
class Generation:
    state: RequestState
    stream: TokenStream[Any]


def generations(
    router: Router,
    fn: FunctionRecord,
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    asked: Asked,
    placement: Placement,
) -> list[Generation]:
    """Start every generation on `placement`'s instance now (the first holds its slot; the
    others take one beside it)."""
    started: list[Generation] = []
    try:
        for i, state in enumerate(_states(fn, request_id, prompt_ids, params, asked)):
            here = placement if i == 0 else router.share(placement)
            started.append(Generation(state, router.open_stream(fn, state, here)))
    except BaseException:
        for g in started:  # the slots already taken go back
            g.stream.close_soon()
        raise
    return started


def _states(
    fn: FunctionRecord, request_id: str, prompt_ids: list[int], params: SamplingParams, asked: Asked
) -> list[RequestState]:
    """Each generation's request: seed + i, the log probabilities it needs, and the first
    generation named as the one whose prompt K/V the others may copy."""
    scores_prompt = asked.echo is not None and asked.logprobs is not None
    # best_of ranks by log probability: ask for the sampled token's at least
    logprobs = (asked.logprobs or 0) if asked.ranks else asked.logprobs
    return [
        RequestState(
            f"{request_id}-{i}",
            fn.name,
            prompt_ids,
            dataclasses.replace(
                params,
                seed=(params.seed + i) % SEEDS,
                logprobs=logprobs,
                prompt_logprobs=asked.logprobs if scores_prompt else None,
            ),
            # scoring the prompt means computing it: nothing to share then
            prefix_from="" if i == 0 or scores_prompt else f"{request_id}-0",
        )
        for i in range(asked.generations)
    ]


async def respond(
    request: Request,
    shape: ResponseShape,
    started: list[Generation],
    asked: Asked,
    prompt_ids: list[int],
    *,
    stream: bool,
    include_usage: bool,
    on_token: Callable[[], None],
    count: Callable[[int], None],
    headers: dict[str, str],
) -> Response:
    """The response for `started` generations, streamed or whole."""
    if stream:
        count(200)
        return TokenResponse(
            [g.stream for g in started],
            _sse(shape, started, asked, prompt_ids, include_usage, on_token),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"},
        )
    outputs = await _collect_all(request, started, on_token, count)
    count(200)
    chosen = _best(outputs, asked)
    echoed = [_echoed(outputs[i], asked, prompt_ids) for i in chosen]
    return JSONResponse(shape.choices(echoed, [g.state for g in started]), headers=headers)


def _best(outputs: list[Collected], asked: Asked) -> list[int]:
    """Indices of the outputs to return: all of them, or the `n` most likely (best first)."""
    if not asked.ranks:
        return list(range(len(outputs)))

    def total(i: int) -> float:
        return sum(lp.logprob for _, lp in outputs[i].entries if lp is not None)

    return sorted(range(len(outputs)), key=total, reverse=True)[: asked.n]


def _echoed(collected: Collected, asked: Asked, prompt_ids: list[int]) -> Collected:
    """`collected` as the client sees it: the prompt before it when echoed, and log
    probabilities only when asked for (best_of asks for them itself)."""
    entries: list[Entry] = collected.entries if asked.logprobs is not None else []
    if asked.echo is None:
        return dataclasses.replace(collected, entries=entries)
    prompt = _prompt_entries(collected.prompt_entries, asked, prompt_ids)
    return dataclasses.replace(
        collected, text=asked.echo + collected.text, entries=prompt + entries
    )


def _prompt_entries(
    scored: Sequence[pb.TokenLogprobs], asked: Asked, prompt_ids: list[int]
) -> list[Entry]:
    """The echoed prompt's log-probability entries (none unless `logprobs` was asked)."""
    if asked.logprobs is None:
        return []
    return [(prompt_ids[0], None), *zip(prompt_ids[1:], scored, strict=True)]


async def _collect_all(
    request: Request,
    started: list[Generation],
    on_token: Callable[[], None],
    count: Callable[[int], None],
) -> list[Collected]:
    """Every generation's whole output; 502/503 when a node failed one (the others are
    closed)."""
    tasks = []
    for g in started:
        task = asyncio.ensure_future(collect(g.stream, on_token))
        # a collector cancelled before it ever ran never closes its stream itself
        task.add_done_callback(_closer(g.stream))
        tasks.append(task)
    try:
        return list(await unless_disconnected(request, asyncio.gather(*tasks)))
    except STREAM_FAILURES as exc:
        error = failure(exc)
        count(error.status)
        raise error from None
    finally:
        for task in tasks:
            task.cancel()


def _closer(stream: TokenStream[Any]) -> Callable[[asyncio.Future[Any]], None]:
    return lambda _: stream.close_soon()


_END = object()


async def _sse(
    shape: ResponseShape,
    started: list[Generation],
    asked: Asked,
    prompt_ids: list[int],
    include_usage: bool,
    on_token: Callable[[], None],
) -> AsyncIterator[bytes]:
    """Every generation's events as SSE chunks with its choice's `index`, in the order they
    come, ending in `data: [DONE]` (or an error chunk when a node failed one)."""
    # bounded: a slow client holds the node streams back, as a single choice does
    merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=8 * len(started))

    async def pump(index: int, events: TokenStream[Any]) -> None:
        try:
            async with contextlib.aclosing(events) as stream:
                async for event in stream:
                    await merged.put((index, event))
            await merged.put((index, _END))
        except Exception as exc:  # told in the stream, below
            await merged.put((index, exc))

    pumps = [asyncio.ensure_future(pump(i, g.stream)) for i, g in enumerate(started)]
    try:
        for index in range(len(started)):
            if shape.chat:
                yield sse_data(shape.chunk({"role": "assistant", "content": ""}, None, index=index))
            elif asked.echo is not None and asked.logprobs is None:
                yield sse_data(shape.chunk({"content": asked.echo}, None, index=index))
        going = len(started)
        echoed: set[int] = set()
        while going:
            index, event = await merged.get()
            if event is _END:
                going -= 1
                continue
            if isinstance(event, Exception):
                yield sse_failure(event)
                return
            if event.has_token:
                on_token()
            if event.finish_reason == pb.FINISH_REASON_ERROR:
                yield sse_failure(UpstreamError(event.error or "the instance failed"))
                return
            if _scores_here(asked, event, index, echoed):
                echoed.add(index)
                scored = _prompt_entries(event.prompt_logprobs, asked, prompt_ids)
                logprobs = shape.logprobs(scored, index)
                yield sse_data(shape.chunk({"content": asked.echo}, None, logprobs, index))
            entries = entries_of(event)
            if event.text or entries:
                logprobs = shape.logprobs(entries, index)
                yield sse_data(shape.chunk({"content": event.text}, None, logprobs, index))
            finish = FINISH.get(event.finish_reason)
            if finish:
                yield sse_data(shape.chunk({}, finish, index=index))
    finally:
        for task in pumps:
            task.cancel()
        # each pump closes its stream as it ends (the response closes any left)
        await asyncio.gather(*pumps, return_exceptions=True)
    if include_usage:
        yield sse_data(shape.usage_chunk(*(g.state for g in started)))
    yield b"data: [DONE]\n\n"


def _scores_here(asked: Asked, event: pb.TokenEvent, index: int, echoed: set[int]) -> bool:
    """Whether the echoed prompt, with its log probabilities, goes before this event: the
    first token's event carries them."""
    return (
        asked.echo is not None
        and asked.logprobs is not None
        and event.has_token
        and index not in echoed
    )
