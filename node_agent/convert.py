"""Thin converters between wire messages (protobuf) and the engine's dataclasses.

Only the instance process uses the engine-side half (it imports torch via the engine); the
agent relays generation messages verbatim.
"""

from __future__ import annotations

from node_agent.engine.sampling import SamplingParams
from node_agent.engine.sequence import FinishReason, Request, TokenEvent, TokenLogprobs
from node_agent.proto import node_agent_pb2 as pb

_FINISH_TO_PB: dict[FinishReason, pb.FinishReason] = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
    FinishReason.HANDED_OVER: pb.FINISH_REASON_HANDED_OVER,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}


def params_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Wire sampling parameters -> `SamplingParams` (validated; raises `RequestError`).

    `top_p` and `repetition_penalty` 0 on the wire mean "unset" (proto3 has no presence for
    scalars): 1.0. `logit_bias` is sorted by token id (a map has no order).
    """
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p or 1.0,
        top_k=msg.top_k,
        seed=msg.seed,
        stop=tuple(msg.stop),
        ignore_eos=msg.ignore_eos,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty or 1.0,
        logit_bias=tuple(sorted(msg.logit_bias.items())),
        min_tokens=msg.min_tokens,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        response_format=msg.response_format,
    )


def params_to_pb(params: SamplingParams) -> pb.SamplingParams:
    """`SamplingParams` -> wire message."""
    return pb.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        stop=list(params.stop),
        ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logit_bias=dict(params.logit_bias),
        min_tokens=params.min_tokens,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        response_format=params.response_format,
    )


def request_from_pb(msg: pb.GenerateRequest) -> Request:
    """Wire generation request -> engine `Request` (raises `RequestError` if invalid)."""
    return Request(
        request_id=msg.request_id,
        prompt_ids=tuple(msg.prompt_ids),
        params=params_from_pb(msg.params),
        output_ids=tuple(msg.output_ids),
        prefix_from=msg.prefix_from or None,
    )


def request_to_pb(request: Request, instance_id: str = "") -> pb.GenerateRequest:
    """Engine `Request` -> wire message addressed to `instance_id`."""
    return pb.GenerateRequest(
        instance_id=instance_id,
        request_id=request.request_id,
        prompt_ids=list(request.prompt_ids),
        params=params_to_pb(request.params),
        output_ids=list(request.output_ids),
        prefix_from=request.prefix_from or "",
    )


def event_to_pb(event: TokenEvent) -> pb.TokenEvent:
    """Engine `TokenEvent` -> wire message (the request id is implied by the stream)."""
    return pb.TokenEvent(
        has_token=event.token_id is not None,
        token_id=event.token_id or 0,
        text=event.text,
        finish_reason=_FINISH_TO_PB.get(event.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        if event.finish_reason is not None
        else pb.FINISH_REASON_UNSPECIFIED,
        error=event.error or "",
        logprobs=logprobs_to_pb(event.logprobs) if event.logprobs is not None else None,
        prompt_logprobs=[logprobs_to_pb(lp) for lp in event.prompt_logprobs],
    )


def logprobs_to_pb(logprobs: TokenLogprobs) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(
        logprob=logprobs.logprob,
        top_ids=[t for t, _ in logprobs.top],
        top_logprobs=[lp for _, lp in logprobs.top],
    )


def logprobs_from_pb(msg: pb.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(msg.logprob, tuple(zip(msg.top_ids, msg.top_logprobs, strict=True)))


def event_from_pb(msg: pb.TokenEvent, request_id: str) -> TokenEvent:
    """Wire message -> engine `TokenEvent` for `request_id`."""
    return TokenEvent(
        request_id=request_id,
        token_id=msg.token_id if msg.has_token else None,
        text=msg.text,
        finish_reason=_FINISH_FROM_PB.get(msg.finish_reason),
        error=msg.error or None,
        logprobs=logprobs_from_pb(msg.logprobs) if msg.HasField("logprobs") else None,
        prompt_logprobs=tuple(logprobs_from_pb(lp) for lp in msg.prompt_logprobs),
    )
