"""`stoke push` as a real subprocess against the loopback S3 server, and the upload order."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import torch

from checkpoint_format import MANIFEST_NAME, write_checkpoint
from node_agent.facts.tiers import TierName
from node_agent.store import upload_checkpoint

REPO = Path(__file__).resolve().parents[1]


def stoke(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "stoke.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def object_keys(bucket: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_push_then_fetch_round_trips_the_bytes(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path, s3_bucket: str
) -> None:
    uri = f"s3://{s3_bucket}/models/tiny"
    done = stoke("push", str(tiny_ckpt_dir), uri, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert f"pushed {tiny_ckpt_dir} to {uri}: 7 files" in done.stdout
    path = make_store().ensure(uri, TierName.DISK)
    assert files_of(path) == files_of(tiny_ckpt_dir)


def test_push_of_a_hugging_face_directory_says_convert_first(
    tiny_model_dir: Path, s3_bucket: str
) -> None:
    done = stoke("push", str(tiny_model_dir), f"s3://{s3_bucket}/x", "--no-progress")
    assert done.returncode == 2
    assert "a Hugging Face model directory" in done.stderr and "stoke convert" in done.stderr
    assert "Traceback" not in done.stderr and object_keys(s3_bucket) == []


def test_push_of_a_corrupt_checkpoint_uploads_nothing(
    tiny_ckpt_dir: Path, s3_bucket: str, tmp_path: Path
) -> None:
    bad = shutil.copytree(tiny_ckpt_dir, tmp_path / "bad")
    with open(bad / "partition-00000.bin", "r+b") as f:
        f.seek(70000)
        f.write(b"\x01\x02")
    done = stoke("push", str(bad), f"s3://{s3_bucket}/bad", "--no-progress")
    assert done.returncode == 2 and "chunk 1" in done.stderr
    assert object_keys(s3_bucket) == []


def test_push_to_a_missing_bucket_names_it(tiny_ckpt_dir: Path, s3_bucket: str) -> None:
    done = stoke("push", str(tiny_ckpt_dir), "s3://no-such-bucket-here/x", "--no-progress")
    assert done.returncode == 2 and "NoSuchBucket" in done.stderr and "bucket" in done.stderr


def test_big_partitions_go_multipart_and_the_manifest_goes_last(
    s3_bucket: str, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    write_checkpoint({"w": torch.ones(12 << 20, dtype=torch.uint8)}, ckpt, fsync=False)
    client = boto3.client("s3")
    calls: list[tuple[str, str]] = []

    def record(model: Any, params: dict[str, Any], **_: Any) -> None:
        calls.append((model.name, params.get("Key", "")))

    client.meta.events.register("provide-client-params.s3.*", record)
    upload_checkpoint(ckpt, f"s3://{s3_bucket}/big", client=client, part_size=5 << 20)
    writes = [(op, key) for op, key in calls if op in ("PutObject", "CompleteMultipartUpload")]
    assert writes[-1] == ("PutObject", f"big/{MANIFEST_NAME}")
    assert calls[0] == ("DeleteObject", f"big/{MANIFEST_NAME}")
    parts = [key for op, key in calls if op == "UploadPart"]
    assert parts.count("big/partition-00000.bin") == 3  # 12 MiB in 5 MiB parts
