"""One invocation, from a parsed request to its response, in named steps: the sampling
parameters (the function's defaults applied, limits checked), placement (a warm slot at once,
else `Router.acquire`, given up if the client leaves), the headers that tell where it ran, the
node's stream opened before the response is built, and then the tokens streamed or collected.
Placement and node failures map to the status codes a client can act on, and each request is
counted once in `stoke_requests_total` with the status it got.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from controller.api import choices
from controller.api.errors import ApiError
from controller.api.logprobs import TokenText
from controller.api.responses import (
    STREAM_FAILURES,
    Collected,
    ResponseShape,
    TokenResponse,
    collect,
    failure,
    sse,
    unless_disconnected,
)
from controller.errors import LoadRejected, Overloaded
from controller.metrics import Metrics
from controller.registry import FunctionRecord
from controller.router import Placement, Router, new_request_id
from controller.schemas import ChatCompletionRequest, CompletionRequest
from controller.service import Controller
from migration.request import RequestState, SamplingParams
from migration.stream import TokenStream
from node_agent.facts.response_format import GrammarError, normalized

Body = CompletionRequest | ChatCompletionRequest


async def invoke(
    controller: Controller,
    request: Request,
    fn: FunctionRecord,
    body: Body,
    prompt_ids: list[int],
    wanted: int | None,
    *,
    chat: bool,
) -> Response:
    """Run `prompt_ids` on `fn` and answer as OpenAI does (`chat` or text completion, streamed
    or whole); `wanted` is the request's own max_tokens, if any."""
    arrived = time.perf_counter()
    params = sampling_params(fn, body, prompt_ids, wanted)
    state = RequestState(
        new_request_id("chatcmpl" if chat else "cmpl"), fn.name, prompt_ids, params
    )
    count = _Counter(controller.metrics, fn.name, "chat" if chat else "completions")
    asked = _asked(fn, body, prompt_ids, params)
    if asked is not None:
        return await _invoke_choices(
            controller, request, fn, body, state, asked, arrived, count, chat=chat
        )
    placement = await place(controller.router, request, fn, count)
    headers = placement_headers(placement, state.request_id)
    # The node starts generating now, while the response is set up; the stream holds the slot
    # until it is closed, which both paths below do however the request ends.
    stream = controller.router.open_stream(fn, state, placement)
    await asyncio.sleep(0)  # the call's send task runs now, before the response is built
    shape = ResponseShape(state.request_id, fn.name, chat, _token_text(fn, params))
    meter = _TokenMeter(controller.metrics, fn.name, placement.cold_start, arrived)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        count(200)
        return TokenResponse(
            [stream],
            sse(shape, stream, state, include_usage, meter.on_token),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"},
        )
    collected = await _collected(request, stream, meter, count)
    count(200)
    return JSONResponse(shape.whole(collected, state), headers=headers)


def _asked(
    fn: FunctionRecord, body: Body, prompt_ids: list[int], params: SamplingParams
) -> choices.Asked | None:
    """What a request for several outputs, or an echoed prompt, asks; None for neither."""
    echo = isinstance(body, CompletionRequest) and body.echo
    if body.generations() == 1 and not echo:
        return None
    text = None
    if echo:
        prompt = body.prompt_input() if isinstance(body, CompletionRequest) else ""
        text = prompt if isinstance(prompt, str) else fn.model.tokenizer.decode(prompt_ids)
    return choices.Asked(body.n, body.generations(), params.logprobs, text)


async def _invoke_choices(
    controller: Controller,
    request: Request,
    fn: FunctionRecord,
    body: Body,
    first: RequestState,
    asked: choices.Asked,
    arrived: float,
    count: _Counter,
    *,
    chat: bool,
) -> Response:
    """`invoke` for several outputs or an echoed prompt (`controller.api.choices`)."""
    placement = await place(controller.router, request, fn, count)
    headers = placement_headers(placement, first.request_id)
    started = choices.generations(
        controller.router, fn, first.request_id, first.prompt_ids, first.params, asked, placement
    )
    await asyncio.sleep(0)  # the calls' send tasks run now, before the response is built
    shape = ResponseShape(first.request_id, fn.name, chat, _token_text(fn, first.params))
    meter = _TokenMeter(controller.metrics, fn.name, placement.cold_start, arrived)
    return await choices.respond(
        request,
        shape,
        started,
        asked,
        first.prompt_ids,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        on_token=meter.on_token,
        count=count,
        headers=headers,
    )


