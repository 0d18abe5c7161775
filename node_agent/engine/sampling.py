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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


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
