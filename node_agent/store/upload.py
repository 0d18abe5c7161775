"""Upload a stoke checkpoint to `s3://bucket/prefix` so node agents can fetch it.

The order makes a half-pushed prefix never look like a checkpoint: any manifest already at
the prefix is deleted first, partitions and copied files are uploaded next (big files as
parallel multipart uploads, all files sharing one pool of transfer threads), and the manifest
goes last, only once everything else succeeded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checkpoint_format import MANIFEST_NAME, is_checkpoint, read_manifest, verify_checkpoint
from checkpoint_format.verify import check_partition_size
from node_agent.facts.errors import InvalidSourceError
from node_agent.facts.s3client import make_client, remote_error
from node_agent.facts.sources import HF_INDEX, parse_s3_uri

MIB = 1 << 20


@dataclass(frozen=True)
class UploadResult:
    """What `upload_checkpoint` sent."""

    uri: str
    nbytes: int
    files: int
    seconds: float


def check_local_checkpoint(ckpt_dir: Path) -> None:
    """Raise `InvalidSourceError` unless `ckpt_dir` is a stoke checkpoint directory."""
    if not ckpt_dir.is_dir():
        raise InvalidSourceError(f"{ckpt_dir}: no such directory; pass a stoke checkpoint.")
    if is_checkpoint(ckpt_dir):
        return
    hf = (ckpt_dir / HF_INDEX).is_file() or any(ckpt_dir.glob("*.safetensors"))
    what = "a Hugging Face model directory" if hf else "not a stoke checkpoint"
    raise InvalidSourceError(
        f"{ckpt_dir}: {what} (no {MANIFEST_NAME}); convert it first with "
        f"`stoke convert {ckpt_dir} OUT_DIR`, then push OUT_DIR."
    )


def upload_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    uri: str,
    *,
    client: Any | None = None,
    concurrency: int = 8,
    part_size: int = 64 * MIB,
    verify: bool = True,
    on_bytes: Callable[[int], None] | None = None,
) -> UploadResult:
    """Upload checkpoint `ckpt_dir` to `uri` (`s3://bucket/prefix`); returns what was sent.

    `verify` checks every chunk checksum locally first, so a corrupt checkpoint is never
    published. Files above `part_size` go as multipart uploads of `part_size` parts;
    `concurrency` transfers run at once. `on_bytes(n)` reports progress. Raises
    `InvalidSourceError`, `RemoteError` or a `CheckpointError` for a damaged checkpoint.
    """
    start = time.perf_counter()
    root = Path(ckpt_dir)
    dest = parse_s3_uri(uri)
    check_local_checkpoint(root)
    manifest = read_manifest(root)
    for part in manifest.partitions:
        check_partition_size(root, part)
    if verify:
        verify_checkpoint(root).raise_if_bad()
    manifest_bytes = (root / MANIFEST_NAME).read_bytes()
    names = [p.file for p in manifest.partitions] + list(manifest.files)
    s3 = client or make_client(pool_size=concurrency + 2, verify_checksums=True)
    try:
        s3.delete_object(Bucket=dest.bucket, Key=dest.object_key(MANIFEST_NAME))
        _upload_files(
            s3,
            root,
            dest.bucket,
            [(n, dest.object_key(n)) for n in names],
            concurrency,
            part_size,
            on_bytes,
        )
        s3.put_object(
            Bucket=dest.bucket,
            Key=dest.object_key(MANIFEST_NAME),
            Body=manifest_bytes,
            ContentType="application/json",
        )
    except Exception as exc:  # botocore/s3transfer errors: translated, never swallowed
        raise remote_error(exc, dest.uri, "uploading to") from exc
    nbytes = sum((root / n).stat().st_size for n in names) + len(manifest_bytes)
    return UploadResult(dest.uri, nbytes, len(names) + 1, time.perf_counter() - start)


def _upload_files(
    s3: Any,
    root: Path,
    bucket: str,
    files: list[tuple[str, str]],
    concurrency: int,
    part_size: int,
    on_bytes: Callable[[int], None] | None,
) -> None:
    """Upload `(file name, object key)` pairs through one transfer manager; wait for all."""
    from boto3.s3.transfer import ProgressCallbackInvoker, TransferConfig, create_transfer_manager

    config = TransferConfig(
        multipart_threshold=part_size,
        multipart_chunksize=part_size,
        max_concurrency=concurrency,
        use_threads=True,
    )
    subscribers = [ProgressCallbackInvoker(on_bytes)] if on_bytes else None
    with create_transfer_manager(s3, config) as manager:
        futures = [
            manager.upload(str(root / name), bucket, key, subscribers=subscribers)
            for name, key in files
        ]
        for future in futures:
            future.result()
