"""Downloads from a real S3-compatible server (moto, on loopback): bytes, corruption,
coalescing, resume after SIGKILL. GETs are counted with a boto3 event hook on the very client
the fetcher uses; nothing in boto3 is patched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from checkpoint_format import MANIFEST_NAME, read_manifest
from node_agent.facts.errors import RemoteError
from node_agent.facts.tiers import TierName
from node_agent.store import CorruptObjectError, checkpoint_key, upload_checkpoint
from node_agent.store.fetch_plan import plan_parts

DISK = TierName.DISK
PART = 128 << 10  # the make_store fixture's part size: 2 chunks of 64 KiB per ranged GET
REPO = Path(__file__).resolve().parents[1]


def push(ckpt: Path, bucket: str, prefix: str) -> str:
    uri = f"s3://{bucket}/{prefix}"
    upload_checkpoint(ckpt, uri)
    return uri


def key_of(ckpt: Path) -> str:
    return checkpoint_key((ckpt / MANIFEST_NAME).read_bytes())


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def record_gets(client: Any, on_get: Callable[[str], None] | None = None) -> list[str]:
    """URLs of every GetObject the client sends from now on (a real count, via botocore's
    event system), optionally calling `on_get(url)` first."""
    urls: list[str] = []

    def hook(request: Any, **_: Any) -> None:
        if on_get is not None:
            on_get(request.url)
        urls.append(request.url)

    client.meta.events.register("before-send.s3.GetObject", hook)
    return urls


def partition_parts(ckpt: Path) -> int:
    return sum(1 for p in plan_parts(read_manifest(ckpt), PART) if p.file.startswith("partition"))


def test_download_is_byte_identical_and_then_served_locally(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path, s3_bucket: str
) -> None:
    uri = push(tiny_ckpt_dir, s3_bucket, "models/tiny")
    store = make_store()
    gets = record_gets(store.fetcher.client)
    path = store.ensure(uri, DISK)
    assert path.name == key_of(tiny_ckpt_dir)
    assert files_of(path) == files_of(tiny_ckpt_dir)
    assert sum("partition-" in u for u in gets) == partition_parts(tiny_ckpt_dir) == 11
    gets.clear()
    assert store.ensure(uri, DISK) == path
    assert [u.rsplit("/", 1)[1] for u in gets] == [MANIFEST_NAME]  # a hit reads the manifest only
    assert store.bandwidths()["remote"] > 0 and store.stats().downloads == 1


def test_tampered_object_is_rejected_naming_file_and_chunk(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path, s3_bucket: str
) -> None:
    uri = push(tiny_ckpt_dir, s3_bucket, "tiny")
    data = bytearray((tiny_ckpt_dir / "partition-00000.bin").read_bytes())
    data[5 * 65536 + 10] ^= 0xFF
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="tiny/partition-00000.bin", Body=bytes(data))
    store = make_store()
    pattern = rf"s3://{s3_bucket}/tiny/partition-00000\.bin: chunk 5 \(bytes 327680\.\.393216\)"
    with pytest.raises(CorruptObjectError, match=pattern):
        store.ensure(uri, DISK)
    assert store.locate(key_of(tiny_ckpt_dir)) is None and store.holdings()[DISK] == []
    assert list((store.config.disk_dir / ".staging").iterdir()) == []
    push(tiny_ckpt_dir, s3_bucket, "tiny")  # repaired: now it installs
    assert files_of(store.ensure(uri, DISK)) == files_of(tiny_ckpt_dir)


def test_concurrent_requests_share_one_download(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path, s3_bucket: str
) -> None:
    uri = push(tiny_ckpt_dir, s3_bucket, "tiny")
    store = make_store()
    flight = (key_of(tiny_ckpt_dir), DISK)
    joined: list[bool] = []

    def hold_until_a_second_caller_joins(url: str) -> None:
        if "partition-" in url:  # the download cannot finish before the other caller waits
            joined.append(store.flights.wait_for_followers(flight, 1, timeout=20))

    gets = record_gets(store.fetcher.client, hold_until_a_second_caller_joins)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(store.ensure(uri, DISK))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2 and results[0] == results[1]
    assert joined and all(joined)
    assert sum("partition-" in u for u in gets) == partition_parts(tiny_ckpt_dir)


# The child SIGKILLs itself right after its third part is recorded in the resume sidecar: a
# crash at a known point, with the hook in the test rather than in the product.
CHILD = """
import os, signal, sys
from pathlib import Path
from node_agent.store import CheckpointStore, FetchConfig, StoreConfig
from node_agent.store.fetch_state import FetchState
record = FetchState.mark_done
def mark_done_then_die(self, part_id):
    done = record(self, part_id)
    if done >= 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return done
