"""Faults and corners of `n`/`best_of`/`echo` and `response_format` on the engine side: sibling
choices sharing a prompt as the node runs them (through `AsyncEngine`), a live migration's
destination of an echoed request, the KV pool's zero invariant after copies, a sibling whose
source waits for a slot, and a resumed request whose output already completed its document."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from engine_fixtures import ids, run

from controller.api import choices
from controller.api.responses import collect
from node_agent.convert import event_to_pb
from node_agent.engine import EngineConfig, LLMEngine, Request, SamplingParams, load_engine
from node_agent.engine.async_engine import AsyncEngine
from node_agent.engine.sequence import FinishReason, TokenEvent
from node_agent.facts.response_format import normalized
from node_agent.proto import node_agent_pb2 as pb

PROMPT = (11, 42, 7, 300, 5, 5, 9, 42, 17, 230, 4, 99, 18, 3, 250, 61, 8, 12, 77, 5)


def params(**options: Any) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 12, "temperature": 0.0, "ignore_eos": True, **options})


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    # 8 tokens a step: the 20-token prompt takes three steps, so a sibling has to wait
    return load_engine(tiny_model_dir, config=EngineConfig(max_batch_size=4, max_step_tokens=8))


# -- prefix sharing as the node runs it --------------------------------------------------------


def test_siblings_share_the_prompt_through_the_async_engine(tiny_model_dir: Path) -> None:
    """The node runs requests through `AsyncEngine`, which renames each to `<id>#<n>`
    internally; `prefix_from` names the caller's id, so the sibling must still find its
    source there and copy its prompt K/V (as `LLMEngine` alone does)."""
    llm = load_engine(tiny_model_dir, config=EngineConfig(max_batch_size=4, max_step_tokens=8))
    front = AsyncEngine(llm)

    async def both() -> list[list[int]]:
        async def one(request: Request) -> list[int]:
            return [e.token_id async for e in front.generate(request) if e.token_id is not None]

        first = asyncio.ensure_future(one(Request("r-0", PROMPT, params(seed=1))))
        second = asyncio.ensure_future(
            one(Request("r-1", PROMPT, params(seed=2), prefix_from="r-0"))
        )
        return list(await asyncio.gather(first, second))

    try:
        outputs = asyncio.run(both())
    finally:
        front.stop()
    assert all(len(o) == 12 for o in outputs)
    assert llm.prompt_tokens_copied == len(PROMPT) - 1, "the sibling computed the prompt again"


# -- an echoed request's live migration --------------------------------------------------------


def test_a_migration_destination_does_not_report_the_prompt_logprobs_twice(
    engine: LLMEngine,
) -> None:
    """An echo+logprobs request migrated before its first token: the source gives the prompt's
    log probabilities with its first token; the destination (held, then released after that
    token) must not give them again, or `collect` holds two sets and the echoed choice cannot
    be built (zip(strict=True) over prompt tokens)."""
    request = Request("moving", PROMPT, params(prompt_logprobs=1, logprobs=1))
    source = run(engine, request)["moving"]
    assert len(source[0].prompt_logprobs) == len(PROMPT) - 1
    # the destination, as `Migrate` begins it: the request as it was (no output yet), held
    dest = engine.validate(Request("moving-dest", PROMPT, params(prompt_logprobs=1, logprobs=1)))
    dest.held = True
    engine.add(dest)
    events: list[TokenEvent] = []
    while not any(e.prefilled is not None for e in events):
        events += engine.step()
    engine.extend("moving-dest", [source[0].token_id or 0], release=True)
    while engine.has_work():
        events += engine.step()
    tokens = [e for e in events if e.token_id is not None]
    assert ids(tokens) == ids(source[1:]), "the destination goes on as the source would"

    # what the controller collects: the source's first token, then the destination's
    async def stream() -> AsyncIterator[pb.TokenEvent]:
        for event in [source[0], *tokens]:
            message = event_to_pb(event)
            if message.finish_reason == pb.FINISH_REASON_UNSPECIFIED or event is tokens[-1]:
                yield message

    collected = asyncio.run(collect(stream(), lambda: None))  # type: ignore[arg-type]
    assert len(collected.prompt_entries) == len(PROMPT) - 1, "prompt log probabilities twice"
    asked = choices.Asked(n=1, generations=1, logprobs=1, echo="the prompt")
    echoed = choices._echoed(collected, asked, list(PROMPT))
    assert len(echoed.entries) == len(PROMPT) + 12


# -- the scheduler and the KV pool -------------------------------------------------------------


def test_a_sibling_behind_a_source_waiting_for_the_only_slot_runs_and_the_pool_ends_zeroed(
    tiny_model_dir: Path,
) -> None:
    """One slot: the source takes it, the sibling waits (no spin), then runs once the source
    has left (computing the prompt itself); both equal their runs alone, and every position
    of the pool is zero again (the invariant batched attention relies on)."""
    one = load_engine(tiny_model_dir, config=EngineConfig(max_batch_size=1, max_step_tokens=8))
    together = run(
        one,
        Request("s", PROMPT, params(seed=3, temperature=0.8)),
        Request("t", PROMPT, params(seed=4, temperature=0.8), prefix_from="s"),
    )
    alone = run(one, Request("t-alone", PROMPT, params(seed=4, temperature=0.8)))
    assert ids(together["t"]) == ids(alone["t-alone"])
    assert len(ids(together["s"])) == 12
    assert one.kv.data.abs().sum().item() == 0


def test_copied_prompts_leave_the_pool_zeroed_and_outputs_unchanged(engine: LLMEngine) -> None:
    """Four siblings copying the source's prompt, one aborted midway: after all of them the
    pool is all zeros (each copy's positions are cleared with its sequence)."""
    reqs = [
        Request(f"k{i}", PROMPT, params(seed=20 + i, temperature=0.9, max_tokens=6 + i),
                prefix_from=None if i == 0 else "k0")
        for i in range(4)
    ]  # fmt: skip
    before = engine.prompt_tokens_copied
    for req in reqs:
        engine.add(engine.validate(req))
    events: list[TokenEvent] = []
    aborted = None
    while engine.has_work():
        events += engine.step()
        if aborted is None and len(ids([e for e in events if e.request_id == "k2"])) == 2:
            aborted = engine.abort("k2")
            assert aborted is not None and aborted.finish_reason is FinishReason.ABORT
    assert aborted is not None
    assert engine.prompt_tokens_copied - before == 3 * (len(PROMPT) - 1)
    assert engine.kv.data.abs().sum().item() == 0


# -- response_format -----------------------------------------------------------------------------


def test_a_resume_after_the_document_is_complete_stops_at_once_without_failing_others(
    engine: LLMEngine,
) -> None:
    """Output ids that already complete the document (and min_tokens past them, which bans
    EOS, the only token the grammar still allows): the request stops with STOP at its first
    step, and an unconstrained request in the same batch is untouched."""
    fmt = normalized({"type": "json_object"})
    options = {"temperature": 0.9, "seed": 1, "ignore_eos": False, "response_format": fmt}
    first = run(engine, Request("doc", PROMPT, params(max_tokens=200, **options)))
    done = ids(first["doc"])
    assert first["doc"][-1].finish_reason is FinishReason.STOP
    resumed = Request("again", PROMPT, params(max_tokens=len(done) + 5, min_tokens=len(done) + 3,
                                              response_format=fmt), tuple(done))  # fmt: skip
    free = Request("free", PROMPT, params(max_tokens=5))
    events = run(engine, resumed, free)
    assert [e.finish_reason for e in events["again"]] == [FinishReason.STOP]
    assert all(e.error is None for e in events["free"]) and len(ids(events["free"])) == 5
