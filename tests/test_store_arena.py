"""The DRAM tier's arena: allocated once at open, promotions land in it, loads bind in it
without a copy; eviction when it is too fragmented for a large checkpoint; crash safety (a
real process killed mid-promotion, SIGKILL) and checksums after an unclean shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoint_format import MANIFEST_NAME, write_checkpoint
from loader import load_state_dict
from loader.arena import PLACEMENT_NAME, ArenaMap
from loader.sysio import present_pages
from node_agent.facts.errors import StoreError
from node_agent.facts.tiers import TierName
from node_agent.store import NoRoomError, checkpoint_key

KIB, MIB = 1 << 10, 1 << 20
DISK, DRAM = TierName.DISK, TierName.DRAM
REPO = Path(__file__).resolve().parents[1]


def make_ckpt(path: Path, *, seed: int, nbytes: int) -> Path:
    values = torch.arange(nbytes // 4, dtype=torch.int32) * (seed + 1)
    write_checkpoint({"w": values}, path, fsync=False)
    return path


def key_of(ckpt: Path) -> str:
    return checkpoint_key((ckpt / MANIFEST_NAME).read_bytes())


def held(store: Any) -> set[str]:
    return {h.key for h in store.holdings()[DRAM]}


def same_tensors(ckpt: Path, path: Path, **kwargs: Any) -> bool:
    want, got = load_state_dict(ckpt), load_state_dict(path, **kwargs)
    return want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)


def test_the_arena_is_allocated_at_open_and_kept_across_a_restart(
    make_store: Callable[..., Any], tmp_path: Path
) -> None:
    store = make_store(dram_budget=MIB, disk_budget=4 * MIB)
    arena = store.arena_path
    st = os.stat(arena)
    assert st.st_size == MIB and st.st_blocks * 512 >= MIB  # every page allocated up front
    ckpt = make_ckpt(tmp_path / "a", seed=1, nbytes=200 * KIB)
    store.ensure(ckpt, DRAM)
    store.close()
    reopened = make_store(dram_budget=MIB, disk_budget=4 * MIB)
    assert os.stat(arena).st_ino == st.st_ino  # the same arena, not a new one
    assert held(reopened) == {key_of(ckpt)}
    assert same_tensors(ckpt, reopened.ensure(ckpt, DRAM))


def test_a_new_budget_recreates_the_arena_and_drops_what_it_held(
    make_store: Callable[..., Any], tmp_path: Path
) -> None:
    store = make_store(dram_budget=MIB, disk_budget=4 * MIB)
    store.ensure(make_ckpt(tmp_path / "a", seed=1, nbytes=200 * KIB), DRAM)
    store.close()
    reopened = make_store(dram_budget=2 * MIB, disk_budget=4 * MIB)
    assert os.stat(reopened.arena_path).st_size == 2 * MIB
    assert held(reopened) == set()


def test_an_arena_the_machine_cannot_hold_is_refused_naming_the_fix(
    make_store: Callable[..., Any],
) -> None:
    with pytest.raises(StoreError, match="lower --dram-cache"):
        make_store(dram_budget=1 << 50)


def test_a_load_binds_tensors_inside_the_mapping_made_once(
    make_store: Callable[..., Any], tmp_path: Path
) -> None:
    store = make_store(dram_budget=MIB, disk_budget=4 * MIB)
    ckpt = make_ckpt(tmp_path / "a", seed=3, nbytes=300 * KIB)
    path = store.ensure(ckpt, DRAM)
    assert (path / PLACEMENT_NAME).exists() and not (path / "partition-00000.bin").exists()
    arena = ArenaMap(store.arena_path)
    base = arena.address()
    assert present_pages(base, arena.size) == (arena.size // 4096,) * 2  # populated at once
    tensors = load_state_dict(path, arena=arena)
    assert same_tensors(ckpt, path, arena=arena)
    w = tensors["w"]
    assert base <= w.data_ptr() and w.data_ptr() + w.nbytes <= base + arena.size  # no copy


def test_checkpoints_after_the_first_bind_at_their_own_offsets(
    make_store: Callable[..., Any], tmp_path: Path
) -> None:
    """A worker maps the arena before anything is promoted; later checkpoints land at non-zero
    offsets and must bind there, not at the start of the mapping (a bug once: as_strided counts
    from the start of the storage)."""
    store = make_store(dram_budget=MIB, disk_budget=4 * MIB)
    arena = ArenaMap(store.arena_path)
    ckpts = [
        make_ckpt(tmp_path / name, seed=s, nbytes=200 * KIB) for name, s in (("a", 1), ("b", 2))
    ]
    paths = [store.ensure(ckpt, DRAM) for ckpt in ckpts]
    offsets = [
        json.loads((p / PLACEMENT_NAME).read_text())["partitions"][0]["offset"] for p in paths
    ]
    assert offsets[1] > 0
    for ckpt, path in zip(ckpts, paths, strict=True):
        assert same_tensors(ckpt, path, arena=arena)


def _split_arena(make_store: Callable[..., Any], tmp_path: Path) -> tuple[Any, Path, Path, Path]:
    """A 1 MiB arena holding checkpoints a (pinned) and c with a 300 KiB hole between them and
    ~124 KiB free at the end, and a 400 KiB checkpoint `big` not yet in it: (store, a, c, big)."""
    store = make_store(dram_budget=MIB, disk_budget=4 * MIB)
    a, b, c = (make_ckpt(tmp_path / n, seed=i, nbytes=300 * KIB) for i, n in enumerate("abc"))
    for ckpt in (a, b, c):
        store.ensure(ckpt, DRAM)
    store.evict(key_of(b), DRAM)
    store.pin(key_of(a), DRAM)
    return store, a, c, make_ckpt(tmp_path / "big", seed=9, nbytes=400 * KIB)


def test_a_fragmented_arena_evicts_more_to_fit_a_large_checkpoint(
    make_store: Callable[..., Any], tmp_path: Path
) -> None:
    store, a, _c, big = _split_arena(make_store, tmp_path)
    # By bytes it fits without evicting anything; contiguously only once c is gone.
    assert store.can_admit(DRAM, 401 * KIB)
    path = store.ensure(big, DRAM)
    assert held(store) == {key_of(a), key_of(big)}
    assert same_tensors(big, path) and same_tensors(a, store.ensure(a, DRAM))


def test_pins_that_split_the_arena_give_no_room_and_evict_nothing(
    make_store: Callable[..., Any], tmp_path: Path
) -> None:
    store, a, c, big = _split_arena(make_store, tmp_path)
    store.pin(key_of(c), DRAM)
    with pytest.raises(NoRoomError, match="DRAM arena has no room"):
        store.ensure(big, DRAM)
    assert held(store) == {key_of(a), key_of(c)}


# A node agent's store in its own process: it promotes `src` into DRAM and, at the step named,
# says so on stdout and waits (for the SIGKILL that the test sends).
_CHILD = """
import json, sys
from pathlib import Path
from node_agent.store import CheckpointStore, StoreConfig