FetchState.mark_done = mark_done_then_die
config = StoreConfig(node_id=sys.argv[1], disk_dir=Path(sys.argv[2]), disk_budget=64 << 20,
                     dram_budget=64 << 20, fetch=FetchConfig(part_size=128 << 10, concurrency=1))
with CheckpointStore(config) as store:
    store.ensure(sys.argv[3], "disk")
"""


@pytest.mark.parametrize("damage_a_recorded_part", [False, True])
def test_download_killed_midway_resumes_fetching_fewer_bytes(
    make_store: Callable[..., Any],
    tiny_ckpt_dir: Path,
    s3_bucket: str,
    tmp_path: Path,
    damage_a_recorded_part: bool,
) -> None:
    uri = push(tiny_ckpt_dir, s3_bucket, "tiny")
    node = f"test-child-{uuid.uuid4().hex[:8]}"
    try:
        child = subprocess.run(
            [sys.executable, "-c", CHILD, node, str(tmp_path / "disk"), uri],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        shutil.rmtree(Path("/dev/shm") / f"stoke-{os.geteuid()}-{node}", ignore_errors=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    key = key_of(tiny_ckpt_dir)
    sidecar = json.loads((tmp_path / "disk" / ".staging" / key / ".fetch-state.json").read_text())
    assert len(sidecar["done"]) == 3
    if damage_a_recorded_part:  # bytes on disk changed since they were verified: refetch them
        name, index = sidecar["done"][0].rsplit(":", 1)
        staged = tmp_path / "disk" / ".staging" / key / name
        data = bytearray(staged.read_bytes())
        data[int(index) * PART + 100] ^= 0xFF
        staged.write_bytes(bytes(data))
    reused = 2 if damage_a_recorded_part else 3
    store = make_store()
    path = store.ensure(uri, DISK)
    assert files_of(path) == files_of(tiny_ckpt_dir)
    stats, total = store.stats(), sum(len(b) for b in files_of(tiny_ckpt_dir).values())
    assert stats.parts_reused == reused
    assert stats.bytes_downloaded <= total - reused * PART
    assert not (tmp_path / "disk" / ".staging" / key).exists()


def test_missing_or_half_pushed_prefix_is_not_a_checkpoint(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path, s3_bucket: str
) -> None:
    uri = push(tiny_ckpt_dir, s3_bucket, "half")
    boto3.client("s3").delete_object(Bucket=s3_bucket, Key=f"half/{MANIFEST_NAME}")
    store = make_store()
    for target in (uri, f"s3://{s3_bucket}/nothing-here"):
        with pytest.raises(RemoteError, match=r"NoSuchKey .*stoke push"):
            store.ensure(target, DISK)
    assert store.holdings()[DISK] == []


def test_changed_checkpoint_at_the_same_uri_is_a_new_entry(
    make_store: Callable[..., Any],
    tiny_ckpt_dir: Path,
    tiny_model_dir: Path,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    from checkpoint_format import convert_hf

    store = make_store()
    uri = push(tiny_ckpt_dir, s3_bucket, "latest")
    first = store.ensure(uri, DISK)
    other = tmp_path / "bf16"
    convert_hf(tiny_model_dir, other, chunk_size=64 << 10, dtype="bfloat16", progress=False)
    push(other, s3_bucket, "latest")
    second = store.ensure(uri, DISK)
    assert second.name == key_of(other) != first.name
    assert {h.key for h in store.holdings()[DISK]} == {first.name, second.name}
    assert store.locate(uri + "/").key == second.name


def test_parts_cover_whole_chunks(tiny_ckpt_dir: Path) -> None:
    manifest = read_manifest(tiny_ckpt_dir)
    parts = plan_parts(manifest, 100 << 10)  # rounded up to 2 chunks of 64 KiB
    partition = [p for p in parts if p.file == "partition-00000.bin"]
    assert [p.start for p in partition] == list(range(0, manifest.total_bytes, 128 << 10))
    assert partition[-1].end == manifest.total_bytes
    checks = [c for p in partition for c in p.checks]
    assert [c.chunk for c in checks] == list(range(len(manifest.partitions[0].chunks)))
    assert all(p.start == p.checks[0].start and p.end == p.checks[-1].end for p in partition)


def test_a_download_interrupted_by_close_fails_instead_of_looking_complete(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path, s3_bucket: str
) -> None:
    from node_agent.store import StoreClosedError

    uri = push(tiny_ckpt_dir, s3_bucket, "closing")
    store = make_store()
    store._populator.stop()  # what close() does first, here before any part starts
    with pytest.raises(StoreClosedError, match="resumes"):
        store.ensure(uri, DISK)
    assert store.locate(uri) is None
