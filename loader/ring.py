"""A bounded ring of host staging slots: reads fill slots, async copies drain them.

This is the GPU load pipeline with the GPU factored out. Reader threads take a free slot, read
the next `ReadTask` into it and hand it over; the caller's thread submits an asynchronous copy
of that slot to its destination; a releaser thread waits for each copy (in submission order)
and returns its slot to the free list. So disk reads and host->device copies overlap, and host
memory is bounded by `slots * slot_size`, never by the model.

The copy side is a `CopyBackend`: `loader.cuda.CudaCopyBackend` uses CUDA streams and events;
tests use a fake that performs the copy as late as possible, so a slot reused too early shows
up as wrong bytes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from loader.plan import ReadTask

H = TypeVar("H")


class CopyBackend(Protocol[H]):
    """Moves a filled host slot to its destination asynchronously."""

    def submit(self, slot: int, task: ReadTask) -> H:
        """Start copying `task.nbytes` from host slot `slot` to the task's destination.

        Called on the pipeline's calling thread, in task-completion order. Returns a handle.
        """
        ...

    def wait(self, handle: H) -> None:
        """Block until the copy behind `handle` is done; the slot is reused right after."""
        ...


@dataclass(frozen=True)
class RingStats:
    """What one pipeline run did: tasks copied and the most slots ever busy at once."""

    tasks: int
    max_busy: int


_STOP = -1


class _Slots:
    """The free list, counting how many slots are busy (for stats and the ring-bound tests)."""

    def __init__(self, count: int) -> None:
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(count):
            self._free.put(slot)
        self._count, self._busy, self.max_busy = count, 0, 0
        self._lock = threading.Lock()

    def take(self) -> int:
        slot = self._free.get()
        if slot != _STOP:
            with self._lock:
                self._busy += 1
                self.max_busy = max(self.max_busy, self._busy)
        return slot

    def give(self, slot: int) -> None:
        with self._lock:
            self._busy -= 1
        self._free.put(slot)

    def wake(self, waiters: int) -> None:
        for _ in range(waiters):
            self._free.put(_STOP)


class RingPipeline(Generic[H]):
    """Runs `tasks` through `slots` staging buffers with `threads` readers (see module doc)."""

    def __init__(
        self,
        *,
        slots: int,
        threads: int,
        read_into: Callable[[int, ReadTask], None],
        backend: CopyBackend[H],
    ) -> None:
        if slots < 1 or threads < 1:
            raise ValueError(f"need at least one slot and one thread, got {slots}, {threads}")
        self.slots, self.threads = slots, threads
        self.read_into, self.backend = read_into, backend

    def run(self, tasks: Sequence[ReadTask]) -> RingStats:
        """Read and copy every task; returns when all copies are complete, or raises."""
        slots = _Slots(self.slots)
        ready: queue.SimpleQueue[tuple[int, ReadTask] | BaseException] = queue.SimpleQueue()
        inflight: queue.SimpleQueue[tuple[H, int] | None] = queue.SimpleQueue()
        pending: Iterator[ReadTask] = iter(tasks)
        lock, failures = threading.Lock(), list[BaseException]()

        def reader() -> None:
            while (slot := slots.take()) != _STOP:
                with lock:
                    task = next(pending, None)
                if task is None:
                    slots.give(slot)
                    return
                try:
                    self.read_into(slot, task)
                except BaseException as exc:
                    ready.put(exc)
                    return
                ready.put((slot, task))

        def releaser() -> None:
            while (item := inflight.get()) is not None:
                try:
                    self.backend.wait(item[0])
                except BaseException as exc:
                    failures.append(exc)
                slots.give(item[1])

        readers = [threading.Thread(target=reader, daemon=True) for _ in range(self.threads)]
        drain = threading.Thread(target=releaser, daemon=True)
        for thread in [*readers, drain]:
            thread.start()
        try:
            for _ in range(len(tasks)):
                if failures:
                    break
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                slot, task = item
                inflight.put((self.backend.submit(slot, task), slot))
        finally:
            with lock:
                pending = iter(())
            slots.wake(len(readers))
            inflight.put(None)
            for thread in [*readers, drain]:
                thread.join()
        if failures:
            raise failures[0]
        return RingStats(tasks=len(tasks), max_busy=slots.max_busy)
