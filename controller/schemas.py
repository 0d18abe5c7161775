"""Request bodies of the OpenAI-compatible API (pydantic), and OpenAI's error shape.

The models declare the fields stoke honours; every other field lands in `model_extra` and is
judged by `controller.openai_fields`: accepted when it changes nothing OpenAI would return,
refused with a 400 naming it when stoke cannot do what it asks, refused as unrecognized when
neither endpoint documents it. Nothing is silently ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from controller.openai_fields import Endpoint, refusal

MAX_CHOICES = 16
"""The most choices (`n`, `best_of`) one request may ask for: they run side by side on one
instance, sharing its batch."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    endpoint: ClassVar[Endpoint]

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    """OpenAI's: subtracted from the logit of every token already in the output."""
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    """OpenAI's: subtracted once per occurrence of the token in the output."""
    logit_bias: dict[str, float] | None = None
    """Token id (a JSON object key, so a string) -> bias in -100..100, added to its logit."""
    top_k: int | None = Field(default=None, ge=-1)
    """vLLM's: sample among the k most likely tokens; 0 or -1 is off."""
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0)
    """vLLM's: logits of tokens in the prompt or output divided by it (multiplied if negative)."""
    min_tokens: int | None = Field(default=None, ge=0)
    """vLLM's: no end-of-sequence token before this many output tokens."""
    ignore_eos: bool = False
    """vLLM's: keep generating past end-of-sequence tokens, up to max_tokens."""
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    """Choices to return, from one prompt computed once (`controller.api.choices`)."""

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def token_bias(self) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as (token id, bias) pairs sorted by id; ValueError names a bad entry."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias: key {key!r} is not a token id")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias: {key}: {bias} is not between -100 and 100")
            pairs.append((int(key), float(bias)))
        return tuple(sorted(pairs))

    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives each token's log probabilities list; None: no logprobs."""
        raise NotImplementedError

    def generations(self) -> int:
        """How many outputs to generate (`best_of`), of which `n` are returned."""
        return self.n

    def unsupported(self) -> tuple[str, str] | None:
        """The first field stoke cannot honour, as (field, error message); None if none."""
        if isinstance(self.stop, list) and len(self.stop) > 4:
            return "stop", "stop: at most 4 stop sequences."
        try:
            self.token_bias()
        except ValueError as exc:
            return "logit_bias", str(exc)
        return refusal(self.endpoint, self.model_extra or {})


class CompletionRequest(_Sampling):
    endpoint: ClassVar[Endpoint] = Endpoint.COMPLETIONS
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    """Each token's log probability and this many most likely alternatives."""
    echo: bool = False
    """The prompt before each choice's text (and, with `logprobs`, its tokens' too)."""
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    """Generate this many and return the `n` with the highest cumulative log probability
    (OpenAI's; not streamable when over `n`)."""

    @model_validator(mode="after")
    def _best_of_covers_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise ValueError("best_of over n cannot be streamed: the best are known at the end")
        return self

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def generations(self) -> int:
        return self.best_of or self.n

    def prompt_input(self) -> str | list[int]:
        """The prompt as text or token ids (a batch of several prompts is refused upstream)."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return str(self.prompt[0])
        return self.prompt  # type: ignore[return-value]

    def prompt_count(self) -> int:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return len(self.prompt)
        return 1


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    endpoint: ClassVar[Endpoint] = Endpoint.CHAT
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    """Each output token's log probability (in `choices[].logprobs.content`)."""
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    """With `logprobs`: this many most likely alternatives per token."""
    response_format: dict[str, Any] | None = None
    """`{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"schema": ...}}`:
    the output is constrained to it (`node_agent.facts.response_format`)."""

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error document."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
