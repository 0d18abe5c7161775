"""A generation request and the engine's mutable state for it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from node_agent.engine.detokenizer import IncrementalDetokenizer
from node_agent.engine.grammar import Matcher
from node_agent.engine.sampling import SamplingParams


@dataclass(frozen=True)
class Request:
    """What to generate. `output_ids` are tokens already generated elsewhere (a resume).

    A resumed request continues exactly where the original left off: its prompt + output_ids
    are recomputed, and sampling continues at the next position with the same seed.
    `params.max_tokens` counts all output tokens, the resumed ones included.
    """

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    output_ids: tuple[int, ...] = ()
    prefix_from: str | None = None
    """Another request with the same prompt (a sibling choice of `n` > 1): when it runs on this
    engine with its prompt computed, its K/V for the prompt are copied instead of recomputed."""


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS token or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the engine failed while running it
    HANDED_OVER = "handed_over"  # stopped after a token, for a live migration's hand-over


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log probability under the model, and the most likely tokens' (id,
    log probability), most likely first (see `node_agent.engine.logprobs`)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """One step of one request's stream: a token (None for abort/error) and its text delta."""

    request_id: str
    token_id: int | None
    text: str
    finish_reason: FinishReason | None = None
    error: str | None = None
    prefilled: int | None = None
    """For a held sequence (an incoming migration): this many known tokens, all in the KV
    cache. No token, no text, not finished."""
    logprobs: TokenLogprobs | None = None
    """The token's log probabilities, when the request asked for them (`params.logprobs`)."""
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()
    """With a request's first output token, when it asked (`params.prompt_logprobs`): one per
    prompt token after the first."""


@dataclass
class Sequence:
    """The engine's working state for one request."""

    request: Request
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    slot: int | None = None  # KV pool slot while running
    finish_reason: FinishReason | None = None
    held: bool = False
    """Prefill only: the last known token is never run, so nothing is sampled or emitted (the
    destination of a live migration catching up while the source keeps decoding)."""
    reported: int = 0  # a held sequence: known tokens at its last `prefilled` event
    stop_after: int | None = None  # finish HANDED_OVER once this many outputs are emitted
    matcher: Matcher | None = None
    """Where the output stands in its `response_format`'s grammar (None: free text)."""
    prompt_logprobs: list[TokenLogprobs] | None = None
    """Collected while the prompt is computed, when the request asked for them (and is not a
    resume); given out with the first output token."""

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = [*self.request.prompt_ids, *self.request.output_ids]
        if self.request.params.prompt_logprobs is not None and not self.request.output_ids:
            self.prompt_logprobs = []

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - len(self.request.prompt_ids)

    @property
    def num_pending(self) -> int:
        """Known tokens not yet run through the model (prompt chunks, or the last sample)."""
        return len(self.token_ids) - self.num_computed

    @property
    def runnable(self) -> int:
        """Tokens the scheduler may run now: all pending ones (a held sequence's too: it runs
        every known token, so that its release needs only the source's last one)."""
        return self.num_pending

    @property
    def caught_up(self) -> bool:
        """A held sequence with every known token computed, not yet told."""
        return self.held and self.num_pending == 0 and self.reported != len(self.token_ids)
