"""Penalties, logit_bias, min_tokens, ignore_eos and logprobs in the engine: the same tokens as
a straightforward reference on `transformers`' logits for the same weights, log probabilities
equal to its log-softmax, and a request cut anywhere and resumed (or migrated) from its recorded
ids continues exactly as the uninterrupted one did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from engine_fixtures import ids, run

from node_agent.engine import LLMEngine, Request, SamplingParams, load_engine
from node_agent.engine.logits import process
from node_agent.engine.sequence import FinishReason, TokenEvent
from node_agent.facts.errors import RequestError

PROMPT = (11, 42, 7, 300, 5, 5, 9, 42)
MAX_TOKENS = 24

OPTIONS: dict[str, dict[str, Any]] = {
    "presence": {"presence_penalty": 1.5},
    "frequency": {"frequency_penalty": 1.2},
    "negative-frequency": {"frequency_penalty": -0.8},
    "repetition": {"repetition_penalty": 1.8},
    "logit-bias": {"logit_bias": ((42, 4.0), (7, -100.0), (612, 2.5))},
    "all": {
        "presence_penalty": 0.7,
        "frequency_penalty": 0.4,
        "repetition_penalty": 1.3,
        "logit_bias": ((300, 3.0),),
        "min_tokens": 5,
    },
}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    return load_engine(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.eval()


def request(name: str, output_ids: tuple[int, ...] = (), **params: Any) -> Request:
    defaults: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    return Request(name, PROMPT, SamplingParams(**{**defaults, **params}), output_ids)


def reference_logits(
    logits: list[float], ids_so_far: list[int], prompt_len: int, options: dict[str, Any]
) -> list[float]:
    """OpenAI's and vLLM's definitions, written out one token at a time."""
    out = list(logits)
    for token_id, bias in options.get("logit_bias", ()):
        out[token_id] += bias
    outputs = ids_so_far[prompt_len:]
    rep = options.get("repetition_penalty", 1.0)
    for token_id in set(ids_so_far):
        out[token_id] = out[token_id] / rep if out[token_id] > 0 else out[token_id] * rep
    for token_id in set(outputs):
        out[token_id] -= options.get("frequency_penalty", 0.0) * outputs.count(token_id)
        out[token_id] -= options.get("presence_penalty", 0.0)
    return out


def hf_greedy(hf_model: Any, options: dict[str, Any], eos: frozenset[int]) -> list[int]:
    """Greedy decoding on transformers' logits, whole sequence each step, options applied."""
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logits = hf_model(torch.tensor([seq])).logits[0, -1].tolist()
            logits = reference_logits(logits, seq, len(PROMPT), options)
            if len(seq) - len(PROMPT) < options.get("min_tokens", 0):
                for token_id in eos:
                    logits[token_id] = float("-inf")
            seq.append(max(range(len(logits)), key=logits.__getitem__))
    return seq[len(PROMPT) :]


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_greedy_tokens_match_a_reference_on_transformers_logits(
    engine: LLMEngine, hf_model: Any, options: dict[str, Any]
) -> None:
    plain = ids(run(engine, request("plain"))["plain"])
    ours = ids(run(engine, request("opt", **options))["opt"])
    assert ours == hf_greedy(hf_model, options, engine.tokenizer.eos_token_ids)
    assert ours != plain, "the option changed nothing: the test would not see it ignored"


def test_process_matches_the_reference_row_by_row() -> None:
    torch.manual_seed(0)
    logits = torch.randn(len(OPTIONS) + 1, 1024) * 3
    token_ids = [[1, 2, 3, 3, 4, 9, 9, 9, 2], *([[5, 6, 1, 1, 1, 7, 6]] * len(OPTIONS))]
    params = [SamplingParams(), *(SamplingParams(**o) for o in OPTIONS.values())]
    options: list[dict[str, Any]] = [{}, *OPTIONS.values()]
    out = process(logits, params, token_ids, [4] * len(params), eos_ids=())
    for row, opts in enumerate(options):
        expected = reference_logits(logits[row].tolist(), token_ids[row], 4, opts)
        torch.testing.assert_close(out[row], torch.tensor(expected), rtol=0, atol=1e-5)
    assert out is not logits and not torch.equal(out, logits)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("cut", [1, 9])
