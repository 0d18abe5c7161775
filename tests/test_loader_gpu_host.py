"""GPU loads' host memory, planned without a GPU: the pinned staging ring is allocated once per
process (a GPU worker reserves it at start) and every load reuses it; a load from the DRAM
arena copies straight from the arena when the worker page-locked it, and stages the arena
file's bytes through the ring otherwise. CUDA itself is exercised by the GPU-only tests at the
end (skipped here)."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import loader.api
import loader.cuda
from checkpoint_format import MANIFEST_NAME, write_checkpoint
from loader import load_state_dict
from loader.arena import PLACEMENT_NAME, ArenaMap, read_placement
from loader.errors import DeviceError
from node_agent.facts.tiers import TierName

KIB, MIB = 1 << 10, 1 << 20
NO_GPU = not torch.cuda.is_available()


@pytest.fixture
def fake_pinning(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Pinned allocations become ordinary CPU tensors, recorded as (slots, slot bytes); the
    process starts with no reserved ring."""
    made: list[tuple[int, int]] = []

    def pinned_slots(count: int, slot_bytes: int) -> list[torch.Tensor]:
        made.append((count, slot_bytes))
        return [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(count)]

    monkeypatch.setattr(loader.cuda, "pinned_slots", pinned_slots)
    monkeypatch.setattr(loader.cuda, "check_cuda_device", lambda device: None)
    monkeypatch.setattr(loader.cuda, "_reserved", None)
    yield made


def test_the_reserved_ring_is_allocated_once_and_every_load_stages_through_it(
    fake_pinning: list[tuple[int, int]],
) -> None:
    ring = loader.cuda.reserve_ring(slots=3, slot_bytes=MIB)
    assert loader.cuda.reserve_ring() is ring  # a second reservation is the same ring
    for _ in range(3):
        with loader.cuda.staging_ring(MIB) as got:
            assert got is ring
    with loader.cuda.staging_ring(256 * KIB) as got:
        assert got is ring  # smaller reads fit its slots
    assert fake_pinning == [(3, MIB)]


def test_a_load_that_cannot_use_the_reserved_ring_gets_its_own(
    fake_pinning: list[tuple[int, int]],
) -> None:
    with loader.cuda.staging_ring(MIB, slots=2) as own:
        assert own is not loader.cuda._reserved  # nothing reserved: allocated for this load
    ring = loader.cuda.reserve_ring(slots=3, slot_bytes=MIB)
    with loader.cuda.staging_ring(MIB) as first, loader.cuda.staging_ring(MIB) as second:
        assert first is ring and second is not ring  # busy: never shared by two loads
    with loader.cuda.staging_ring(4 * MIB) as big:
        assert big is not ring  # reads larger than its slots
    assert fake_pinning == [(2, MIB), (3, MIB), (12, MIB), (12, 4 * MIB)]
    with loader.cuda.staging_ring(MIB) as again:
        assert again is ring  # released by the loads that held it


