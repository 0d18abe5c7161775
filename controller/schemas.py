"""Request bodies of the OpenAI-compatible API (pydantic), and OpenAI's error shape.

Unknown fields are accepted and ignored, as OpenAI's own server does for fields it has
retired, so newer clients keep working; fields stoke cannot honour (n > 1, logprobs, echo,
best_of > 1, suffix, tools) are refused with a message rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def unsupported(self) -> str | None:
        """The first field set to something stoke does not do, as an error message."""
        if self.n != 1:
            return "n: stoke returns one choice per request; send n=1 (or several requests)."
        if isinstance(self.stop, list) and len(self.stop) > 4:
            return "stop: at most 4 stop sequences."
        extra = self.model_extra or {}
        for key in ("logprobs", "top_logprobs", "tools", "functions", "suffix"):
            if extra.get(key) not in (None, False, [], 0):
                return f"{key}: not supported by stoke; leave it unset."
        if extra.get("echo"):
            return "echo: not supported by stoke; leave it unset."
        if extra.get("best_of") not in (None, 1):
            return "best_of: not supported by stoke; leave it unset or 1."
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]

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
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error document."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
