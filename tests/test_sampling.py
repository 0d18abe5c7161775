"""Sampling: correct distributions, deterministic per (seed, position), validated params."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from node_agent.engine.sampling import SamplingParams, sample
from node_agent.facts.errors import RequestError

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def params(**overrides: Any) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": 7, **overrides})


def draws(p: SamplingParams, positions: range) -> list[int]:
    logits = PROBS.log().expand(len(positions), -1)
    return sample(logits, [p] * len(positions), list(positions))


def test_same_seed_and_position_give_the_same_token() -> None:
    assert draws(params(), range(100, 200)) == draws(params(), range(100, 200))


def test_token_depends_only_on_its_own_position_not_on_the_batch() -> None:
    batched = draws(params(), range(0, 64))
    one_by_one = [draws(params(), range(i, i + 1))[0] for i in range(64)]
    assert batched == one_by_one


def test_different_seeds_give_different_streams() -> None:
    assert draws(params(seed=1), range(64)) != draws(params(seed=2), range(64))


def test_empirical_frequencies_match_the_distribution() -> None:
    counts = Counter(draws(params(), range(8000)))
    for token, prob in enumerate(PROBS.tolist()):
        assert abs(counts[token] / 8000 - prob) < 0.02, (token, counts)


def test_top_k_never_samples_outside_the_k_most_likely() -> None:
    assert set(draws(params(top_k=2), range(2000))) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    assert set(draws(params(top_p=0.6), range(2000))) == {0, 1}


def test_low_temperature_sharpens_towards_the_mode() -> None:
    counts = Counter(draws(params(temperature=0.2), range(2000)))
    assert counts[0] / 2000 > 0.9


def test_temperature_zero_is_greedy() -> None:
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0]])
    assert sample(logits, [params(temperature=0.0)], [0]) == [1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_k": -3}, "top_k=-3"),
        ({"seed": -1}, "seed=-1"),
        ({"stop": ("",)}, "stop strings"),
    ],
)
def test_invalid_params_are_rejected_with_the_value_named(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(RequestError, match=message):
        params(**overrides)
