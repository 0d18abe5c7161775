"""The store's tiers under pressure: LRU eviction, byte budgets, pins, restarts.

Checkpoints here are local stoke checkpoints of ~100 KiB; tiers get budgets of 250 KiB, so two
fit and a third forces an eviction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoint_format import MANIFEST_NAME, write_checkpoint
from node_agent.facts.tiers import TierName
from node_agent.store import (
    NoRoomError,
    NotHeldError,
    NotPinnedError,
    PinnedError,
    StoreLockedError,
    TooLargeError,
    checkpoint_key,
)

KIB = 1 << 10
BUDGET = 250 * KIB
DISK = TierName.DISK
DRAM = TierName.DRAM


def make_ckpt(path: Path, *, seed: int, nbytes: int = 100 * KIB) -> Path:
    """A one-tensor checkpoint whose bytes (and so key) depend on `seed`."""
    write_checkpoint({"w": torch.full((nbytes,), seed, dtype=torch.uint8)}, path, fsync=False)
    return path


def key_of(ckpt: Path) -> str:
    return checkpoint_key((ckpt / MANIFEST_NAME).read_bytes())


def held_keys(store: Any, tier: TierName) -> set[str]:
    return {h.key for h in store.holdings()[tier]}


@pytest.fixture
def ckpts(tmp_path: Path) -> list[Path]:
    return [make_ckpt(tmp_path / f"src-{i}", seed=i + 1) for i in range(3)]


@pytest.fixture
def small_store(make_store: Callable[..., Any]) -> Any:
    return make_store(disk_budget=BUDGET, dram_budget=BUDGET)


def test_lru_evicts_the_least_recently_used(small_store: Any, ckpts: list[Path]) -> None:
    a, b, c = ckpts
    small_store.ensure(a, DISK)
    small_store.ensure(b, DISK)
    small_store.ensure(a, DISK)  # a is now more recent than b
    small_store.ensure(c, DISK)
    assert held_keys(small_store, DISK) == {key_of(a), key_of(c)}
    assert not (small_store.config.disk_dir / key_of(b)).exists()


def test_pinned_checkpoint_is_never_evicted(small_store: Any, ckpts: list[Path]) -> None:
    a, b, c = ckpts
    small_store.ensure(a, DISK, pin=True)  # oldest, but in use
    small_store.ensure(b, DISK)
    small_store.ensure(c, DISK)
    assert held_keys(small_store, DISK) == {key_of(a), key_of(c)}


def test_no_room_when_pins_fill_the_budget(small_store: Any, ckpts: list[Path]) -> None:
    a, b, c = ckpts
    small_store.ensure(a, DISK, pin=True)
    small_store.ensure(b, DISK, pin=True)
    assert not small_store.can_admit(DISK, 100 * KIB)
    with pytest.raises(NoRoomError, match=r"pinned by running instances: .*" + key_of(a)[:12]):
        small_store.ensure(c, DISK)
    assert held_keys(small_store, DISK) == {key_of(a), key_of(b)}


def test_too_large_is_refused_without_evicting(
    small_store: Any, ckpts: list[Path], tmp_path: Path
) -> None:
    small_store.ensure(ckpts[0], DISK)
    big = make_ckpt(tmp_path / "big", seed=9, nbytes=300 * KIB)
    with pytest.raises(TooLargeError, match=r"more than the whole disk tier budget of 250\.00 KiB"):
        small_store.ensure(big, DISK)
    assert held_keys(small_store, DISK) == {key_of(ckpts[0])}


def test_pins_are_refcounted_and_block_evict(small_store: Any, ckpts: list[Path]) -> None:
    key = key_of(ckpts[0])
    small_store.ensure(ckpts[0], DISK, pin=True)
    small_store.pin(key, DISK)
    small_store.unpin(key, DISK)
    with pytest.raises(PinnedError, match="pinned 1 time"):
        small_store.evict(key, DISK)
    small_store.unpin(key, DISK)
    with pytest.raises(NotPinnedError):
        small_store.unpin(key, DISK)
    assert small_store.evict(key, DISK) > 100 * KIB
    with pytest.raises(NotHeldError):
        small_store.pin(key, DISK)


def test_use_pins_only_inside_the_block(small_store: Any, ckpts: list[Path]) -> None:
    with small_store.use(ckpts[0], DRAM) as path:
        assert [h.pinned for h in small_store.holdings()[DRAM]] == [1]
        assert path.parent == small_store.config.dram_root
    assert [h.pinned for h in small_store.holdings()[DRAM]] == [0]


def test_reservations_count_against_the_budget(small_store: Any) -> None:
    disk = small_store.tiers[DISK]
    reservation = disk.reserve("a" * 64, 200 * KIB)
    assert not disk.can_admit(100 * KIB)
    disk.abandon(reservation)
    assert disk.can_admit(100 * KIB)
    assert disk.used_bytes == 0


def test_disk_tier_survives_a_restart(
    make_store: Callable[..., Any], ckpts: list[Path], small_store: Any
) -> None:
    a, b, _ = ckpts
    small_store.ensure(b, DISK)
    small_store.ensure(a, DISK)
    before = small_store.holdings()[DISK]
    small_store.close()
    index = json.loads((small_store.config.disk_dir / "index.json").read_text())
    assert {e["key"] for e in index["entries"]} == {key_of(a), key_of(b)}
    reopened = make_store(disk_budget=BUDGET, dram_budget=BUDGET)
    after = reopened.holdings()[DISK]
    assert [(h.key, h.source, h.nbytes) for h in after] == [
        (h.key, h.source, h.nbytes) for h in before
    ]


def test_dram_tier_is_rebuilt_from_shm_and_damage_discarded(
    make_store: Callable[..., Any], ckpts: list[Path], small_store: Any
) -> None:
    a, b, _ = ckpts
    small_store.ensure(a, DRAM)
    damaged = small_store.ensure(b, DRAM)
    small_store.close()
    os.truncate(damaged / "arena.json", 10)  # as if someone edited /dev/shm
    leftover = small_store.config.dram_root / ".staging" / ("f" * 64)
    leftover.mkdir(parents=True)
    reopened = make_store(disk_budget=BUDGET, dram_budget=BUDGET)
    assert held_keys(reopened, DRAM) == {key_of(a)}
    assert not damaged.exists() and not leftover.exists()
    assert [h.pinned for h in reopened.holdings()[DRAM]] == [0]


def test_damaged_index_is_rebuilt_from_the_directory(
    make_store: Callable[..., Any], ckpts: list[Path], small_store: Any
) -> None:
    small_store.ensure(ckpts[0], DISK)
    small_store.close()
    (small_store.config.disk_dir / "index.json").write_text("{not json")
    reopened = make_store(disk_budget=BUDGET, dram_budget=BUDGET)
    assert held_keys(reopened, DISK) == {key_of(ckpts[0])}


def test_a_second_agent_on_the_same_directories_is_refused(
    make_store: Callable[..., Any], small_store: Any
) -> None:
    with pytest.raises(StoreLockedError, match="another process"):
        make_store()


@pytest.mark.parametrize("attack", ["symlink", "group-writable"])
def test_a_tier_directory_others_could_control_is_refused(
    make_store: Callable[..., Any], tmp_path: Path, attack: str
) -> None:
    from node_agent.store import StoreError

    dram = tmp_path / "dram"
    if attack == "symlink":
        (tmp_path / "elsewhere").mkdir()
        dram.symlink_to(tmp_path / "elsewhere")
    else:
        dram.mkdir()
        dram.chmod(0o777)
    with pytest.raises(StoreError, match="only this user can write"):
        make_store(dram_dir=dram)


def test_a_new_tier_directory_is_private(make_store: Callable[..., Any], tmp_path: Path) -> None:
    make_store(dram_dir=tmp_path / "dram")
    assert (tmp_path / "dram").stat().st_mode & 0o777 == 0o700


def test_a_fill_finishing_after_close_is_refused_and_leaves_the_tier_alone(
    small_store: Any,
) -> None:
    from node_agent.store import StoreClosedError
    from node_agent.store.index import INDEX_NAME

    tier = small_store.tiers[DISK]
    reservation = tier.reserve("f" * 64, 4 * KIB)
    reservation.staging.mkdir(parents=True, exist_ok=True)
    small_store.close()  # shutdown while the fill is still running
    index_before = (tier.root / INDEX_NAME).read_bytes()
    with pytest.raises(StoreClosedError, match="closed"):
        tier.admit(reservation, "late-source")
    tier.abandon(reservation, keep_partial=True)  # what the fill does next: must be a no-op
    assert not (tier.root / ("f" * 64)).exists() and reservation.staging.exists()
    assert (tier.root / INDEX_NAME).read_bytes() == index_before


def test_a_checkpoint_reached_from_two_sources_is_found_by_both(
    make_store: Callable[..., Any], ckpts: list[Path], small_store: Any, tmp_path: Path
) -> None:
    a = ckpts[0]
    twin = make_ckpt(tmp_path / "twin", seed=1)  # the same bytes elsewhere (its copy, say)
    small_store.ensure(a, DRAM)
    small_store.ensure(twin, DRAM)
    both = (str(twin), str(a))  # most recent first
    assert [h.sources for h in small_store.holdings()[DRAM]] == [both]
    assert [h.sources for h in small_store.holdings()[DISK]] == [both]
    assert small_store.locate(str(a)).key == small_store.locate(str(twin)).key == key_of(a)
    small_store.close()
    reopened = make_store(disk_budget=BUDGET, dram_budget=BUDGET)  # an agent restart
    assert [h.sources for h in reopened.holdings()[DISK]] == [both]
    assert [h.sources for h in reopened.holdings()[DRAM]] == [both]
    assert reopened.locate(str(a)).key == key_of(a)


def test_sources_per_checkpoint_are_bounded_keeping_the_most_recent(
    small_store: Any, tmp_path: Path
) -> None:
    from node_agent.store.tier_state import MAX_SOURCES

    copies = [make_ckpt(tmp_path / f"copy-{i}", seed=7) for i in range(MAX_SOURCES + 2)]
    for copy in copies:
        small_store.ensure(copy, DISK)
    (held,) = small_store.holdings()[DISK]
    assert held.sources == tuple(str(c) for c in reversed(copies))[:MAX_SOURCES]
    assert small_store.locate(str(copies[0])) is None  # forgotten: the oldest


def test_an_index_from_before_sources_is_read_as_its_one_source(
    make_store: Callable[..., Any], ckpts: list[Path], small_store: Any
) -> None:
    a = ckpts[0]
    small_store.ensure(a, DISK)
    small_store.close()
    index_path = small_store.config.disk_dir / "index.json"
    index = json.loads(index_path.read_text())
    for entry in index["entries"]:
        del entry["sources"]
    index_path.write_text(json.dumps(index))
    reopened = make_store(disk_budget=BUDGET, dram_budget=BUDGET)
    assert [h.sources for h in reopened.holdings()[DISK]] == [(str(a),)]