def test_a_request_resumed_from_its_ids_continues_identically(
    engine: LLMEngine, options: dict[str, Any], cut: int
) -> None:
    sampled = {"temperature": 0.9, "seed": 4321, "logprobs": 2, **options}
    full = run(engine, request("full", **sampled))["full"]
    resumed = run(engine, request("resumed", tuple(ids(full[:cut])), **sampled))["resumed"]
    assert ids(full[:cut]) + ids(resumed) == ids(full)
    assert flat(resumed) == pytest.approx(flat(full[cut:]), abs=1e-5)


def flat(events: list[TokenEvent]) -> list[float]:
    """Each event's log probability, then its alternatives' ids and log probabilities."""
    out: list[float] = []
    for event in events:
        assert event.logprobs is not None
        out += [event.logprobs.logprob, *(x for pair in event.logprobs.top for x in pair)]
    return out


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_a_migrated_request_continues_identically(
    engine: LLMEngine, options: dict[str, Any]
) -> None:
    sampled = {"temperature": 0.9, "seed": 99, **options}
    full = ids(run(engine, request("full", **sampled))["full"])
    seq = engine.validate(request("m", tuple(full[:4]), **sampled))
    seq.held = True
    engine.add(seq)
    run(engine)
    engine.extend("m", full[4:10], release=True)
    rest: list[int] = []
    while engine.has_work():
        rest += ids(engine.step())
    assert full[:10] + rest == full


def test_logprobs_equal_transformers_log_softmax(engine: LLMEngine, hf_model: Any) -> None:
    events = run(engine, request("lp", logprobs=5, frequency_penalty=1.0, temperature=0.7))["lp"]
    seq = list(PROMPT) + ids(events)
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([seq])).logits[0].float(), dim=-1)
    for step, event in enumerate(events):
        row = reference[len(PROMPT) - 1 + step]
        assert event.logprobs is not None and event.token_id is not None
        assert event.logprobs.logprob == pytest.approx(row[event.token_id].item(), abs=1e-4)
        top = torch.topk(row, 5)
        assert [t for t, _ in event.logprobs.top] == top.indices.tolist()
        assert [v for _, v in event.logprobs.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_logprobs_zero_reports_the_token_alone_and_none_reports_nothing(
    engine: LLMEngine,
) -> None:
    events = run(engine, request("zero", logprobs=0), request("none"))
    assert all(e.logprobs is not None and e.logprobs.top == () for e in events["zero"])
    assert all(e.logprobs is None for e in events["none"])


def test_min_tokens_holds_back_eos_and_ignore_eos_runs_to_max_tokens(engine: LLMEngine) -> None:
    eos = min(engine.tokenizer.eos_token_ids)
    to_eos: dict[str, Any] = {"ignore_eos": False, "logit_bias": ((eos, 100.0),)}
    events = run(
        engine,
        request("eager", **to_eos),
        request("min", min_tokens=6, **to_eos),
        request("ignore", **{**to_eos, "ignore_eos": True}),
    )
    assert ids(events["eager"]) == [eos] and events["eager"][-1].finish_reason is FinishReason.STOP
    assert len(ids(events["min"])) == 7 and ids(events["min"])[-1] == eos
    assert eos not in ids(events["min"])[:6]
    assert len(ids(events["ignore"])) == MAX_TOKENS
    assert events["ignore"][-1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize(
    "bad",
    [
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"repetition_penalty": 0.0},
        {"logit_bias": ((5, 101.0),)},
        {"min_tokens": MAX_TOKENS + 1},
        {"logprobs": 21},
    ],
)
def test_out_of_range_options_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(RequestError, match=next(iter(bad))):
        SamplingParams(max_tokens=MAX_TOKENS, **bad)


def test_a_logit_bias_past_the_vocabulary_is_refused(engine: LLMEngine) -> None:
    vocab = engine.loaded.config.vocab_size
    with pytest.raises(RequestError, match=f"logit_bias: token id {vocab}"):
        engine.validate(request("far", logit_bias=((vocab, 1.0),)))
