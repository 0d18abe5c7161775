"""`response_format` in the engine: the output is valid JSON for the schema, the request stops
when the document is complete, and a request resumed or migrated from its output ids continues
exactly as the uninterrupted run (the grammar's state is rebuilt from those ids)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from engine_fixtures import ids, run

from node_agent.engine import LLMEngine, Request, SamplingParams, load_engine
from node_agent.engine.async_engine import AsyncEngine
from node_agent.engine.sequence import FinishReason, TokenEvent
from node_agent.facts.errors import RequestError
from node_agent.facts.response_format import normalized

PROMPT = (11, 42, 7, 300, 5, 5, 9, 42)
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "sizes": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 3},
    },
    "required": ["ok", "colour", "sizes"],
    "additionalProperties": False,
}
"""Bounded: every valid document is a few dozen tokens, so a random model completes it."""
FORMAT = normalized({"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    return load_engine(tiny_model_dir)


def request(name: str, output_ids: tuple[int, ...] = (), **options: Any) -> Request:
    params = {"max_tokens": 120, "temperature": 0.9, "seed": 5, "response_format": FORMAT}
    return Request(name, PROMPT, SamplingParams(**{**params, **options}), output_ids)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_output_is_a_document_of_the_schema_and_ends_there(
    engine: LLMEngine, seed: int
) -> None:
    events = run(engine, request("doc", seed=seed, ignore_eos=True, min_tokens=100))["doc"]
    text = "".join(e.text for e in events)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert events[-1].finish_reason == FinishReason.STOP, "stopped when complete"
    free = run(engine, request("free", seed=seed, response_format=""))["free"]
    with pytest.raises(ValueError):
        json.loads("".join(e.text for e in free))  # the random model writes no JSON unaided


def test_json_object_gives_an_object(engine: LLMEngine) -> None:
    events = run(
        engine,
        request("obj", response_format=normalized({"type": "json_object"}), temperature=0.0),
    )["obj"]
    text = "".join(e.text for e in events)
    assert text.startswith("{")
    if events[-1].finish_reason == FinishReason.STOP:  # greedy may run to max_tokens in a string
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("cut", [1, 6])
def test_a_resumed_request_continues_identically(engine: LLMEngine, cut: int) -> None:
    full = ids(run(engine, request("full"))["full"])
    resumed = ids(run(engine, request("resumed", tuple(full[:cut])))["resumed"])
    assert full[:cut] + resumed == full


def test_a_migrated_request_continues_identically(engine: LLMEngine) -> None:
    full = ids(run(engine, request("full"))["full"])
    seq = engine.validate(request("m", tuple(full[:3])))
    seq.held = True
    engine.add(seq)
    run(engine)
    engine.extend("m", full[3:7], release=True)
    rest: list[int] = []
    while engine.has_work():
        rest += ids(engine.step())
    assert full[:7] + rest == full


def test_output_ids_that_break_the_grammar_are_refused(engine: LLMEngine) -> None:
    full = ids(run(engine, request("full"))["full"])
    with pytest.raises(RequestError, match="does not fit response_format"):
        engine.validate(request("bad", (full[0], full[0])))  # `{{` is no JSON


def test_a_grammar_being_compiled_holds_up_no_other_request(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first compile builds the vocabulary (~0.2 s for 49k tokens): it runs off the event
    loop, so a plain request on the same engine streams to its end meanwhile."""
    engine = load_engine(tiny_model_dir)
    started, release = threading.Event(), threading.Event()
    real = engine.grammars.compile

    def held(response_format: Any) -> Any:
        if response_format:
            started.set()
            assert release.wait(30), "never released: the plain request did not finish"
        return real(response_format)

    monkeypatch.setattr(engine.grammars, "compile", held)
    front = AsyncEngine(engine)

    async def main() -> tuple[list[TokenEvent], list[TokenEvent], bool]:
        constrained = asyncio.create_task(_collect(front, request("json", seed=2)))
        assert await asyncio.to_thread(started.wait, 30)
        plain = await _collect(front, request("plain", response_format="", max_tokens=8))
        waiting = not constrained.done()
        release.set()
        return plain, await constrained, waiting

    try:
        plain, constrained, waiting = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        front.stop()
    assert waiting and plain[-1].finish_reason is not None and len(ids(plain)) == 8
    jsonschema.validate(json.loads("".join(e.text for e in constrained)), SCHEMA)


def test_a_cancel_that_comes_while_the_grammar_compiles_stops_the_request(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request's id is taken before its compile ends: a cancel sent meanwhile reaches the
    engine after the request itself, and ends it with an abort."""
    engine = load_engine(tiny_model_dir)
    started, release = threading.Event(), threading.Event()
    real = engine.grammars.compile

    def held(response_format: Any) -> Any:
        started.set()
        assert release.wait(30), "never released"
        return real(response_format)

    monkeypatch.setattr(engine.grammars, "compile", held)
    front = AsyncEngine(engine)

    async def main() -> list[TokenEvent]:
        constrained = asyncio.create_task(_collect(front, request("json", seed=2)))
        assert await asyncio.to_thread(started.wait, 30)
        front.cancel("json")
        release.set()
        return await constrained

    try:
        events = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        front.stop()
    assert events[-1].finish_reason is FinishReason.ABORT, events[-1]


async def _collect(front: AsyncEngine, req: Request) -> list[TokenEvent]:
    return [e async for e in front.generate(req)]
