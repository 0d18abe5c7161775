"""Streamed promotions: `Landed` (which ranges of a copy have been written), a copy's `Tap`
(its staging files, its pieces in the order asked for), the store passing a tap through
`ensure_with_origin`, and the order a decoder needs its tensors in."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from checkpoint_format import MANIFEST_NAME, Manifest, read_manifest
from node_agent.facts.tiers import Origin
from node_agent.instances.streaming import need_order
from node_agent.landing import CopyFailedError, Landed
from node_agent.store.copy import copy_checkpoint


def test_landed_merges_ranges_and_answers_coverage() -> None:
    landed = Landed([100, 10])
    landed.add(0, 10, 20)
    landed.add(0, 30, 40)
    assert not landed.covers(0, 10, 40)
    landed.add(0, 20, 30)  # fills the gap: one span 10..40
    assert landed.covers(0, 10, 40) and landed.covers(0, 15, 35)
    assert not landed.covers(0, 0, 11) and not landed.covers(0, 39, 41)
    assert landed.covers(0, 50, 50), "an empty range is always covered"
    assert not landed.complete
    landed.add(0, 0, 100)
    landed.add(1, 0, 10)
    assert landed.complete


def test_landed_rejects_ranges_outside_the_checkpoint() -> None:
    landed = Landed([100])
    with pytest.raises(ValueError, match="outside"):
        landed.add(0, 90, 101)
    with pytest.raises(ValueError, match="outside"):
        landed.add(1, 0, 1)


def test_a_waiter_is_released_by_the_add_that_covers_its_range() -> None:
    landed = Landed([100])
    done = threading.Event()

    def wait() -> None:
        landed.wait(0, 0, 50, timeout=30)
        done.set()

    thread = threading.Thread(target=wait)
    thread.start()
    landed.add(0, 0, 20)
    assert not done.is_set() or landed.covers(0, 0, 50)
    landed.add(0, 20, 50)
    thread.join(30)
    assert done.is_set()


def test_a_failed_copy_fails_current_and_later_waiters() -> None:
    landed = Landed([100])
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            landed.wait(0, 0, 100, timeout=30)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    landed.fail("disk on fire")
    thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], CopyFailedError)
    assert "disk on fire" in str(errors[0])
    with pytest.raises(CopyFailedError):
        landed.wait(0, 0, 1)


def test_a_wait_that_times_out_says_which_bytes() -> None:
    with pytest.raises(TimeoutError, match=r"\[0, 5\) of partition 0"):
        Landed([10]).wait(0, 0, 5, timeout=0.01)


class RecordingTap:
    """Records what a copy tells it; `wanted` is the order it asks for."""

    def __init__(self, wanted: list[tuple[int, int, int]]) -> None:
        self.wanted = wanted
        self.events: list[tuple[str, Any]] = []
        self.origin: Origin | None = None
        self.lock = threading.Lock()

    def order(self, manifest: Manifest) -> list[tuple[int, int, int]]:
        return self.wanted

    def came_from(self, origin: Origin) -> None:
        self.origin = origin

    def begin(self, staging: Path, committed: Path, manifest_bytes: bytes) -> None:
        files = {p.name: p.stat().st_size for p in staging.iterdir()}
        with self.lock:
            self.events.append(("begin", (staging, committed, manifest_bytes, files)))

    def landed(self, partition: int, start: int, end: int) -> None:
        with self.lock:
            self.events.append(("landed", (partition, start, end)))


def test_a_tapped_copy_reports_its_staging_then_every_piece_in_the_order_asked(
    tmp_path: Path,
) -> None:
    import torch

    from checkpoint_format import write_checkpoint

    piece = 64 << 10  # verified copies move one chunk per piece, whatever caches the source
    src = tmp_path / "src"
    tensors = {f"model.layers.{i}.w": torch.full((20000,), float(i)) for i in range(8)}
    manifest = write_checkpoint(tensors, src, config={"x": 1}, chunk_size=piece)
    data = (src / MANIFEST_NAME).read_bytes()
    (part,) = manifest.partitions
    # Ask for the last piece first, then the first: those two lead, the rest follow in order.
    last = (part.nbytes - 1) // piece * piece
    tap = RecordingTap([(0, last, part.nbytes), (0, 0, 1)])
    dst = tmp_path / "dst"
    dst.mkdir()
    copy_checkpoint(
        src,
        dst,
        manifest,
        data,
        threads=1,
        read_size=piece,
        verify=True,
        durable=False,
        tap=tap,
        committed=tmp_path / "final",
    )
    kind, (staging, committed, got_bytes, files) = tap.events[0]
    assert kind == "begin" and staging == dst and committed == tmp_path / "final"
    assert got_bytes == data
    assert MANIFEST_NAME not in files, "the manifest lands last, after every weight"
    assert files[part.file] == part.nbytes, "partition files exist at full size from the start"
    assert set(manifest.files) <= set(files), "config and tokenizer are there before the weights"
    landed = [r for kind, r in tap.events[1:]]
    assert all(kind == "landed" for kind, _ in tap.events[1:])
    assert landed[0] == (0, last, part.nbytes) and landed[1] == (0, 0, piece)
    starts = [start for _, start, _ in landed[2:]]
    assert starts == sorted(starts)
    covered = Landed([part.nbytes])
    for r in landed:
        covered.add(*r)
    assert covered.complete
    assert (dst / part.file).read_bytes() == (src / part.file).read_bytes()


def test_the_store_taps_a_promotion_and_names_where_it_lands(
    make_store: Any, tiny_ckpt_dir: Path, tmp_path: Path
) -> None:
    src = Path(shutil.copytree(tiny_ckpt_dir, tmp_path / "src"))
    store = make_store()
    store.ensure(src, "disk")
    tap = RecordingTap([])
    ensured = store.ensure_with_origin(src, "dram", pin=True, tap=tap)
    try:
        kinds = [kind for kind, _ in tap.events]
        assert kinds[0] == "begin" and kinds.count("begin") == 1 and "landed" in kinds
        _, (staging, committed, _, _) = tap.events[0]
        assert committed == ensured.path, "the tap is told where the copy is committed"
        assert not staging.exists(), "the staging directory was renamed into place"
        assert tap.origin is Origin.DISK == ensured.origin
    finally:
        store.unpin(ensured.path.name, "dram")
    again = RecordingTap([])
    store.ensure_with_origin(src, "dram", tap=again)
    assert again.events == [], "nothing is copied when DRAM already holds it"


def test_need_order_is_embeddings_then_layers_by_number_then_the_rest(tiny_ckpt_dir: Path) -> None:
    manifest = read_manifest(tiny_ckpt_dir)
    by_range = {
        (e.partition, e.offset, e.offset + e.nbytes): n for n, e in manifest.tensors.items()
    }
    names = [by_range[r] for r in need_order(manifest)]
    assert sorted(names) == sorted(manifest.tensors)
    assert names[0] == "model.embed_tokens.weight"
    layers = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
    assert layers == sorted(layers) and len(set(layers)) > 1
    last_layer = max(i for i, n in enumerate(names) if n.startswith("model.layers."))
    assert set(names[last_layer + 1 :]) == {"model.norm.weight", "lm_head.weight"}


def test_need_order_puts_layer_2_before_layer_10_and_the_head_last(tmp_path: Path) -> None:
    import torch

    from checkpoint_format import write_checkpoint

    names = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    names += [f"model.layers.{i}.mlp.weight" for i in (10, 2, 0)]
    manifest = write_checkpoint({n: torch.zeros(4) for n in names}, tmp_path / "ckpt")
    by_range = {
        (e.partition, e.offset, e.offset + e.nbytes): n for n, e in manifest.tensors.items()
    }
    got = [by_range[r] for r in need_order(manifest)]
    assert got[:4] == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.weight",
        "model.layers.2.mlp.weight",
        "model.layers.10.mlp.weight",
    ]
    assert set(got[4:]) == {"lm_head.weight", "model.norm.weight"}


def test_only_float32_checkpoints_with_a_config_file_are_streamable(
    tiny_ckpt_dir: Path, tmp_path: Path
) -> None:
    import torch

    from checkpoint_format import write_checkpoint
    from node_agent.instances.streaming import streamable

    assert streamable(read_manifest(tiny_ckpt_dir))
    tensors = {"model.layers.0.w": torch.zeros(4)}
    half = write_checkpoint(tensors, tmp_path / "bf16", dtype=torch.bfloat16, copy_files=[
        tiny_ckpt_dir / "config.json"])  # fmt: skip
    assert not streamable(half)
    inline = write_checkpoint(tensors, tmp_path / "inline", config={"hidden_size": 4})
    assert not streamable(inline), "config lands last"


def test_a_promotion_right_after_a_conversion_reports_the_conversion(
    make_store: Any, tiny_model_dir: Path
) -> None:
    store = make_store(dram_budget=256 << 20, disk_budget=256 << 20)
    tap = RecordingTap([])
    ensured = store.ensure_with_origin(tiny_model_dir, "dram", tap=tap)
    assert ensured.origin is Origin.CONVERTED and tap.origin is Origin.CONVERTED
