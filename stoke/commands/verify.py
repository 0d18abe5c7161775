"""`stoke verify CKPT_DIR`: check every chunk checksum; name each bad chunk of each file."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check every checksum of a stoke checkpoint",
        description=(
            "Validate CKPT_DIR's manifest, partition sizes, every chunk checksum and every "
            "copied file. Exits 0 when all match; otherwise names each bad chunk (file, index, "
            "byte range) and exits 2."
        ),
    )
    parser.add_argument("ckpt_dir", metavar="CKPT_DIR", help="stoke checkpoint directory")
    parser.add_argument("--threads", type=int, default=4, help="checking threads (4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print a JSON report")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from checkpoint_format import CheckpointError, read_manifest, verify_checkpoint

    try:
        total = read_manifest(args.ckpt_dir).total_bytes
        disable = True if args.no_progress else None
        with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=disable) as bar:
            report = verify_checkpoint(args.ckpt_dir, threads=args.threads, on_chunk=bar.update)
    except CheckpointError as exc:
        if not args.json:
            raise
        # Structural damage (bad manifest, truncated file): still one JSON object for scripts.
        print(json.dumps({"ok": False, "error": str(exc), "error_type": type(exc).__name__}))
        return 2
    if args.json:
        bad = [vars(b) for b in report.bad]
        print(json.dumps({"ok": report.ok, "chunks": report.chunks, "bad": bad}))
        return 0 if report.ok else 2
    report.raise_if_bad()
    print(f"{args.ckpt_dir}: ok ({report.chunks} chunks, {report.checked_bytes} bytes)")
    return 0