conf, src, when = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
store = CheckpointStore(StoreConfig(node_id=conf["node_id"], disk_dir=Path(conf["disk_dir"]),
    disk_budget=conf["disk_budget"], dram_budget=conf["dram_budget"], copy_threads=1,
    copy_read_size=64 << 10)).open()

class Tap:
    landed_once = False
    def order(self, manifest): return []
    def came_from(self, origin): pass
    def begin(self, staging, committed, manifest_bytes): pass
    def landed(self, partition, start, end):
        if when == "mid-copy" and not self.landed_once:
            self.landed_once = True
            print("mid-copy", flush=True)
            sys.stdin.read()

store.ensure_with_origin(src, "dram", tap=Tap())
print("promoted", flush=True)
sys.stdin.read()
"""


def _kill_agent_at(store: Any, src: Path, when: str) -> None:
    """Run a store on `store`'s directories in another process, promoting `src`, and SIGKILL
    it at `when` ("mid-copy": after its first piece landed; "promoted": once committed)."""
    config = store.config
    store.close()
    conf = {
        "node_id": config.node_id,
        "disk_dir": str(config.disk_dir),
        "disk_budget": config.disk_budget,
        "dram_budget": config.dram_budget,
    }
    argv = [sys.executable, "-c", _CHILD, json.dumps(conf), str(src), when]
    child = subprocess.Popen(
        argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == when
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert child.stdin is not None
        child.stdin.close()
        child.stdout.close()  # type: ignore[union-attr]


def test_an_agent_killed_mid_promotion_serves_no_half_written_extent(
    make_store: Callable[..., Any], tmp_path: Path
) -> None:
    store = make_store(dram_budget=MIB, disk_budget=4 * MIB)
    ckpt = make_ckpt(tmp_path / "a", seed=4, nbytes=512 * KIB)
    store.ensure(ckpt, DISK)
    _kill_agent_at(store, ckpt, "mid-copy")
    reopened = make_store(dram_budget=MIB, disk_budget=4 * MIB)
    assert held(reopened) == set()  # the half-written copy is not an entry
    tier = reopened.tiers[DRAM]
    assert tier.space.extents.free_bytes == tier.space.arena.size  # its extents are free
    assert list((tier.root / ".staging").iterdir()) == []
    index = json.loads((tier.root / "index.json").read_text())
    assert index["entries"] == [] and index["clean"] is False  # open; not closed yet
    assert same_tensors(ckpt, reopened.ensure(ckpt, DRAM))  # promoted again, whole


def test_after_an_unclean_shutdown_a_corrupt_extent_is_refused(
    make_store: Callable[..., Any], tmp_path: Path
) -> None:
    store = make_store(dram_budget=MIB, disk_budget=4 * MIB)
    good, bad = make_ckpt(tmp_path / "g", seed=5, nbytes=100 * KIB), None
    store.ensure(good, DRAM)
    bad = make_ckpt(tmp_path / "b", seed=6, nbytes=100 * KIB)
    store.ensure(bad, DISK)
    _kill_agent_at(store, bad, "promoted")
    entry = store.config.dram_root / key_of(bad)
    placement = json.loads((entry / PLACEMENT_NAME).read_text())
    offset = placement["partitions"][0]["offset"] + 5000
    with open(store.config.dram_root / "arena", "r+b") as arena:  # one flipped byte
        arena.seek(offset)
        byte = arena.read(1)
        arena.seek(offset)
        arena.write(bytes([byte[0] ^ 0xFF]))
    reopened = make_store(dram_budget=MIB, disk_budget=4 * MIB)
    assert held(reopened) == {key_of(good)}  # the intact one is kept; the corrupt one refused
    assert not entry.exists()
    assert same_tensors(bad, reopened.ensure(bad, DRAM))