def sampling_params(
    fn: FunctionRecord, body: Body, prompt_ids: list[int], wanted: int | None
) -> SamplingParams:
    """The request's sampling with `fn`'s generation defaults for what it left unset; 400 when
    it asks for more tokens than the function allows or its context holds."""
    gen = fn.spec.generation
    max_tokens = wanted or gen.max_tokens
    if gen.max_tokens_limit is not None and max_tokens > gen.max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens {max_tokens} is over this function's limit of {gen.max_tokens_limit}.",
            param="max_tokens",
            code="max_tokens_too_large",
        )
    if not prompt_ids:
        raise ApiError(400, "prompt: empty; send at least one token of text.", param="prompt")
    context = fn.context_length
    if len(prompt_ids) + max_tokens > context:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, "
            f"{max_tokens} for the completion). Reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    min_tokens = body.min_tokens or 0
    if min_tokens > max_tokens:
        raise ApiError(
            400,
            f"min_tokens {min_tokens} is over max_tokens {max_tokens}; lower min_tokens.",
            param="min_tokens",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature if body.temperature is not None else gen.temperature,
        top_p=body.top_p if body.top_p is not None else gen.top_p,
        seed=body.seed if body.seed is not None else secrets.randbits(63),
        stop=tuple(body.stop_list()),
        top_k=max(body.top_k or 0, 0),  # vLLM's -1 is off, as 0
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        logit_bias=_logit_bias(fn, body),
        min_tokens=min_tokens,
        ignore_eos=body.ignore_eos,
        logprobs=body.top_logprobs_wanted(),
        response_format=_response_format(body),
    )


def _response_format(body: Body) -> str:
    """The request's `response_format` as the node takes it; 400 naming the fix when stoke
    cannot enforce it (checked here, so no node is asked)."""
    if not isinstance(body, ChatCompletionRequest):
        return ""
    try:
        return normalized(body.response_format)
    except GrammarError as exc:
        raise ApiError(400, str(exc), param="response_format") from None


def _logit_bias(fn: FunctionRecord, body: Body) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as (token id, bias) pairs (checked by `unsupported`); 400 for an id past
    the model's vocabulary."""
    pairs = body.token_bias()
    vocab = fn.model.tokenizer.vocab_size
    bad = [t for t, _ in pairs if t >= vocab]
    if bad:
        raise ApiError(
            400, f"logit_bias: token id {bad[0]} is not in [0, {vocab}).", param="logit_bias"
        )
    return pairs


async def place(router: Router, request: Request, fn: FunctionRecord, count: _Counter) -> Placement:
    """A slot for the request: a warm one at once, else whatever `acquire` finds (a cold start,
    a wait in the queue). 429/503 with `Retry-After` when there is none."""
    try:
        return router.try_route(fn) or await _acquire_unless_gone(router, request, fn)
    except Overloaded as exc:
        count(exc.status)
        raise ApiError(
            exc.status,
            str(exc),
            "overloaded_error",
            "overloaded",
            headers={"Retry-After": str(max(1, round(exc.retry_after_s)))},
        ) from None
    except LoadRejected as exc:
        count(503)
        raise ApiError(
            503,
            f"{fn.name} cannot be started as deployed: {exc}. Fix its spec and deploy it again.",
            "server_error",
            "load_rejected",
        ) from None


def placement_headers(placement: Placement, request_id: str) -> dict[str, str]:
    """Where the request runs and what its cold start cost (`x-stoke-*`)."""
    return {
        "x-stoke-cold-start": "true" if placement.cold_start else "false",
        "x-stoke-node": placement.node_id,
        "x-stoke-load-ms": f"{placement.load_ms:.1f}",
        "x-stoke-tier": placement.tier or "",
        "x-stoke-instance": placement.instance.instance_id,
        "x-request-id": request_id,
    }


def _token_text(fn: FunctionRecord, params: SamplingParams) -> TokenText | None:
    """A token id's text for the response's log probabilities; None when not asked for."""
    if params.logprobs is None:
        return None
    tokenizer = fn.model.tokenizer
    return lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)


async def _collected(
    request: Request, stream: TokenStream[Any], meter: _TokenMeter, count: _Counter
) -> Collected:
    """The whole output; 502/503 when the node failed the request."""
    collecting = asyncio.ensure_future(collect(stream, meter.on_token))
    # a collector cancelled before it ever ran never closes the stream itself
    collecting.add_done_callback(lambda _: stream.close_soon())
    try:
        result: Collected = await unless_disconnected(request, collecting)
        return result
    except STREAM_FAILURES as exc:
        error = failure(exc)
        count(error.status)
        raise error from None


async def _acquire_unless_gone(router: Router, request: Request, fn: FunctionRecord) -> Placement:
    """Find an instance; give up (and free what was held) if the client disconnects."""
    task = asyncio.ensure_future(router.acquire(fn))
    try:
        placement: Placement = await unless_disconnected(request, task)
        return placement
    except asyncio.CancelledError:
        if task.done() and not task.cancelled() and task.exception() is None:
            router.release(task.result().instance)
        raise


class _Counter:
    """Counts the request, once, in `stoke_requests_total` with the status it got."""

    def __init__(self, metrics: Metrics, function: str, endpoint: str) -> None:
        self.metrics, self.function, self.endpoint = metrics, function, endpoint

    def __call__(self, status: int) -> None:
        self.metrics.requests.labels(self.function, self.endpoint, str(status)).inc()


class _TokenMeter:
    """Per token: `stoke_generated_tokens_total`, and for the first, `stoke_ttft_seconds`."""

    def __init__(self, metrics: Metrics, function: str, cold_start: bool, arrived: float) -> None:
        self.metrics, self.function, self.arrived = metrics, function, arrived
        self.cold_start = str(cold_start).lower()
        self.first_token: float | None = None

    def on_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
            self.metrics.record_ttft(
                self.function, self.cold_start, self.first_token - self.arrived
            )
        self.metrics.tokens.labels(self.function).inc()
