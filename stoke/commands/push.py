"""`stoke push CKPT_DIR s3://bucket/prefix`: upload a stoke checkpoint for node agents to fetch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

DEFAULT_PART_SIZE = "64MiB"
MIN_PART_SIZE = 5 << 20  # S3's smallest multipart part (except the last)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `push` subcommand to the `stoke` parser."""
    parser = subparsers.add_parser(
        "push",
        help="upload a stoke checkpoint to s3://bucket/prefix",
        description=(
            "Upload the stoke checkpoint CKPT_DIR to URI (s3://BUCKET/PREFIX). Every chunk "
            "checksum is verified locally first; large partitions go as parallel multipart "
            "uploads; the manifest is uploaded last (and any old one deleted first), so a "
            "half-pushed prefix is never mistaken for a checkpoint. Endpoint and credentials "
            "come from the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
            "AWS_PROFILE, ...), so MinIO and other S3-compatible stores work. A Hugging Face "
            "directory must be converted first with `stoke convert`."
        ),
    )
    parser.add_argument("ckpt_dir", metavar="CKPT_DIR", help="stoke checkpoint directory")
    parser.add_argument("uri", metavar="URI", help="destination, s3://BUCKET/PREFIX")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="parallel uploads and parts in flight (8)"
    )
    parser.add_argument(
        "--part-size",
        default=DEFAULT_PART_SIZE,
        help=f"multipart part size, at least 5MiB ({DEFAULT_PART_SIZE})",
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the local checksum pass before uploading"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate, upload with a progress bar on stderr, and print a summary."""
    from tqdm import tqdm

    from node_agent.facts.units import parse_size
    from node_agent.store import StoreError, upload_checkpoint
    from node_agent.store.upload import check_local_checkpoint
    from stoke.errors import StokeError

    try:
        part_size = parse_size(args.part_size, what="--part-size", minimum=MIN_PART_SIZE)
        if not 1 <= args.concurrency <= 64:
            raise StokeError(f"--concurrency {args.concurrency}: choose 1..64.")
        ckpt = Path(args.ckpt_dir)
        check_local_checkpoint(ckpt)
        total = _checkpoint_bytes(ckpt)
        disable = True if args.no_progress else None
        with tqdm(
            total=total, unit="B", unit_scale=True, desc="push", disable=disable, file=sys.stderr
        ) as bar:
            result = upload_checkpoint(
                ckpt,
                args.uri,
                concurrency=args.concurrency,
                part_size=part_size,
                verify=not args.no_verify,
                on_bytes=lambda n: _advance(bar, n),
            )
    except StoreError as exc:
        raise StokeError(str(exc)) from None
    if args.json:
        print(
            json.dumps(
                {
                    "uri": result.uri,
                    "bytes": result.nbytes,
                    "files": result.files,
                    "seconds": round(result.seconds, 3),
                }
            )
        )
    else:
        rate = result.nbytes / result.seconds / 1e6 if result.seconds else 0.0
        print(
            f"pushed {args.ckpt_dir} to {result.uri}: {result.files} files, "
            f"{result.nbytes / 1e9:.3f} GB in {result.seconds:.2f} s ({rate:.0f} MB/s)"
        )
    return 0


def _checkpoint_bytes(ckpt: Path) -> int:
    from checkpoint_format import read_manifest

    manifest = read_manifest(ckpt)
    return manifest.total_bytes + sum(f.nbytes for f in manifest.files.values())


def _advance(bar: tqdm[Any], nbytes: int) -> None:
    bar.update(nbytes)
