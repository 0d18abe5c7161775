"""OpenAI's `logprobs` documents, from the per-token log probabilities a node sends.

A token's text is the tokenizer's decoding of that token alone (special tokens included), and
`bytes` its UTF-8: a character split over several tokens shows as U+FFFD in each, as in vLLM.
There is one entry per generated token, `usage.completion_tokens` of them, including a token
that completed a stop string (whose text is not in the output).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from node_agent.proto import node_agent_pb2 as pb

TokenText = Callable[[int], str]
"""A token id's text."""

Entry = tuple[int, pb.TokenLogprobs | None]
"""A token and its log probabilities (None for an echoed prompt's first token, which has none:
nothing comes before it)."""


def chat_logprobs(entries: list[Entry], text_of: TokenText) -> dict[str, Any]:
    """`choices[].logprobs` of a chat completion (or of one chunk)."""
    return {
        "content": [
            {
                **_token(token_id, lp.logprob, text_of),
                "top_logprobs": [
                    _token(t, v, text_of) for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
                ],
            }
            for token_id, lp in entries
            if lp is not None  # chat echoes no prompt
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[Entry], text_of: TokenText, offset: int) -> dict[str, Any]:
    """`choices[].logprobs` of a text completion (or of one chunk); `offset` is where the first
    token's text starts in the completion's text."""
    tokens = [text_of(token_id) for token_id, _ in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [None if lp is None else lp.logprob for _, lp in entries],
        "top_logprobs": [
            None
            if lp is None
            else {text_of(t): v for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)}
            for _, lp in entries
        ],
        "text_offset": offsets,
    }


def _token(token_id: int, logprob: float, text_of: TokenText) -> dict[str, Any]:
    text = text_of(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
