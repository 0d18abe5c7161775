"""Sampling parameters and a sampler that is deterministic per (seed, token position).

Each sampled token draws its randomness from a generator seeded by `mix(seed, position)`, not
from a stream shared across steps. So the token at position p depends only on the logits at p and
(seed, p): a request resumed on another node from its prompt + emitted ids continues as the
uninterrupted run would have, given the same logits. A resume recomputes the emitted tokens in
one prefill pass instead of one step each, which changes float rounding a little; in float32 that
has not flipped a token in the tests, while in bf16 a near-tie between two tokens could.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from node_agent.facts.errors import RequestError

_MASK64 = (1 << 64) - 1
MAX_TOP_LOGPROBS = 20
"""The most alternatives a token's log probabilities may list (OpenAI's chat limit)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    seed: int = field(default_factory=lambda: secrets.randbits(63))
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (vLLM's; benchmarks use it)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already in the output (OpenAI's, -2..2)."""
    frequency_penalty: float = 0.0
    """Subtracted once per occurrence of a token in the output (OpenAI's, -2..2)."""
    repetition_penalty: float = 1.0
    """vLLM's (> 0): the logit of a token in the prompt or output is divided by it when
    positive, multiplied when negative. 1 is off."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias in -100..100) pairs added to the logits before everything else."""
    min_tokens: int = 0
    """End-of-sequence tokens cannot be sampled before this many output tokens."""
    logprobs: int | None = None
    """Report each sampled token's log probability and this many top alternatives (0..20);
    None reports none."""
    prompt_logprobs: int | None = None
    """Report each prompt token's (after the first) log probability and this many top
    alternatives (0..20), with the first output token; None reports none. A resumed request
    (output ids given) reports none: its first run did."""
    response_format: str = ""
    """OpenAI's `response_format` as JSON (`json_object` or `json_schema`): the output is
    constrained to it (`node_agent.engine.grammar`). Empty: free text."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens={self.max_tokens} must be at least 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature={self.temperature} must be between 0 and 100")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise RequestError(f"top_k={self.top_k} must be 0 (disabled) or positive")
        if not 0 <= self.seed < 2**63:
            raise RequestError(f"seed={self.seed} must be in [0, 2**63)")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty")
        self._check_penalties()
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(
                f"min_tokens={self.min_tokens} must be between 0 and max_tokens={self.max_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise RequestError(
                    f"{name}={value} must be between 0 and {MAX_TOP_LOGPROBS} alternatives"
                )

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise RequestError(f"{name}={value} must be between -2 and 2")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise RequestError(
                f"repetition_penalty={self.repetition_penalty} must be in (0, 100]; 1 is off"
            )
        for token_id, bias in self.logit_bias:
            if token_id < 0:
                raise RequestError(f"logit_bias: token id {token_id} must be non-negative")
            if not -100.0 <= bias <= 100.0:
                raise RequestError(f"logit_bias[{token_id}]={bias} must be between -100 and 100")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalizes(self) -> bool:
        """Whether the logits need `node_agent.engine.logits.process` before sampling."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_seed(seed: int, position: int) -> int:
    """A well-mixed 63-bit generator seed for the token at `position` of a request."""
    return _splitmix64(seed ^ _splitmix64(position)) >> 1


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """Pick one token per row of logits ([B, vocab]); row i uses params[i] at positions[i].

    Sampling runs on the CPU whatever the model's device, so the random draws are the same on
    every node type.
    """
    logits = logits.float().cpu()
    greedy_ids = logits.argmax(dim=-1).tolist()
    return [
        greedy_ids[i] if p.greedy else _sample_row(logits[i], p, positions[i])
        for i, p in enumerate(params)
    ]


def _sample_row(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    # logits: [vocab], float32
    scaled = logits / params.temperature
    if params.top_k > 0 and params.top_k < scaled.shape[0]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p(probs, params.top_p)
    generator = torch.Generator()
    generator.manual_seed(position_seed(params.seed, position))
    # Exponential race (Gumbel-max): argmax(p / E) with E ~ Exp(1) samples from p exactly.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int(torch.argmax(probs / noise).item())


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always >= 1)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    drop_sorted = cumulative - sorted_probs >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return probs.masked_fill(drop, 0.0)
