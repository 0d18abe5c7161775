"""The engine end to end on a tiny demo model: batching, resume, stops, bad input, async."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from node_agent.engine import EngineConfig, LLMEngine, Request, SamplingParams, load_engine
from node_agent.engine.async_engine import AsyncEngine
from node_agent.engine.sequence import FinishReason, TokenEvent
from node_agent.facts.errors import RequestError

PROMPTS = [[11, 42, 7, 300], [5] * 17, [99, 98, 97], list(range(20, 70))]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    return load_engine(tiny_model_dir)


def request(name: str, prompt: list[int], **params: Any) -> Request:
    defaults: dict[str, Any] = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    return Request(name, tuple(prompt), SamplingParams(**{**defaults, **params}))


def drain(engine: LLMEngine) -> dict[str, list[TokenEvent]]:
    events: dict[str, list[TokenEvent]] = {}
    while engine.has_work():
        for event in engine.step():
            events.setdefault(event.request_id, []).append(event)
    return events


def run_alone(engine: LLMEngine, req: Request) -> list[int]:
    engine.add(engine.validate(req))
    return [e.token_id for e in drain(engine)[req.request_id] if e.token_id is not None]


def token_ids(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def test_concurrent_requests_produce_what_each_produces_alone(engine: LLMEngine) -> None:
    reqs = [request(f"r{i}", p, max_tokens=10 + 5 * i) for i, p in enumerate(PROMPTS)]
    alone = {r.request_id: run_alone(engine, r) for r in reqs}
    for r in reqs:
        engine.add(engine.validate(r))
    together = {name: token_ids(evs) for name, evs in drain(engine).items()}
    assert together == alone
    assert [len(alone[r.request_id]) for r in reqs] == [10, 15, 20, 25]


def test_request_joining_mid_batch_is_unaffected(engine: LLMEngine) -> None:
    first, late = request("first", PROMPTS[0]), request("late", PROMPTS[3])
    expected = {"first": run_alone(engine, first), "late": run_alone(engine, late)}
    engine.add(engine.validate(first))
    events: dict[str, list[TokenEvent]] = {}
    for _ in range(5):
        for event in engine.step():
            events.setdefault(event.request_id, []).append(event)
    engine.add(engine.validate(late))
    for name, evs in drain(engine).items():
        events.setdefault(name, []).extend(evs)
    assert {name: token_ids(evs) for name, evs in events.items()} == expected


def test_cancel_frees_capacity_for_a_waiting_request(tiny_model_dir: Path) -> None:
    small = load_engine(tiny_model_dir, config=EngineConfig(max_batch_size=1, max_step_tokens=64))
    small.add(small.validate(request("a", PROMPTS[0], max_tokens=200)))
    small.add(small.validate(request("b", PROMPTS[1], max_tokens=5)))
    small.step()
    assert [s.request_id for s in small.scheduler.waiting] == ["b"]
    aborted = small.abort("a")
    assert aborted is not None and aborted.finish_reason is FinishReason.ABORT
    events = drain(small)
    assert list(events) == ["b"] and len(token_ids(events["b"])) == 5


@pytest.mark.parametrize("seed", [3, 17, 2024])
def test_sampled_request_resumed_from_its_tokens_continues_identically(
    engine: LLMEngine, seed: int
) -> None:
    params = {"temperature": 0.9, "top_p": 0.95, "seed": seed, "max_tokens": 40}
    full = run_alone(engine, request("full", PROMPTS[0], **params))
    cut = random.Random(seed).randint(1, 39)
    resumed_req = Request(
        "resumed", tuple(PROMPTS[0]), request("x", [1], **params).params, tuple(full[:cut])
    )
    # Resume inside a busy batch: other requests must not perturb it.
    engine.add(engine.validate(request("noise", PROMPTS[2], temperature=1.0, seed=1)))
    engine.add(engine.validate(resumed_req))
    resumed = token_ids(drain(engine)["resumed"])
    assert full[:cut] + resumed == full


def test_sampling_with_different_seeds_diverges(engine: LLMEngine) -> None:
    a = run_alone(engine, request("a", PROMPTS[0], temperature=1.0, seed=1))
    b = run_alone(engine, request("b", PROMPTS[0], temperature=1.0, seed=2))
    assert a != b


def test_max_tokens_finishes_with_length(engine: LLMEngine) -> None:
    engine.add(engine.validate(request("r", PROMPTS[0], max_tokens=7)))
    events = drain(engine)["r"]
    assert len(token_ids(events)) == 7 and events[-1].finish_reason is FinishReason.LENGTH


def test_stop_string_ends_generation_before_the_stop_text(engine: LLMEngine) -> None:
    ids = run_alone(engine, request("free", PROMPTS[3], max_tokens=40))
    text = engine.tokenizer.decode(ids)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    engine.add(engine.validate(request("stopped", PROMPTS[3], max_tokens=40, stop=(stop,))))
    events = drain(engine)["stopped"]
    streamed = "".join(e.text for e in events)
    assert events[-1].finish_reason is FinishReason.STOP
    assert streamed == text[: text.index(stop)]


def test_eos_token_from_generation_config_stops(tiny_model_dir: Path, tmp_path: Path) -> None:
    probe = load_engine(tiny_model_dir)
    ids = run_alone(probe, request("probe", PROMPTS[1], max_tokens=12))
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [ids[5]]
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    eos_engine = load_engine(model_dir)
    req = request("r", PROMPTS[1], max_tokens=12, ignore_eos=False)
    eos_engine.add(eos_engine.validate(req))
    events = drain(eos_engine)["r"]
    assert token_ids(events) == ids[: ids.index(ids[5]) + 1]
    assert events[-1].finish_reason is FinishReason.STOP


def test_streamed_text_equals_decoding_all_tokens(engine: LLMEngine) -> None:
    req = request("r", PROMPTS[2], max_tokens=60, temperature=1.2, seed=5)
    engine.add(engine.validate(req))
    events = drain(engine)["r"]
    assert "".join(e.text for e in events) == engine.tokenizer.decode(token_ids(events))


@pytest.mark.parametrize(
    ("prompt", "params", "output_ids", "message"),
    [
        ([], {}, (), "prompt is empty"),
        ([1] * 64, {}, (), "shorten the prompt"),
        ([1] * 10, {"max_tokens": 60}, (), "set max_tokens to at most 54"),
        ([10**7], {}, (), "outside the vocabulary"),
        ([1, 2], {"max_tokens": 3}, (4, 5, 6), "nothing left to generate"),
    ],
)
def test_bad_requests_are_rejected_with_an_actionable_message(
    tiny_model_dir: Path,
    prompt: list[int],
    params: dict[str, Any],
    output_ids: tuple[int, ...],
    message: str,
) -> None:
    short = load_engine(tiny_model_dir, config=EngineConfig(max_model_len=64))
    req = Request("bad", tuple(prompt), SamplingParams(**{"max_tokens": 8, **params}), output_ids)
    with pytest.raises(RequestError, match=message):
        short.validate(req)


def test_async_engine_streams_concurrent_requests(engine: LLMEngine) -> None:
    reqs = [request(f"a{i}", p, max_tokens=12) for i, p in enumerate(PROMPTS[:3])]
    alone = {r.request_id: run_alone(engine, r) for r in reqs}
    async_engine = AsyncEngine(engine)

    async def collect(req: Request) -> list[int]:
        return [e.token_id async for e in async_engine.generate(req) if e.token_id is not None]

    async def main() -> dict[str, list[int]]:
        results = await asyncio.gather(*(collect(r) for r in reqs))
        return {r.request_id: ids for r, ids in zip(reqs, results, strict=True)}

    try:
        assert asyncio.run(main()) == alone
    finally:
        async_engine.stop()


def test_closing_a_stream_early_aborts_its_request(engine: LLMEngine) -> None:
    async_engine = AsyncEngine(engine)
    aborted_before = engine.finished[FinishReason.ABORT]

    async def abandon() -> None:
        stream = async_engine.generate(request("gone", PROMPTS[3], max_tokens=1500))
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]

    try:
        asyncio.run(abandon())
        assert async_engine.wait_idle(timeout=60)
        assert engine.finished[FinishReason.ABORT] == aborted_before + 1
    finally:
        async_engine.stop()


def test_cancel_ends_the_stream_with_abort_and_a_reused_id_gets_its_own_tokens(
    engine: LLMEngine,
) -> None:
    expected = run_alone(engine, request("x", PROMPTS[1], max_tokens=8))
    async_engine = AsyncEngine(engine)

    async def main() -> tuple[list[TokenEvent], list[int]]:
        first: list[TokenEvent] = []
        async for event in async_engine.generate(request("x", PROMPTS[0], max_tokens=1500)):
            first.append(event)
            if len(first) == 2:
                async_engine.cancel("x")
        again = [
            e.token_id
            async for e in async_engine.generate(request("x", PROMPTS[1], max_tokens=8))
            if e.token_id is not None
        ]
        return first, again

    try:
        first, again = asyncio.run(main())
    finally:
        async_engine.stop()
    assert first[-1].finish_reason is FinishReason.ABORT and len(first) < 1500
    assert again == expected


def test_stopping_the_engine_fails_streams_in_flight_instead_of_hanging(
    tiny_model_dir: Path,
) -> None:
    from node_agent.engine.async_engine import GenerationError

    async_engine = AsyncEngine(load_engine(tiny_model_dir))

    async def main() -> None:
        async for _ in async_engine.generate(request("r", PROMPTS[0], max_tokens=1500)):
            await asyncio.to_thread(async_engine.stop)

    with pytest.raises(GenerationError, match="stopped"):
        asyncio.run(asyncio.wait_for(main(), timeout=60))


def test_stoke_checkpoint_generates_what_the_hf_directory_generates(
    tiny_model_dir: Path, tmp_path: Path, engine: LLMEngine
) -> None:
    from checkpoint_format import convert_hf

    ckpt = tmp_path / "ckpt"
    convert_hf(tiny_model_dir, ckpt)
    from_ckpt = load_engine(ckpt)
    req = request("r", PROMPTS[3], temperature=0.8, seed=11, max_tokens=30)
    assert run_alone(from_ckpt, req) == run_alone(engine, req)


def test_kv_pool_starts_zeroed_and_a_leaving_sequence_leaves_zeros(engine: LLMEngine) -> None:
    # Batched decode reads other slots' masked positions; a stale NaN there would poison it.
    assert not engine.kv.data.any()
    run_alone(engine, request("r", PROMPTS[3], max_tokens=20))
    engine.add(engine.validate(request("cancelled", PROMPTS[3], max_tokens=20)))
    engine.step()
    engine.abort("cancelled")
    assert not engine.kv.data.any()


def test_a_freed_slot_inside_the_decode_range_does_not_disturb_its_neighbours(
    engine: LLMEngine,
) -> None:
    # b (the middle slot) leaves early: a and c keep decoding with b's zeroed slot between them.
    reqs = [
        request("a", PROMPTS[0], max_tokens=30),
        request("b", PROMPTS[1], max_tokens=3),
        request("c", PROMPTS[2], max_tokens=30),
    ]
    alone = {r.request_id: run_alone(engine, r) for r in reqs}
    for req in reqs:
        engine.add(engine.validate(req))
    together = {name: token_ids(evs) for name, evs in drain(engine).items()}
    assert together == alone


def test_kv_budget_bounds_the_pool_and_too_small_a_budget_is_refused(
    tiny_model_dir: Path,
) -> None:
    from node_agent.facts.errors import ConfigError

    config = EngineConfig(kv_cache_bytes=8 << 20, max_model_len=256)
    bounded = load_engine(tiny_model_dir, config=config)
    assert bounded.kv.nbytes <= 8 << 20 and bounded.scheduler.slots.total >= 1
    with pytest.raises(ConfigError, match="raise kv_cache_bytes or lower max_model_len"):
        load_engine(tiny_model_dir, config=EngineConfig(kv_cache_bytes=1024))


def test_a_hub_cache_style_directory_with_symlinked_weights_loads(
    tiny_model_dir: Path, tmp_path: Path, engine: LLMEngine
) -> None:
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for item in tiny_model_dir.iterdir():
        (blobs / item.name).write_bytes(item.read_bytes())
        (snapshot / item.name).symlink_to(Path("../../blobs") / item.name)
    req = request("r", PROMPTS[0], max_tokens=10)
    assert run_alone(load_engine(snapshot), req) == run_alone(engine, req)


def test_an_index_naming_a_file_outside_the_directory_is_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from node_agent.facts.errors import WeightsError

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    index = {"weight_map": {"model.embed_tokens.weight": "../model.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="not a plain file name"):
        load_engine(model_dir)
