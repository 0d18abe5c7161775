"""Prompt log probabilities (OpenAI's `echo` with `logprobs`) and sibling choices sharing a
prompt's K/V (`n` > 1), on the engine: compared with `transformers`' log-softmax on the same
weights, and with the same choices computed independently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from engine_fixtures import ids, run

from node_agent.engine import EngineConfig, LLMEngine, Request, SamplingParams, load_engine

PROMPT = (11, 42, 7, 300, 5, 5, 9, 42, 17, 230, 4, 99, 18, 3, 250, 61, 8, 12, 77, 5)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    # a step of 8 tokens: the 20-token prompt is computed in three chunks
    return load_engine(tiny_model_dir, config=EngineConfig(max_batch_size=8, max_step_tokens=8))


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.eval()


def params(**options: Any) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 12, "temperature": 0.0, "ignore_eos": True, **options})


def test_prompt_logprobs_equal_transformers_log_softmax_over_chunked_prefill(
    engine: LLMEngine, hf_model: Any
) -> None:
    events = run(engine, Request("echo", PROMPT, params(prompt_logprobs=3)))["echo"]
    scored = events[0].prompt_logprobs
    assert len(scored) == len(PROMPT) - 1, "one per prompt token after the first"
    assert all(e.prompt_logprobs == () for e in events[1:]), "given once, with the first token"
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([PROMPT])).logits[0].float(), dim=-1)
    for position, lp in enumerate(scored, start=1):
        row = reference[position - 1]
        assert lp.logprob == pytest.approx(row[PROMPT[position]].item(), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_prompt_logprobs_leave_the_output_unchanged_and_a_resume_reports_none(
    engine: LLMEngine,
) -> None:
    events = run(
        engine,
        Request("plain", PROMPT, params()),
        Request("scored", PROMPT, params(prompt_logprobs=0)),
    )
    assert ids(events["plain"]) == ids(events["scored"])
    assert events["plain"][0].prompt_logprobs == ()
    assert all(lp.top == () for lp in events["scored"][0].prompt_logprobs)
    done = tuple(ids(events["plain"])[:4])
    resumed = run(engine, Request("resumed", PROMPT, params(prompt_logprobs=2), done))["resumed"]
    assert all(e.prompt_logprobs == () for e in resumed)
    assert list(done) + ids(resumed) == ids(events["plain"])


def test_sibling_choices_copy_the_prompt_and_sample_as_independent_requests(
    engine: LLMEngine,
) -> None:
    """Four choices of one prompt, sampled with seeds 7..10: the three siblings copy the
    first's prompt K/V (counted), and every choice's tokens equal the same request run alone."""
    sampled = {"temperature": 0.9, "top_p": 0.95}
    choices = [
        Request(
            f"c{i}", PROMPT, params(seed=7 + i, **sampled), prefix_from=None if i == 0 else "c0"
        )
        for i in range(4)
    ]
    before = engine.prompt_tokens_copied
    together = run(engine, *choices)
    assert engine.prompt_tokens_copied - before == 3 * (len(PROMPT) - 1)
    for i in range(4):
        alone = run(engine, Request(f"alone{i}", PROMPT, params(seed=7 + i, **sampled)))
        assert ids(together[f"c{i}"]) == ids(alone[f"alone{i}"]), f"choice {i}"
    assert len({tuple(ids(together[f"c{i}"])) for i in range(4)}) > 1, "the seeds differ"


def test_a_sibling_with_another_prompt_or_absent_source_computes_its_own(
    engine: LLMEngine,
) -> None:
    other = (*PROMPT[:-1], 123)
    before = engine.prompt_tokens_copied
    events = run(
        engine,
        Request("src", PROMPT, params()),
        Request("different", other, params(), prefix_from="src"),
        Request("orphan", PROMPT, params(), prefix_from="gone"),
    )
    assert engine.prompt_tokens_copied == before
    assert ids(events["orphan"]) == ids(events["src"])
    alone = run(engine, Request("other-alone", other, params()))
    assert ids(events["different"]) == ids(alone["other-alone"])
