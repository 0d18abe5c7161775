"""The engine's side of live migration: a held sequence prefills without emitting, catches up
in rounds, and once released continues exactly as the unmigrated request would have."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from node_agent.engine import LLMEngine, Request, SamplingParams, load_engine
from node_agent.engine.async_engine import AsyncEngine, GenerationError
from node_agent.engine.sequence import FinishReason, TokenEvent
from node_agent.facts.errors import RequestError

PROMPT = [11, 42, 7, 300, 5, 5, 9]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    return load_engine(tiny_model_dir)


def request(name: str, output_ids: tuple[int, ...] = (), **params: Any) -> Request:
    defaults: dict[str, Any] = {"max_tokens": 30, "temperature": 0.0, "ignore_eos": True}
    return Request(name, tuple(PROMPT), SamplingParams(**{**defaults, **params}), output_ids)


def drain(engine: LLMEngine) -> list[TokenEvent]:
    events: list[TokenEvent] = []
    while engine.has_work():
        events += engine.step()
    return events


def reference(engine: LLMEngine, req: Request) -> list[int]:
    engine.add(engine.validate(req))
    return [e.token_id for e in drain(engine) if e.token_id is not None]


def hold(engine: LLMEngine, req: Request) -> None:
    seq = engine.validate(req)
    seq.held = True
    engine.add(seq)


@pytest.mark.parametrize(
    "params", [{}, {"temperature": 0.9, "seed": 1234}], ids=["greedy", "seeded"]
)
def test_a_held_request_caught_up_in_rounds_continues_like_the_unmigrated_one(
    engine: LLMEngine, params: dict[str, Any]
) -> None:
    full = reference(engine, request("ref", **params))
    hold(engine, request("m", tuple(full[:5]), **params))
    events = drain(engine)
    assert events == [TokenEvent("m", None, "", prefilled=len(PROMPT) + 5)]
    engine.extend("m", full[5:12], release=False)
    events = drain(engine)
    assert events == [TokenEvent("m", None, "", prefilled=len(PROMPT) + 12)]
    engine.extend("m", full[12:15], release=True)
    rest = [e.token_id for e in drain(engine) if e.token_id is not None]
    assert full[:15] + rest == full


@pytest.mark.parametrize("params", [{}, {"temperature": 0.9, "seed": 77}], ids=["greedy", "seeded"])
def test_a_release_with_no_new_token_reruns_the_last_one(
    engine: LLMEngine, params: dict[str, Any]
) -> None:
    """The source failed right after the destination caught up: the commit carries nothing,
    and the destination samples the next position from its own last token."""
    full = reference(engine, request("ref", **params))
    hold(engine, request("m", tuple(full[:9]), **params))
    drain(engine)
    engine.extend("m", [], release=True)
    rest = [e.token_id for e in drain(engine) if e.token_id is not None]
    assert full[:9] + rest == full


def test_a_caught_up_release_runs_one_token_like_a_decode_step(engine: LLMEngine) -> None:
    """A held sequence computes every known token, so the commit's single token is all the
    first step after the hand-over runs: the pause is one decode step."""
    full = reference(engine, request("ref"))
    hold(engine, request("m", tuple(full[:6])))
    drain(engine)
    engine.extend("m", full[6:7], release=True)
    plan = engine.scheduler.schedule()
    assert [(c.length, c.samples) for c in plan] == [(1, True)]
    rest = [e.token_id for e in drain(engine) if e.token_id is not None]
    assert full[:7] + rest == full


def test_a_held_request_emits_nothing_and_leaves_the_engine_idle(engine: LLMEngine) -> None:
    hold(engine, request("idle"))
    assert [e.prefilled for e in drain(engine)] == [len(PROMPT)]
    assert not engine.has_work()  # parked: its slot is held, no step runs
    assert engine.step() == []
    assert engine.abort("idle") == TokenEvent("idle", None, "", FinishReason.ABORT)
    assert engine.scheduler.running == []


def test_released_text_continues_the_stream_without_repeating_the_migrated_tokens(
    engine: LLMEngine,
) -> None:
    engine.add(engine.validate(request("ref")))
    ref_events = [e for e in drain(engine) if e.token_id is not None]
    full = [e.token_id for e in ref_events if e.token_id is not None]
    hold(engine, request("m", tuple(full[:10])))
    drain(engine)
    engine.extend("m", full[10:14], release=True)
    tail = [e for e in drain(engine) if e.token_id is not None]
    assert "".join(e.text for e in tail) == "".join(e.text for e in ref_events[14:])


def test_extending_past_max_tokens_or_out_of_vocabulary_is_refused(engine: LLMEngine) -> None:
    hold(engine, request("x", max_tokens=6))
    drain(engine)
    with pytest.raises(RequestError, match="nothing to generate"):
        engine.extend("x", [1, 2, 3, 4, 5, 6], release=True)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.extend("x", [10**9], release=False)
    with pytest.raises(RequestError, match="not being migrated"):
        engine.extend("nope", [1], release=False)
    engine.abort("x")


def test_async_engine_rounds_and_an_abandoned_migration_frees_its_slot(
    engine: LLMEngine,
) -> None:
    full = reference(engine, request("ref"))

    async def main() -> list[int]:
        aengine = AsyncEngine(engine)
        try:
            got: list[int] = []
            events = aengine.generate(request("a", tuple(full[:3])), held=True)
            first = await anext(events)
            aengine.extend("a", full[3:8], release=False)
            second = await anext(events)
            aengine.extend("a", full[8:9], release=True)
            async for event in events:
                if event.token_id is not None:
                    got.append(event.token_id)
            assert (first.prefilled, second.prefilled) == (len(PROMPT) + 3, len(PROMPT) + 8)
            # Abandoned before its release: closing the stream aborts it.
            abandoned = aengine.generate(request("b", tuple(full[:3])), held=True)
            await anext(abandoned)
            await abandoned.aclose()  # type: ignore[attr-defined]
            # An invalid round fails the stream instead of hanging it.
            bad = aengine.generate(request("c"), held=True)
            await anext(bad)
            aengine.extend("c", [10**9], release=True)
            with pytest.raises(GenerationError, match="outside the vocabulary"):
                await anext(bad)
            await asyncio.to_thread(aengine.wait_idle, 10)
            return full[:9] + got
        finally:
            aengine.stop()

    assert asyncio.run(main()) == full
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.scheduler.slots.can_allocate()


def test_a_held_request_waits_for_a_slot_like_any_other(tiny_model_dir: Path) -> None:
    from node_agent.engine import EngineConfig

    small = load_engine(tiny_model_dir, config=EngineConfig(max_batch_size=1))
    busy = dataclasses.replace(request("busy", max_tokens=3))
    small.add(small.validate(busy))
    hold(small, request("held"))
    events = drain(small)
    kinds = [(e.request_id, e.prefilled is not None) for e in events]
    assert kinds[-1] == ("held", True)  # after the busy one finished and freed the slot
    assert all(name == "busy" for name, _ in kinds[:-1])


def test_a_request_waiting_behind_an_idle_held_one_does_not_spin_the_engine(
    tiny_model_dir: Path,
) -> None:
    from node_agent.engine import EngineConfig

    small = load_engine(tiny_model_dir, config=EngineConfig(max_batch_size=1))
    hold(small, request("held"))
    drain(small)  # reported prefilled; it keeps the only slot
    small.add(small.validate(request("waiting", max_tokens=2)))
    assert not small.has_work(), "nothing can run: the engine thread must sleep, not spin"
    small.abort("held")
    assert small.has_work()
    assert len([e for e in drain(small) if e.request_id == "waiting"]) == 2


def test_a_source_asked_to_stop_ends_with_that_token_handed_over_and_runs_no_step_past_it(
    engine: LLMEngine,
) -> None:
    full = reference(engine, request("ref"))
    engine.add(engine.validate(request("src")))
    events = engine.step()  # prefill, and the first token
    engine.stop_after("src", 4)
    while engine.has_work():
        events += engine.step()
    assert [e.token_id for e in events] == full[:4]
    assert events[-1].finish_reason is FinishReason.HANDED_OVER
    assert engine.scheduler.running == []  # its slot is free

    # Asked for a boundary it already passed, it stops at its next token.
    engine.add(engine.validate(request("late")))
    events = engine.step() + engine.step() + engine.step()
    engine.stop_after("late", 1)
    events += drain(engine)
    assert [e.token_id for e in events] == full[:4]
    assert events[-1].finish_reason is FinishReason.HANDED_OVER
