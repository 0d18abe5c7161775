"""`stoke convert HF_DIR OUT_DIR`: a Hugging Face safetensors directory to a stoke checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
import time

from checkpoint_format.dtypes import FLOATING
from checkpoint_format.manifest import DEFAULT_CHUNK_SIZE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face model directory to a stoke checkpoint",
        description=(
            "Convert HF_DIR (model.safetensors, or sharded safetensors with "
            "model.safetensors.index.json, plus config and tokenizer files) into a stoke "
            "checkpoint at OUT_DIR, which must not exist or be empty. Tensors are aligned for "
            "O_DIRECT and zero-copy loads and checksummed per chunk; config and tokenizer files "
            "are copied verbatim. Pickle weights are never read."
        ),
    )
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="new checkpoint directory")
    parser.add_argument(
        "--dtype",
        choices=sorted(FLOATING),
        help="convert floating tensors once, now (e.g. bfloat16 -> float32 for CPU nodes)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"bytes per checksummed chunk, a multiple of 4096 ({DEFAULT_CHUNK_SIZE})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from checkpoint_format import convert_hf
    from checkpoint_format.errors import LayoutError

    if args.chunk_size <= 0 or args.chunk_size % 4096:
        raise LayoutError(f"--chunk-size {args.chunk_size}: must be a positive multiple of 4096")
    start = time.perf_counter()
    manifest = convert_hf(
        args.hf_dir,
        args.out_dir,
        dtype=args.dtype,
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
    )
    summary = {
        "out_dir": args.out_dir,
        "tensors": len(manifest.tensors),
        "aliases": len(manifest.aliases),
        "partitions": len(manifest.partitions),
        "bytes": manifest.total_bytes,
        "files": sorted(manifest.files),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {args.out_dir}: {summary['tensors']} tensors "
            f"(+{summary['aliases']} tied), {manifest.total_bytes / 1e9:.3f} GB in "
            f"{summary['seconds']} s; copied {', '.join(summary['files']) or 'no files'}",
            file=sys.stdout,
        )
    return 0
