"""`CheckpointStore.ensure` from local sources: identity, DRAM promotion, Hugging Face
conversion, corruption, bandwidths; and the small pure pieces (sizes, sources, config)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoint_format import MANIFEST_NAME, read_manifest
from loader import load_state_dict
from loader.sysio import resident_fraction
from node_agent.facts.errors import InvalidSourceError
from node_agent.facts.sources import S3Source, parse_source
from node_agent.facts.tiers import Origin, TierName
from node_agent.store import CorruptObjectError, StoreConfig, StoreError, checkpoint_key

DISK, DRAM = TierName.DISK, TierName.DRAM


def key_of(ckpt: Path) -> str:
    return checkpoint_key((ckpt / MANIFEST_NAME).read_bytes())


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_dram_copy_is_in_shared_memory_and_loads_identically(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path
) -> None:
    store = make_store()
    path = store.ensure(tiny_ckpt_dir, DRAM)
    owner_and_node = f"stoke-{os.geteuid()}-{store.config.node_id}"
    assert path == Path("/dev/shm") / owner_and_node / key_of(tiny_ckpt_dir)
    # The small files are copied; the partitions' bytes are in the tier's arena (arena.json).
    partitions = {p.file for p in read_manifest(tiny_ckpt_dir).partitions}
    small = {n: b for n, b in files_of(tiny_ckpt_dir).items() if n not in partitions}
    assert files_of(path) == small | {"arena.json": (path / "arena.json").read_bytes()}
    want, got = load_state_dict(tiny_ckpt_dir), load_state_dict(path)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[name], got[name]) for name in want)
    assert store.locate(str(tiny_ckpt_dir)).tier is DRAM


def test_same_checkpoint_from_two_paths_is_stored_once(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path, tmp_path: Path
) -> None:
    store = make_store()
    twin = shutil.copytree(tiny_ckpt_dir, tmp_path / "twin")
    assert store.ensure(tiny_ckpt_dir, DISK) == store.ensure(twin, DISK)
    assert len(store.holdings()[DISK]) == 1
    assert store.stats().imports == 1


def test_changed_checkpoint_at_the_same_path_is_a_new_entry(
    make_store: Callable[..., Any], tiny_model_dir: Path, tmp_path: Path
) -> None:
    from checkpoint_format import convert_hf

    store = make_store()
    convert_hf(tiny_model_dir, tmp_path / "ckpt", progress=False)
    first = store.ensure(tmp_path / "ckpt", DISK)
    shutil.rmtree(tmp_path / "ckpt")
    convert_hf(tiny_model_dir, tmp_path / "ckpt", progress=False, dtype="bfloat16")
    second = store.ensure(tmp_path / "ckpt", DISK)
    assert first != second and first.exists()
    assert store.locate(str(tmp_path / "ckpt")).key == second.name


def test_hugging_face_directory_is_converted_once(
    make_store: Callable[..., Any], tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = make_store()
    hf = shutil.copytree(tiny_model_dir, tmp_path / "hf")
    first = store.ensure(hf, DRAM)
    assert store.ensure(hf, DISK).name == first.name
    assert store.ensure(hf, DRAM) == first
    assert store.stats().conversions == 1
    os.utime(hf / "config.json", ns=(1, 1))  # touched: converted again, same content, same key
    assert store.ensure(hf, DISK).name == first.name
    assert store.stats().conversions == 2
    assert len(store.holdings()[DISK]) == 1
    assert read_manifest(first).config == read_manifest(store.ensure(hf, DISK)).config


def test_corrupt_local_checkpoint_is_rejected_and_not_installed(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path, tmp_path: Path
) -> None:
    store = make_store()
    bad = shutil.copytree(tiny_ckpt_dir, tmp_path / "bad")
    with open(bad / "partition-00000.bin", "r+b") as f:
        f.seek(3 * 65536 + 100)
        f.write(b"\xff\x00\xff")
    with pytest.raises(CorruptObjectError, match=r"partition-00000\.bin: chunk 3 \(bytes"):
        store.ensure(bad, DISK)
    assert store.holdings()[DISK] == [] and store.locate(key_of(bad)) is None
    assert list((store.config.disk_dir / ".staging").iterdir()) == []


def test_promotion_of_a_cold_file_reads_direct_and_leaves_no_page_cache_copy(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path
) -> None:
    from loader.sysio import evict_from_page_cache

    store = make_store()
    disk_copy = store.ensure(tiny_ckpt_dir, DISK)
    evict_from_page_cache(disk_copy / "partition-00000.bin")
    store.ensure(tiny_ckpt_dir, DRAM)
    assert resident_fraction(disk_copy / "partition-00000.bin") < 0.5
    assert store.bandwidths()["disk"] > 0


def test_self_measure_reports_dram_and_disk_bandwidth(make_store: Callable[..., Any]) -> None:
    rates = make_store().self_measure(4 << 20)
    assert rates["dram"] > 0 and rates["disk"] > 0


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("s3://A_bad/x", "not a valid S3 bucket"),
        ("s3://models/a/../b", "'..' segment"),
        ("http://example.com/x", "unsupported scheme"),
        ("/no/such/dir", "no such directory"),
    ],
)
def test_bad_sources_are_rejected_with_the_reason(source: str, message: str) -> None:
    with pytest.raises(InvalidSourceError, match=message):
        parse_source(source)


def test_a_directory_without_weights_points_to_stoke_convert(tmp_path: Path) -> None:
    with pytest.raises(InvalidSourceError, match="stoke convert"):
        parse_source(tmp_path)


def test_s3_uri_is_normalised() -> None:
    src = parse_source("s3://models/llama/8b/")
    assert isinstance(src, S3Source)
    assert (src.bucket, src.prefix, src.uri) == ("models", "llama/8b", "s3://models/llama/8b")


def test_config_rejects_a_node_id_that_is_a_path(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"node id '\.\./etc'"):
        StoreConfig(node_id="../etc", disk_dir=tmp_path, disk_budget=1 << 20, dram_budget=1 << 20)


def test_unknown_tier_is_a_clear_error(make_store: Callable[..., Any], tiny_ckpt_dir: Path) -> None:
    with pytest.raises(StoreError, match=r"tier 'gpu': .*use one of 'dram', 'disk'"):
        make_store().ensure(tiny_ckpt_dir, "gpu")


def test_conversion_estimate_ignores_weights_conversion_will_not_read(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from node_agent.store.conversions import estimate_converted_nbytes

    hf = tmp_path / "hf"
    shutil.copytree(tiny_model_dir, hf)
    before = estimate_converted_nbytes(hf)
    (hf / "pytorch_model.bin").write_bytes(b"\0" * (8 << 20))  # same weights, other format
    (hf / "model.gguf").write_bytes(b"\0" * (8 << 20))
    assert estimate_converted_nbytes(hf) == before


def test_an_hf_conversion_evicted_mid_ensure_is_converted_again(
    make_store: Callable[..., Any], tiny_model_dir: Path
) -> None:
    store = make_store()
    key = store.ensure(tiny_model_dir, DISK).name  # converted once, into the disk tier
    identify = store._identify
    evicted: list[int] = []

    def identify_then_lose_the_race(src: Any) -> Any:
        result = identify(src)
        if not evicted:
            evicted.append(store.evict(key, DISK))  # the copy leaves before the fill uses it
        return result

    store._identify = identify_then_lose_the_race
    path = store.ensure(tiny_model_dir, DRAM)
    assert evicted and path.name == key and (path / MANIFEST_NAME).exists()
    assert store.locate(key) is not None


def test_ensure_says_where_the_bytes_came_from(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = make_store()
    assert store.ensure_with_origin(tiny_ckpt_dir, DRAM).origin is Origin.LOCAL
    assert store.ensure_with_origin(tiny_ckpt_dir, DRAM).origin is Origin.DRAM
    store.evict(key_of(tiny_ckpt_dir), DRAM)
    assert store.ensure_with_origin(tiny_ckpt_dir, DRAM).origin is Origin.DISK
    assert store.ensure_with_origin(tiny_ckpt_dir, DISK).origin is Origin.DISK
    hf = shutil.copytree(tiny_model_dir, tmp_path / "hf")
    store.evict(key_of(tiny_ckpt_dir), DRAM)
    store.evict(key_of(tiny_ckpt_dir), DISK)
    converted = store.ensure_with_origin(hf, DRAM)
    assert converted.origin is Origin.CONVERTED
    assert store.ensure_with_origin(hf, DRAM).origin is Origin.DRAM
    store.evict(converted.path.name, DRAM)  # the converted copy is still on disk: no conversion
    assert store.ensure_with_origin(hf, DRAM).origin is Origin.DISK
    assert store.stats().conversions == 1
