"""checkpoint_format: golden bytes, round trips, tied weights, and every corrupt fixture."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from checkpoint_fixtures import GOLDEN_CONFIG, golden_state_dict, write_golden

import checkpoint_format as cf
from checkpoint_format.checksum import ChunkHasher, crc32_hex
from checkpoint_format.layout import TensorSpec, plan_layout
from loader import load_state_dict

FIXTURES = Path(__file__).parent / "data" / "checkpoint"
GOLDEN = FIXTURES / "golden"
PART = "partition-00000.bin"

# case -> (error raised by read_manifest/verify/load, words the message must contain)
CORRUPT_CASES: dict[str, tuple[type[cf.CheckpointError], tuple[str, ...]]] = {
    "truncated_partition": (cf.TruncatedPartitionError, (PART, "10000 bytes", "16384")),
    "missing_partition": (cf.TruncatedPartitionError, (PART, "missing")),
    "flipped_byte": (cf.ChecksumMismatchError, (PART, "chunk 1", "bytes 4096..8192")),
    "offset_out_of_range": (cf.LayoutError, ("'model.step'", "out of range", PART)),
    "overlapping_tensors": (cf.LayoutError, ("'model.layers.0.mask'", "'model.step'", "overlap")),
    "misaligned_offset": (cf.LayoutError, ("'model.step'", "12290", "4096")),
    "nbytes_mismatch": (cf.LayoutError, ("'model.norm.weight'", "nbytes 4", "needs 6")),
    "unknown_dtype": (cf.UnknownDtypeError, ("'model.norm.weight'", "'float4'")),
    "unsupported_version": (cf.UnsupportedFormatError, ("format_version 2", "version 1")),
    "tensor_name_escape": (cf.UnsafeNameError, ("../../etc/passwd", "tensor")),
    "partition_name_escape": (cf.UnsafeNameError, ("../x.bin", "partition file")),
    "copied_file_escape": (cf.UnsafeNameError, ("/etc/passwd", "copied file")),
    "alias_to_missing": (cf.LayoutError, ("'lm_head.weight'", "'nope'")),
    "chunk_count_mismatch": (cf.ManifestError, (PART, "3 chunk checksums", "expected 4")),
    "missing_key": (cf.ManifestError, ("missing key 'tensors'",)),
    "not_json": (cf.ManifestError, ("not valid JSON",)),
}


def test_every_corrupt_fixture_has_an_expectation() -> None:
    on_disk = {p.name for p in (FIXTURES / "corrupt").iterdir()}
    assert on_disk == set(CORRUPT_CASES)


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_corrupt_fixture_raises_its_typed_error(case: str) -> None:
    error, words = CORRUPT_CASES[case]
    with pytest.raises(error) as info:
        cf.verify_checkpoint(FIXTURES / "corrupt" / case).raise_if_bad()
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_loader_refuses_corrupt_fixture(case: str) -> None:
    error, _ = CORRUPT_CASES[case]
    with pytest.raises(error):
        load_state_dict(FIXTURES / "corrupt" / case, verify=True)


def test_golden_write_is_byte_identical(tmp_path: Path) -> None:
    write_golden(tmp_path / "ckpt")
    for name in ("stoke-checkpoint.json", PART, "config.json"):
        assert (tmp_path / "ckpt" / name).read_bytes() == (GOLDEN / name).read_bytes(), name


def test_golden_bytes_are_pinned() -> None:
    data = (GOLDEN / PART).read_bytes()
    assert len(data) == 16384
    assert struct.unpack("<12f", data[:48]) == tuple(float(i) for i in range(12))
    assert data[4096:4102] == bytes.fromhex("803f 003f 00c0".replace(" ", ""))  # bf16 1, .5, -2
    assert data[8192:8195] == b"\x01\x00\x01" and data[12288:12296] == struct.pack("<q", 7)
    assert hashlib.sha256(data).hexdigest()[:16] == "f1c04c8d4f3aba6b"


def test_golden_manifest_fields() -> None:
    doc = json.loads((GOLDEN / "stoke-checkpoint.json").read_bytes())
    assert doc["format"] == "stoke-checkpoint" and doc["format_version"] == 1
    assert doc["config"] == GOLDEN_CONFIG and doc["aliases"] == {
        "lm_head.weight": "model.embed_tokens.weight"
    }
    assert doc["tensors"]["model.norm.weight"] == {
        "partition": 0,
        "offset": 4096,
        "nbytes": 6,
        "dtype": "bfloat16",
        "shape": [3],
    }
    assert doc["partitions"][0]["chunks"][0] == crc32_hex((GOLDEN / PART).read_bytes()[:4096])


def test_tied_weights_are_stored_once(tmp_path: Path) -> None:
    sd = golden_state_dict()
    manifest = cf.write_checkpoint(sd, tmp_path / "c", chunk_size=4096)
    assert "lm_head.weight" not in manifest.tensors
    assert manifest.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert manifest.total_bytes == 4 * 4096


def test_equal_but_separate_tensors_are_not_tied(tmp_path: Path) -> None:
    sd = {"a": torch.ones(4), "b": torch.ones(4)}
    assert cf.write_checkpoint(sd, tmp_path / "c").aliases == {}


def test_partition_of_spreads_tensors(tmp_path: Path) -> None:
    sd = {f"w{i}": torch.full((8,), float(i)) for i in range(4)}
    manifest = cf.write_checkpoint(sd, tmp_path / "c", partition_of=lambda n: int(n[1]) % 2)
    assert [p.file for p in manifest.partitions] == ["partition-00000.bin", "partition-00001.bin"]
    assert {n: t.partition for n, t in manifest.tensors.items()} == {
        "w0": 0,
        "w1": 1,
        "w2": 0,
        "w3": 1,
    }


def test_dtype_converts_floating_tensors_only(tmp_path: Path) -> None:
    sd = {"f": torch.ones(2, dtype=torch.bfloat16), "i": torch.ones(2, dtype=torch.int32)}
    manifest = cf.write_checkpoint(sd, tmp_path / "c", dtype=torch.float32)
    assert (manifest.tensors["f"].dtype, manifest.tensors["i"].dtype) == ("float32", "int32")


def test_layout_aligns_every_tensor() -> None:
    specs = [TensorSpec("a", "float32", (3,)), TensorSpec("b", "uint8", (5000,))]
    layout = plan_layout(specs)
    assert [t.offset for t in layout.tensors.values()] == [0, 4096]
    assert layout.partition_sizes == (12288,)


def test_chunk_hasher_does_not_depend_on_piece_sizes() -> None:
    data = bytes(range(256)) * 100
    whole, pieces = ChunkHasher(4096), ChunkHasher(4096)
    whole.update(data)
    for i in range(0, len(data), 777):
        pieces.update(data[i : i + 777])
    assert whole.finish() == pieces.finish()
    assert ChunkHasher(4096).finish() == ()


def test_writer_refuses_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(cf.OutputExistsError, match="not an empty directory"):
        cf.write_checkpoint({"a": torch.ones(1)}, tmp_path / "c")


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    specs = [TensorSpec("a", "float32", (2,))]
    with pytest.raises(ValueError), cf.CheckpointWriter(tmp_path / "c", specs) as writer:
        writer.write_tensor("a", memoryview(b"short"))
    assert not (tmp_path / "c").exists()


def test_is_checkpoint_and_read_config(tmp_path: Path) -> None:
    assert cf.is_checkpoint(GOLDEN) and not cf.is_checkpoint(tmp_path)
    assert cf.read_config(GOLDEN) == GOLDEN_CONFIG
    with pytest.raises(cf.NotACheckpointError, match="stoke convert"):
        cf.read_manifest(tmp_path)


def test_boolean_is_not_an_integer_in_manifests(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN, tmp_path / "c")
    doc = json.loads((tmp_path / "c" / "stoke-checkpoint.json").read_bytes())
    doc["tensors"]["model.step"]["offset"] = True
    (tmp_path / "c" / "stoke-checkpoint.json").write_text(json.dumps(doc))
    with pytest.raises(cf.ManifestError, match="'offset' is True"):
        cf.read_manifest(tmp_path / "c")


def test_copied_file_damage_is_reported(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN, tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text("{}")
    report = cf.verify_checkpoint(tmp_path / "c")
    assert [b.file for b in report.bad] == ["config.json"]


def test_a_symlinked_partition_is_refused_by_verify_and_load(
    tiny_ckpt_dir: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt_dir, ckpt)
    partition = ckpt / "partition-00000.bin"
    outside = tmp_path / "outside.bin"
    shutil.move(partition, outside)
    partition.symlink_to(outside)
    with pytest.raises(cf.UnsafeNameError, match="symlink"):
        cf.verify_checkpoint(ckpt)
    with pytest.raises(cf.UnsafeNameError, match="symlink"):
        load_state_dict(ckpt)


def test_a_chunk_size_over_1_gib_is_refused() -> None:
    with pytest.raises(cf.LayoutError, match="at most"):
        cf.CheckpointWriter(Path("/nonexistent"), [], chunk_size=2 << 30)
