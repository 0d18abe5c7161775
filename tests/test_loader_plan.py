"""loader's pure parts, tested without a GPU: read planning, strategy choice, the pinned ring."""

from __future__ import annotations

import itertools
import threading

import pytest

from loader.plan import ReadTask, Strategy, choose_strategy, plan_reads
from loader.ring import RingPipeline


def test_reads_cover_each_partition_exactly_and_aligned() -> None:
    sizes = [40960, 0, 12288]
    tasks = plan_reads(sizes, read_size=16384)
    for p, size in enumerate(sizes):
        mine = sorted((t.offset, t.nbytes) for t in tasks if t.partition == p)
        assert sum(n for _, n in mine) == size
        assert all(off % 4096 == 0 and n % 4096 == 0 for off, n in mine)
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(mine))


def test_reads_interleave_partitions() -> None:
    tasks = plan_reads([8192, 8192], read_size=4096)
    assert [t.partition for t in tasks] == [0, 1, 0, 1]


def test_reads_only_for_chosen_partitions() -> None:
    assert {t.partition for t in plan_reads([4096, 4096, 4096], 4096, partitions=[2])} == {2}


def test_read_size_must_keep_o_direct_alignment() -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        plan_reads([8192], read_size=1000)


@pytest.mark.parametrize(
    ("cuda", "memfs", "resident", "want"),
    [
        (False, True, 0.0, Strategy.MAP),
        (False, False, 1.0, Strategy.MAP),
        (False, False, 0.1, Strategy.MAP),
        (True, True, 0.0, Strategy.READ_BUFFERED),
        (True, False, 0.9, Strategy.READ_BUFFERED),
        (True, False, 0.0, Strategy.READ_DIRECT),
    ],
)
def test_strategy_follows_where_the_bytes_are(
    cuda: bool, memfs: bool, resident: float, want: Strategy
) -> None:
    assert choose_strategy(cuda=cuda, in_memory_fs=memfs, resident=resident) is want


class FakeDevice:
    """A copy backend whose copies happen as late as possible: in `wait`, not in `submit`.

    So if the ring ever refilled a slot before its copy completed, the destination would get
    the wrong bytes. It also records the slot states to check the ring's invariants.
    """

    def __init__(self, slots: int, slot_bytes: int, total: int) -> None:
        self.host = [bytearray(slot_bytes) for _ in range(slots)]
        self.device = bytearray(total)
        self.busy: set[int] = set()
        self.lock = threading.Lock()
        self.copies = 0

    def read_into(self, slot: int, task: ReadTask) -> None:
        with self.lock:
            assert slot not in self.busy, f"slot {slot} refilled while its copy is pending"
            self.busy.add(slot)
        self.host[slot][: task.nbytes] = source_bytes(task.offset, task.nbytes)

    def submit(self, slot: int, task: ReadTask) -> tuple[int, ReadTask]:
        return slot, task

    def wait(self, handle: tuple[int, ReadTask]) -> None:
        slot, task = handle
        self.device[task.offset : task.offset + task.nbytes] = self.host[slot][: task.nbytes]
        with self.lock:
            self.busy.discard(slot)
            self.copies += 1


def source_bytes(offset: int, nbytes: int) -> bytes:
    return bytes((offset + i) * 7 % 251 for i in range(0, nbytes, 512)) * 512


@pytest.mark.parametrize(("slots", "threads"), [(1, 1), (2, 4), (3, 2), (8, 8)])
def test_ring_delivers_every_byte_and_stays_bounded(slots: int, threads: int) -> None:
    total = 40 * 4096
    tasks = plan_reads([total], read_size=4096)
    fake = FakeDevice(slots, 4096, total)
    stats = RingPipeline(slots=slots, threads=threads, read_into=fake.read_into, backend=fake).run(
        tasks
    )
    want = b"".join(source_bytes(t.offset, t.nbytes) for t in tasks)
    assert bytes(fake.device) == want
    assert fake.copies == len(tasks) == stats.tasks
    assert 1 <= stats.max_busy <= slots


def test_ring_propagates_a_read_error_and_stops() -> None:
    fake = FakeDevice(2, 4096, 10 * 4096)

    def failing_read(slot: int, task: ReadTask) -> None:
        if task.offset == 5 * 4096:
            raise OSError("disk on fire")
        fake.read_into(slot, task)

    pipeline = RingPipeline(slots=2, threads=3, read_into=failing_read, backend=fake)
    with pytest.raises(OSError, match="disk on fire"):
        pipeline.run(plan_reads([10 * 4096], 4096))
    assert not fake.busy  # every submitted copy was waited for before returning


def test_ring_propagates_a_copy_error() -> None:
    fake = FakeDevice(4, 4096, 4 * 4096)

    def broken_wait(handle: tuple[int, ReadTask]) -> None:
        raise RuntimeError("copy failed")

    fake.wait = broken_wait  # type: ignore[method-assign]
    pipeline = RingPipeline(slots=4, threads=2, read_into=fake.read_into, backend=fake)
    with pytest.raises(RuntimeError, match="copy failed"):
        pipeline.run(plan_reads([4 * 4096], 4096))


def test_ring_needs_a_slot_and_a_thread() -> None:
    fake = FakeDevice(1, 4096, 4096)
    with pytest.raises(ValueError):
        RingPipeline(slots=0, threads=1, read_into=fake.read_into, backend=fake)


def test_ring_reads_ahead_while_a_copy_is_still_in_flight() -> None:
    # The first copy does not complete until a later read has started: a serial pipeline
    # (read, copy, wait, read ...) would never get there, and the wait would time out.
    total = 8 * 4096
    tasks = plan_reads([total], read_size=4096)
    fake = FakeDevice(4, 4096, total)
    later_read_started = threading.Event()
    overlapped: list[bool] = []

    def read_into(slot: int, task: ReadTask) -> None:
        if task.offset >= 2 * 4096:
            later_read_started.set()
        fake.read_into(slot, task)

    class FirstCopyWaitsForReadAhead:
        def submit(self, slot: int, task: ReadTask) -> tuple[int, ReadTask]:
            return fake.submit(slot, task)

        def wait(self, handle: tuple[int, ReadTask]) -> None:
            if handle[1].offset == 0:
                overlapped.append(later_read_started.wait(timeout=10))
            fake.wait(handle)

    pipeline = RingPipeline(
        slots=4, threads=2, read_into=read_into, backend=FirstCopyWaitsForReadAhead()
    )
    pipeline.run(tasks)
    assert overlapped == [True]
    assert bytes(fake.device) == b"".join(source_bytes(t.offset, t.nbytes) for t in tasks)
