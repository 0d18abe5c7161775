"""`InstanceManager` streaming a disk -> DRAM promotion into a real worker process: the instance
serves before its weights are all in memory, a request waits for them and then matches the
in-process engine, the checkpoint's pin passes to the instance when the copy is committed; a
copy that fails mid-load ends the waiting request and frees everything.

The store is real; the only thing added is a gate on its copy's progress reports (the copy of a
tiny checkpoint is otherwise over before a worker could be given it), which can also fail the
copy at a chosen moment, as a disk error would.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from checkpoint_format import MANIFEST_NAME, read_manifest
from node_agent.facts.tiers import Origin, TierName
from node_agent.instances import Budget, InstanceGoneError, InstanceManager, WorkerPool
from node_agent.instances.spawn import WorkerSpec
from node_agent.proto import node_agent_pb2 as pb
from node_agent.store.stream import Tap

TIMEOUT_S = 60.0


class GatedStore:
    """A real `CheckpointStore` whose promotions hold each piece's report (and so the copy of
    the next piece: one copy thread) until the test releases it, or fail there with `OSError`
    once `fail` is set."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.permits = threading.Semaphore(0)
        self.fail = False
        self.began = threading.Event()
        self.reported = 0

    def release(self, pieces: int = 1 << 20) -> None:
        for _ in range(pieces):
            self.permits.release()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def ensure_with_origin(self, source: Any, tier: Any, *, pin: bool, tap: Tap | None) -> Any:
        gated = _GatedTap(tap, self) if tap is not None else None
        return self.store.ensure_with_origin(source, tier, pin=pin, tap=gated)


class _GatedTap:
    def __init__(self, tap: Tap, gate: GatedStore) -> None:
        self.tap, self.gate = tap, gate

    def order(self, manifest: Any) -> list[tuple[int, int, int]]:
        return self.tap.order(manifest)

    def came_from(self, origin: Origin) -> None:
        self.tap.came_from(origin)

    def begin(self, staging: Path, committed: Path, manifest_bytes: bytes) -> None:
        self.tap.begin(staging, committed, manifest_bytes)
        self.gate.began.set()

    def landed(self, partition: int, start: int, end: int) -> None:
        assert self.gate.permits.acquire(timeout=TIMEOUT_S)
        if self.gate.fail:
            raise OSError(5, "Input/output error (injected)")
        self.tap.landed(partition, start, end)
        self.gate.reported += 1


def _reference(ckpt: Path, prompt: list[int], n: int) -> list[int]:
    from node_agent.engine import load_engine
    from node_agent.engine.sampling import SamplingParams
    from node_agent.engine.sequence import Request

    engine = load_engine(ckpt)
    engine.add(
        engine.validate(Request("r", tuple(prompt), SamplingParams(max_tokens=n, temperature=0.0)))
    )
    ids: list[int] = []
    while engine.has_work():
        ids += [e.token_id for e in engine.step() if e.token_id is not None]
    return ids


async def _first_event(stream: Any) -> pb.TokenEvent:
    return await anext(aiter(stream))


PIECE = 64 << 10


def _rewrite(ckpt: Path, out: Path, **options: Any) -> Path:
    """`ckpt`'s tensors and files as a new checkpoint (chunk size, dtype... from `options`)."""
    from checkpoint_format import write_checkpoint
    from loader import load_state_dict

    files = [p for p in ckpt.iterdir() if p.suffix == ".json" and p.name != MANIFEST_NAME]
    write_checkpoint(load_state_dict(ckpt), out, copy_files=files, **options)
    return out


