"""Every request field OpenAI documents for `/v1/completions` and `/v1/chat/completions`, and
what stoke does with it: honoured, accepted (it changes nothing OpenAI would return: bookkeeping
on OpenAI's side), or refused with a 400 naming it. Nothing is silently ignored: a field in no
list is refused too, as OpenAI refuses "unrecognized request arguments".

This table is the one source of truth: the request models in `controller.schemas` declare
exactly the honoured fields (a test checks it), the README's table is generated from it
(`python -m controller.openai_fields`), and a test walks the fields the official `openai`
client knows and finds each one here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class Support(enum.StrEnum):
    HONOURED = "honoured"
    ACCEPTED = "accepted"  # no effect on the output, and none expected
    REFUSED = "refused"  # 400 unless set to a neutral value (null, false, [], the default)


class Endpoint(enum.StrEnum):
    COMPLETIONS = "completions"
    CHAT = "chat"


BOTH = frozenset(Endpoint)
COMPLETIONS = frozenset({Endpoint.COMPLETIONS})
CHAT = frozenset({Endpoint.CHAT})


@dataclass(frozen=True)
class FieldRule:
    """One field: where it is documented, what stoke does with it, and why."""

    endpoints: frozenset[Endpoint]
    support: Support
    note: str
    neutral: tuple[Any, ...] = ()
    """Values of a refused (or accepted) field that ask for nothing stoke lacks; null, false,
    an empty list and an empty object always are."""
    vllm: bool = False
    """An extension vLLM's OpenAI server takes, not in OpenAI's documentation."""


_H, _A, _R = Support.HONOURED, Support.ACCEPTED, Support.REFUSED

FIELDS: dict[str, FieldRule] = {
    "model": FieldRule(BOTH, _H, "the deployed function's name"),
    "prompt": FieldRule(COMPLETIONS, _H, "text, a list with one text, or token ids"),
    "messages": FieldRule(CHAT, _H, "rendered with the model's chat template; text parts only"),
    "max_tokens": FieldRule(BOTH, _H, "default: the function's `generation.max_tokens`"),
    "max_completion_tokens": FieldRule(CHAT, _H, "wins over `max_tokens`"),
    "temperature": FieldRule(BOTH, _H, "0..2; 0 is greedy"),
    "top_p": FieldRule(BOTH, _H, "(0, 1]"),
    "seed": FieldRule(BOTH, _H, "with the token's position, fixes every draw (also on resume)"),
    "stop": FieldRule(BOTH, _H, "up to 4 strings; not included in the output"),
    "stream": FieldRule(BOTH, _H, "server-sent events, ending in `data: [DONE]`"),
    "stream_options": FieldRule(BOTH, _H, "`include_usage`"),
    "presence_penalty": FieldRule(BOTH, _H, "-2..2, on output tokens"),
    "frequency_penalty": FieldRule(BOTH, _H, "-2..2, per occurrence in the output"),
    "logit_bias": FieldRule(BOTH, _H, "token id -> -100..100"),
    "logprobs": FieldRule(
        BOTH, _H, "completions: 0..5 alternatives; chat: true/false (with `top_logprobs`)"
    ),
    "top_logprobs": FieldRule(CHAT, _H, "0..20 alternatives per token; needs `logprobs: true`"),
    "n": FieldRule(
        BOTH, _H, "1..16 choices; the prompt computed once; choice i samples with seed + i"
    ),
    "best_of": FieldRule(
        COMPLETIONS, _H, "n..16 generated, the n of highest cumulative logprob returned"
    ),
    "echo": FieldRule(COMPLETIONS, _H, "the prompt before each choice; with `logprobs`, its own"),
    "suffix": FieldRule(COMPLETIONS, _R, "no insertion (fill-in-the-middle) mode"),
    "response_format": FieldRule(
        CHAT, _H, "`text`, `json_object` or `json_schema`: constrained decoding (llguidance)"
    ),
    "tools": FieldRule(CHAT, _R, "no tool calling"),
    "tool_choice": FieldRule(CHAT, _R, "no tool calling", neutral=("none",)),
    "parallel_tool_calls": FieldRule(CHAT, _A, "no effect without `tools` (refused)"),
    "functions": FieldRule(CHAT, _R, "no function calling (deprecated by OpenAI)"),
    "function_call": FieldRule(CHAT, _R, "no function calling", neutral=("none",)),
    "audio": FieldRule(CHAT, _R, "text output only"),
    "modalities": FieldRule(CHAT, _R, "text output only", neutral=(["text"],)),
    "prediction": FieldRule(CHAT, _R, "no predicted outputs"),
    "reasoning_effort": FieldRule(CHAT, _R, "not a reasoning-effort model"),
    "verbosity": FieldRule(CHAT, _R, "no verbosity control"),
    "web_search_options": FieldRule(CHAT, _R, "no web search"),
    "moderation": FieldRule(CHAT, _R, "no moderation"),
    "store": FieldRule(CHAT, _R, "stoke stores no completions", neutral=(False,)),
    "user": FieldRule(BOTH, _A, "an end-user id for OpenAI's abuse monitoring"),
    "safety_identifier": FieldRule(CHAT, _A, "an end-user id for OpenAI's abuse monitoring"),
    "metadata": FieldRule(BOTH, _A, "tags for stored completions; nothing is stored"),
    "service_tier": FieldRule(CHAT, _A, "every request gets the same service"),
    "prompt_cache_key": FieldRule(CHAT, _A, "a prompt-cache routing hint"),
    "prompt_cache_options": FieldRule(CHAT, _A, "a prompt-cache hint"),
    "prompt_cache_retention": FieldRule(CHAT, _A, "a prompt-cache hint"),
    "top_k": FieldRule(BOTH, _H, "sample among the k most likely; 0 or -1 is off", vllm=True),
    "repetition_penalty": FieldRule(
        BOTH, _H, "> 0; logits of tokens in the prompt or output divided by it", vllm=True
    ),
    "min_tokens": FieldRule(BOTH, _H, "no end-of-sequence token before this many", vllm=True),
    "ignore_eos": FieldRule(BOTH, _H, "generate up to `max_tokens` whatever", vllm=True),
}


def refusal(endpoint: Endpoint, fields: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first of `fields` (a body's fields outside its request model) that stoke cannot
    honour, as (field name, error message); None when every one may be accepted."""
    for name, value in fields.items():
        rule = FIELDS.get(name)
        if rule is None or endpoint not in rule.endpoints:
            where = "/v1/chat/completions" if endpoint is Endpoint.CHAT else "/v1/completions"
            return name, f"Unrecognized request argument supplied: {name} (not a {where} field)."
        if rule.support is Support.REFUSED and not _neutral(rule, value):
            return name, f"{name}: not supported by stoke ({rule.note}); leave it unset."
    return None


def _neutral(rule: FieldRule, value: Any) -> bool:
    # by type as well as value: `n: true` is not `n: 1`, nor `best_of: 0` false
    return any(
        type(value) is type(ok) and value == ok for ok in (None, False, [], {}, *rule.neutral)
    )


def markdown_table() -> str:
    """The README's table of fields (regenerate it with `python -m controller.openai_fields`)."""
    lines = ["| field | completions | chat | stoke | notes |", "|---|---|---|---|---|"]
    for name, rule in FIELDS.items():
        marks = ["yes" if e in rule.endpoints else "" for e in Endpoint]
        label = f"`{name}`" + (" (vLLM)" if rule.vllm else "")
        lines.append(f"| {label} | {marks[0]} | {marks[1]} | {rule.support} | {rule.note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
