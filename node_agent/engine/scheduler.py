"""Continuous-batching scheduler: who runs in the next step, and with how many tokens.

Sequences are admitted first-come first-served while a KV slot is free (each slot holds a
whole sequence of up to max_model_len tokens, so nothing runs out of cache mid-generation; a
request that finds no free slot waits). Each step, every running
sequence that is decoding gets one token; sequences still prefilling share what is left of the
step's token budget in chunks, so a long prompt never stalls everyone else's decoding.
A *held* sequence (the destination of a live migration) prefills every known token, samples
nothing, then idles in its slot, running nothing, until more tokens arrive or it is released.
A sequence that shares its prompt with a sibling (`Request.prefix_from`, choices of one request)
is admitted once that sibling has computed the prompt, whose K/V the engine then copies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from node_agent.engine.kv_cache import SlotAllocator
from node_agent.engine.sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits."""

    max_batch_size: int = 32  # sequences running at once (at most the KV pool's slots)
    max_step_tokens: int = 512  # tokens through the model per step (prefill chunk budget)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be at least 1")
        if self.max_step_tokens < self.max_batch_size:
            raise ValueError(
                f"max_step_tokens={self.max_step_tokens} must be >= max_batch_size="
                f"{self.max_batch_size} so every running sequence can decode each step"
            )


@dataclass(frozen=True)
class ScheduledChunk:
    """`length` pending tokens of `seq` run this step; `samples` if they reach its end."""

    seq: Sequence
    length: int
    samples: bool

    @classmethod
    def of(cls, seq: Sequence, length: int) -> ScheduledChunk:
        return cls(seq, length, samples=length == seq.num_pending and not seq.held)


class Scheduler:
    """Owns the waiting queue, the running batch and KV slot assignments."""

    def __init__(
        self,
        config: SchedulerConfig,
        slots: SlotAllocator,
        on_admit: Callable[[Sequence], None] = lambda seq: None,
    ):
        self.config = config
        self.slots = slots
        self.on_admit = on_admit
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """Something to admit or run. A held sequence that has caught up waits for more, and a
        waiting one that cannot be admitted waits for a slot: neither spins the engine."""
        admissible = (
            len(self.running) < self.config.max_batch_size
            and self.slots.can_allocate()
            and any(not self._sibling_computing(s) for s in self.waiting)
        )
        return admissible or any(s.runnable > 0 or s.caught_up for s in self.running)

    def schedule(self) -> list[ScheduledChunk]:
        """Admit what fits (`on_admit` is called for each), then plan this step's chunks.
        Empty when there is nothing to run."""
        for seq in self._admit():
            self.on_admit(seq)
        budget = self.config.max_step_tokens
        decoding = [s for s in self.running if s.num_pending == 1 and not s.held]
        prefilling = [s for s in self.running if s not in decoding and s.runnable > 0]
        plan = [ScheduledChunk.of(s, 1) for s in decoding]
        budget -= len(plan)
        for seq in prefilling:
            if budget <= 0:
                break
            length = min(seq.runnable, budget)
            plan.append(ScheduledChunk.of(seq, length))
            budget -= length
        return plan

    def _admit(self) -> list[Sequence]:
        """Admit waiting sequences, first come first served, while slots are free; one whose
        prompt's sibling is still computing it waits, without holding back those behind it."""
        admitted = []
        for seq in list(self.waiting):
            if len(self.running) >= self.config.max_batch_size or not self.slots.can_allocate():
                break
            if self._sibling_computing(seq):
                continue
            self.waiting.remove(seq)
            seq.slot = self.slots.allocate()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def sibling(self, seq: Sequence) -> Sequence | None:
        """The running or waiting sequence whose prompt `seq` may copy (`prefix_from`), if it
        is here with the same prompt and `seq` starts from that prompt alone."""
        source_id = seq.request.prefix_from
        if source_id is None or seq.held or seq.request.output_ids:
            return None
        source = self.find(source_id)
        if source is None or source.request.prompt_ids != seq.request.prompt_ids:
            return None
        return source

    def _sibling_computing(self, seq: Sequence) -> bool:
        source = self.sibling(seq)
        return source is not None and source.num_computed < len(seq.request.prompt_ids) - 1

    def finish(self, seq: Sequence) -> None:
        """Remove a running or waiting sequence and release its KV slot."""
        if seq in self.running:
            self.running.remove(seq)
            assert seq.slot is not None, "running sequence without a slot"
            self.slots.free(seq.slot)
            seq.slot = None
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None
