"""Scheduler: FCFS admission into free KV slots, batch limits, chunked prefill."""

from __future__ import annotations

from typing import Any, cast

from node_agent.engine.detokenizer import IncrementalDetokenizer
from node_agent.engine.kv_cache import SlotAllocator
from node_agent.engine.sampling import SamplingParams
from node_agent.engine.scheduler import Scheduler, SchedulerConfig
from node_agent.engine.sequence import Request, Sequence


def make_seq(name: str, prompt_len: int = 10, max_tokens: int = 10) -> Sequence:
    request = Request(name, tuple(range(prompt_len)), SamplingParams(max_tokens=max_tokens))
    return Sequence(request=request, detokenizer=cast(IncrementalDetokenizer, None))


def make_scheduler(slots: int = 8, **overrides: Any) -> Scheduler:
    config = SchedulerConfig(**{"max_batch_size": 8, "max_step_tokens": 64, **overrides})
    return Scheduler(config, SlotAllocator(slots))


def names(plan: list[Any]) -> list[tuple[str, int]]:
    return [(chunk.seq.request_id, chunk.length) for chunk in plan]


def test_a_request_that_finds_no_free_slot_waits_until_one_is_freed() -> None:
    sched = make_scheduler(slots=1)
    first, second = make_seq("a"), make_seq("b")
    sched.add(first)
    sched.add(second)
    assert names(sched.schedule()) == [("a", 10)]
    sched.finish(first)
    assert names(sched.schedule()) == [("b", 10)] and second.slot == 0


def test_admission_is_first_come_first_served() -> None:
    sched = make_scheduler(slots=2)
    for name in ("a", "b", "c"):
        sched.add(make_seq(name))
    sched.schedule()
    assert [s.request_id for s in sched.running] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_freed_slots_are_reused_lowest_first_keeping_the_batch_packed() -> None:
    sched = make_scheduler(slots=4)
    seqs = [make_seq(str(i)) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    sched.schedule()
    sched.finish(seqs[0])
    late = make_seq("late")
    sched.add(late)
    sched.schedule()
    assert [s.slot for s in sched.running] == [1, 2, 0]


def test_running_batch_is_capped_at_max_batch_size() -> None:
    sched = make_scheduler(max_batch_size=2)
    for i in range(3):
        sched.add(make_seq(str(i)))
    sched.schedule()
    assert len(sched.running) == 2 and len(sched.waiting) == 1


def test_long_prompt_is_prefilled_in_chunks_and_samples_only_at_its_end() -> None:
    sched = make_scheduler(max_step_tokens=16)
    seq = make_seq("long", prompt_len=40)
    sched.add(seq)
    lengths = []
    for _ in range(3):
        (chunk,) = sched.schedule()
        lengths.append((chunk.length, chunk.samples))
        seq.num_computed += chunk.length
    assert lengths == [(16, False), (16, False), (8, True)]


def test_decoding_sequences_go_first_and_prefill_gets_the_rest_of_the_budget() -> None:
    sched = make_scheduler(max_step_tokens=16)
    decoding = make_seq("dec", prompt_len=4)
    sched.add(decoding)
    sched.schedule()
    decoding.num_computed = 4
    decoding.token_ids.append(1)  # sampled, awaiting its decode step
    sched.add(make_seq("pre", prompt_len=40))
    assert names(sched.schedule()) == [("dec", 1), ("pre", 15)]


def test_finish_releases_the_slot() -> None:
    sched = make_scheduler(slots=2)
    seq = make_seq("a")
    sched.add(seq)
    sched.schedule()
    assert sched.slots.used == 1
    sched.finish(seq)
    assert sched.slots.used == 0 and seq.slot is None and not sched.has_work()