@pytest.fixture
def placed(make_store: Callable[..., Any], tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    """A checkpoint promoted into a DRAM tier's arena: (its directory, the arena, tensors)."""
    store = make_store(dram_budget=MIB, disk_budget=4 * MIB)
    store.ensure(_ckpt(tmp_path / "first", 1), TierName.DRAM)  # the second is at an offset
    ckpt = _ckpt(tmp_path / "ckpt", 2)
    return store.ensure(ckpt, TierName.DRAM), store.arena_path, load_state_dict(ckpt)


def _ckpt(path: Path, seed: int) -> Path:
    write_checkpoint({"w": torch.arange(50 * KIB, dtype=torch.int32) * seed}, path, fsync=False)
    return path


def test_a_gpu_load_from_an_unpinned_arena_stages_the_arena_file_through_the_ring(
    placed: tuple[Path, Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, arena_path, _ = placed
    calls: list[dict[str, Any]] = []

    def ring_read(paths: Any, sizes: Any, device: Any, **kwargs: Any) -> tuple[Any, Any]:
        calls.append({"paths": dict(paths), "sizes": dict(sizes), **kwargs})
        return {p: torch.empty(n, dtype=torch.uint8) for p, n in sizes.items()}, None

    monkeypatch.setattr(loader.api, "read_partitions_cuda", ring_read)
    monkeypatch.setattr(loader.api, "arena_to_device", _never)
    placement = read_placement(path)
    assert placement is not None and placement.offsets[0] > 0
    for arena in (None, ArenaMap(arena_path, for_gpu=True)):  # not pinned: CUDA refused
        loader.api._from_arena(placement, [0], torch.device("cuda"), arena, 2, MIB)
    assert len(calls) == 2
    for call in calls:
        assert call["paths"] == {0: arena_path} and call["bases"] == {0: placement.offsets[0]}
        assert call["sizes"] == {0: placement.sizes[0]} and call["direct"] is False


def test_a_gpu_load_from_the_pinned_arena_copies_straight_from_it(
    placed: tuple[Path, Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, arena_path, _ = placed
    copied: list[list[int]] = []

    def to_device(arena: ArenaMap, placement: Any, parts: list[int], dev: Any) -> Any:
        copied.append(parts)
        return {p: torch.empty(placement.sizes[p], dtype=torch.uint8) for p in parts}

    monkeypatch.setattr(loader.api, "read_partitions_cuda", _never)
    monkeypatch.setattr(loader.api, "arena_to_device", to_device)
    arena = ArenaMap(arena_path, for_gpu=True)
    arena.pinned = True  # what pin_arena records once CUDA accepted the registration
    placement = read_placement(path)
    assert placement is not None
    loader.api._from_arena(placement, [0], torch.device("cuda"), arena, 2, MIB)
    assert copied == [[0]]


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the other path was taken")


def test_the_gpu_mapping_of_the_arena_is_shared_read_only_and_not_bound_on_the_cpu(
    placed: tuple[Path, Path, dict[str, Any]],
) -> None:
    """A GPU worker's mapping is never written (a write would fail, not copy) and is not
    populated (pinning faults it in); a CPU load given it maps the extents itself."""
    path, arena_path, want = placed
    arena = ArenaMap(arena_path, for_gpu=True)
    assert arena.for_gpu and not arena.pinned
    with pytest.raises(TypeError):
        arena.mapping[0:1] = b"x"
    got = load_state_dict(path, arena=arena)
    assert torch.equal(got["w"], want["w"])
    got["w"][0] = 7  # its own copy-on-write mapping: writable, the arena unchanged
    assert torch.equal(load_state_dict(path)["w"], want["w"])


def test_pinning_the_arena_needs_a_gpu_mapping_and_cuda(
    placed: tuple[Path, Path, dict[str, Any]],
) -> None:
    _, arena_path, _ = placed
    with pytest.raises(DeviceError, match="for_gpu"):
        loader.cuda.pin_arena(ArenaMap(arena_path))
    if NO_GPU:
        with pytest.raises(DeviceError, match="CUDA is not available"):
            loader.cuda.pin_arena(ArenaMap(arena_path, for_gpu=True))
        with pytest.raises(DeviceError, match="CUDA is not available"):
            loader.cuda.reserve_ring()


class _FakeError(enum.IntEnum):
    success = 0
    not_supported = 801


class _FakeCudart:
    """torch.cuda.cudart() as far as pinning uses it: records each call and its thread."""

    cudaError = _FakeError

    def __init__(self, answer: _FakeError) -> None:
        self.answer = answer
        self.calls: list[tuple[str, tuple[int, ...], int]] = []

    def cudaHostRegister(self, address: int, size: int, flags: int) -> _FakeError:
        self.calls.append(("register", (address, size, flags), threading.get_ident()))
        return self.answer

    def cudaHostUnregister(self, address: int) -> _FakeError:
        self.calls.append(("unregister", (address,), threading.get_ident()))
        return _FakeError.success

    def cudaGetErrorString(self, err: _FakeError) -> str:
        return "operation not supported"


@pytest.mark.parametrize("answer", list(_FakeError))
def test_pinning_registers_the_whole_mapping_read_only_on_a_throwaway_thread(
    placed: tuple[Path, Path, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    answer: _FakeError,
) -> None:
    """Portable + read-only over the mapping's every byte; a refusal names the error and
    leaves the arena unpinned, and its CUDA error on a thread that launches nothing."""
    _, arena_path, _ = placed
    cudart = _FakeCudart(answer)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(loader.cuda, "check_cuda_device", lambda device: None)
    arena = ArenaMap(arena_path, for_gpu=True)
    address = loader.cuda._base(arena).data_ptr()
    if answer is _FakeError.success:
        loader.cuda.pin_arena(arena)
        loader.cuda.pin_arena(arena)  # once only
        assert arena.pinned
        loader.cuda.unpin_arena(arena)
        assert not arena.pinned
        assert [c[:2] for c in cudart.calls] == [
            ("register", (address, arena.size, 0x01 | 0x08)),
            ("unregister", (address,)),
        ]
    else:
        with pytest.raises(DeviceError, match="error 801: operation not supported"):
            loader.cuda.pin_arena(arena)
        assert not arena.pinned
    assert cudart.calls[0][2] != threading.get_ident()


def test_a_gpu_worker_that_cannot_pin_the_arena_still_serves_through_the_ring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's start-up steps, with CUDA faked: the ring is reserved and the arena pinned
    before the ready line; a refused pin leaves no mapping behind and the worker serves."""
    from node_agent.instances import worker

    path = tmp_path / "arena"
    path.write_bytes(bytes(1 << 16))
    reserved: list[loader.cuda.PinnedRing] = []

    def reserve() -> loader.cuda.PinnedRing:
        reserved.append(loader.cuda.PinnedRing(1, 4096))
        return reserved[-1]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(worker, "reserve_ring", reserve)
    monkeypatch.setattr(loader.cuda, "pinned_slots", lambda n, size: [torch.empty(size)] * n)
    pinned: list[ArenaMap] = []

    def pin(arena: ArenaMap) -> None:
        pinned.append(arena)
        arena.pinned = True

    monkeypatch.setattr(worker, "pin_arena", pin)
    got = worker._prepare_gpu(str(path))
    assert got is not None and got.for_gpu and got.pinned and pinned == [got] and reserved

    def refuse(arena: ArenaMap) -> None:
        pinned.append(arena)
        raise DeviceError("refused")

    monkeypatch.setattr(worker, "pin_arena", refuse)
    assert worker._prepare_gpu(str(path)) is None
    assert pinned[-1].mapping.closed
    assert worker._prepare_gpu(None) is None  # no arena: the ring only


@pytest.mark.skipif(NO_GPU, reason="needs a GPU")
def test_gpu_loads_from_the_pinned_arena_and_through_the_reserved_ring_are_exact(
    placed: tuple[Path, Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, arena_path, want = placed
    monkeypatch.setattr(loader.cuda, "_reserved", None)
    ring = loader.cuda.reserve_ring()
    allocations: list[int] = []
    real_pinned_slots = loader.cuda.pinned_slots

    def counted(count: int, slot_bytes: int) -> list[torch.Tensor]:
        allocations.append(count * slot_bytes)
        return real_pinned_slots(count, slot_bytes)

    monkeypatch.setattr(loader.cuda, "pinned_slots", counted)
    arena = ArenaMap(arena_path, for_gpu=True)
    loader.cuda.pin_arena(arena)
    try:
        assert arena.pinned
        with monkeypatch.context() as m:  # straight from the arena: the ring is never used
            m.setattr(loader.api, "read_partitions_cuda", _never)
            got = load_state_dict(path, device="cuda:0", arena=arena)
        assert torch.equal(got["w"].cpu(), want["w"])
        unpinned = load_state_dict(path, device="cuda:0")  # the arena file, through the ring
        assert torch.equal(unpinned["w"].cpu(), want["w"])
        other = _ckpt(tmp_path / "plain", 3)
        assert (other / MANIFEST_NAME).exists() and not (other / PLACEMENT_NAME).exists()
        for _ in range(2):
            plain = load_state_dict(other, device="cuda:0", strategy="read-buffered")
            assert torch.equal(plain["w"].cpu(), load_state_dict(other)["w"])
        assert allocations == [] and loader.cuda.reserve_ring() is ring  # all used the ring
    finally:
        loader.cuda.unpin_arena(arena)