@pytest.fixture(scope="module")
def pieces_ckpt(tiny_ckpt_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint in 64 KiB chunks: a verified promotion copies it in ~20 pieces."""
    return _rewrite(tiny_ckpt_dir, tmp_path_factory.mktemp("pieces") / "ckpt", chunk_size=PIECE)


def _gated(make_store: Callable[..., Any], ckpt: Path) -> GatedStore:
    # One copy thread and verified pieces (one chunk each): pieces land one by one, in order.
    store = make_store(copy_threads=1, verify_promotions=True)
    store.ensure(ckpt, TierName.DISK)  # held on disk, not in DRAM: a promotion
    return GatedStore(store)


@pytest.fixture
def gated(make_store: Callable[..., Any], pieces_ckpt: Path) -> GatedStore:
    return _gated(make_store, pieces_ckpt)


async def _manager(gated: GatedStore) -> InstanceManager:
    # The worker maps the DRAM arena as it starts, as on a node: the weights land in memory
    # it mapped before the load began.
    pool = WorkerPool(1, WorkerSpec(threads=1, arena=gated.store.arena_path))
    pool.start()
    return InstanceManager(gated, {None: pool}, Budget(1 << 30, 1))  # type: ignore[arg-type]


def _load_request(source: Path) -> pb.LoadInstanceRequest:
    return pb.LoadInstanceRequest(instance_id="s", source=str(source), tier="dram")


def _greedy(prompt: list[int], n: int) -> pb.GenerateRequest:
    params = pb.SamplingParams(max_tokens=n, temperature=0.0, top_p=1.0, seed=0)
    return pb.GenerateRequest(instance_id="s", request_id="r", prompt_ids=prompt, params=params)


def test_a_streamed_instance_serves_once_its_weights_land_and_takes_over_the_pin(
    gated: GatedStore, pieces_ckpt: Path
) -> None:
    prompt, n = [5, 17, 42, 7], 6
    pieces = -(-read_manifest(pieces_ckpt).partitions[0].nbytes // PIECE)

    async def go() -> tuple[list[int], dict[str, Any]]:
        manager = await _manager(gated)
        seen: dict[str, Any] = {}
        try:
            inst = await asyncio.wait_for(manager.load(_load_request(pieces_ckpt)), TIMEOUT_S)
            seen["reported_when_serving"] = gated.reported
            seen["pinned_while_copying"] = inst.pinned
            seen["origin"] = inst.loaded_from
            stream = manager.generate(_greedy(prompt, n))
            first = asyncio.ensure_future(_first_event(stream))
            # All but the last piece reported (the last is written, not yet reported): the
            # pass must still be waiting for the tensors only that piece holds.
            gated.release(pieces - 1)
            deadline = time.monotonic() + TIMEOUT_S
            while gated.reported < pieces - 1:  # every released piece has been reported
                assert time.monotonic() < deadline, "the copy stopped reporting pieces"
                await asyncio.sleep(0.01)
            done, _ = await asyncio.wait([first], timeout=1.0)
            seen["token_before_weights"] = bool(done)
            seen["reported_before_last"] = gated.reported
            gated.release()
            events = [await asyncio.wait_for(first, TIMEOUT_S)]
            events += [e async for e in stream]
            deadline = time.monotonic() + TIMEOUT_S
            while inst.timings.streamed_s == 0:
                assert time.monotonic() < deadline, "the copy never completed"
                await asyncio.sleep(0.02)
            seen["pinned_after"] = inst.pinned
            seen["dram_pinned"] = [h.pinned for h in gated.store.holdings()[TierName.DRAM]]
            await manager.unload("s")
            seen["dram_after_unload"] = [h.pinned for h in gated.store.holdings()[TierName.DRAM]]
            seen["slots"] = manager.budget.used_slots
            return [e.token_id for e in events if e.has_token], seen
        finally:
            await manager.close()
            for pool in manager.pools.values():
                await pool.close()

    ids, seen = asyncio.run(asyncio.wait_for(go(), 2 * TIMEOUT_S))
    assert pieces > 10 and seen["reported_when_serving"] == 0, "serving before any weight"
    assert not seen["pinned_while_copying"] and seen["origin"] is Origin.DISK
    assert seen["reported_before_last"] == pieces - 1
    assert not seen["token_before_weights"], "a token came out before its weights had landed"
    assert ids == _reference(pieces_ckpt, prompt, n)
    assert seen["pinned_after"] and seen["dram_pinned"] == [1]
    assert seen["dram_after_unload"] == [0] and seen["slots"] == 0


def test_a_copy_that_fails_mid_load_ends_the_request_and_frees_everything(
    gated: GatedStore, pieces_ckpt: Path
) -> None:
    async def go() -> tuple[BaseException | None, InstanceManager]:
        manager = await _manager(gated)
        try:
            await asyncio.wait_for(manager.load(_load_request(pieces_ckpt)), TIMEOUT_S)
            stream = manager.generate(_greedy([5, 17], 4))
            first = asyncio.ensure_future(_first_event(stream))
            gated.release(3)  # a few pieces land, then the disk fails
            await asyncio.wait([first], timeout=0.2)
            gated.fail = True
            gated.release()
            error: BaseException | None = None
            try:
                await asyncio.wait_for(first, TIMEOUT_S)
            except (grpc.aio.AioRpcError, InstanceGoneError) as exc:
                error = exc
            deadline = time.monotonic() + TIMEOUT_S
            while manager.instances:
                assert time.monotonic() < deadline, "the failed instance is still listed"
                await asyncio.sleep(0.02)
            return error, manager
        finally:
            await manager.close()
            for pool in manager.pools.values():
                await pool.close()

    error, manager = asyncio.run(asyncio.wait_for(go(), 2 * TIMEOUT_S))
    assert isinstance(error, InstanceGoneError), f"not resumable elsewhere: {error!r}"
    assert manager.budget.used_slots == 0 and manager.budget.reserved_bytes == 0
    assert gated.store.holdings()[TierName.DRAM] == [], "a failed copy left a DRAM entry"
    assert not any(gated.store.config.dram_root.joinpath(".staging").glob("*"))


def test_a_checkpoint_converted_at_load_is_not_streamed(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path, tmp_path: Path
) -> None:
    import torch

    bf16 = _rewrite(tiny_ckpt_dir, tmp_path / "bf16", dtype=torch.bfloat16)
    gated = _gated(make_store, bf16)
    gated.release()  # nothing held back: the load must wait for the whole copy by itself
    prompt, n = [5, 17, 42, 7], 4

    async def go() -> tuple[bool, float, list[int]]:
        manager = await _manager(gated)
        try:
            inst = await asyncio.wait_for(manager.load(_load_request(bf16)), TIMEOUT_S)
            events = [e async for e in manager.generate(_greedy(prompt, n))]
            return inst.pinned, inst.timings.streamed_s, [e.token_id for e in events if e.has_token]
        finally:
            await manager.close()
            for pool in manager.pools.values():
                await pool.close()

    pinned, streamed_s, ids = asyncio.run(asyncio.wait_for(go(), 2 * TIMEOUT_S))
    assert pinned and streamed_s == 0, "a bf16 checkpoint loads once its copy is whole"
    assert ids == _reference(bf16, prompt, n)
