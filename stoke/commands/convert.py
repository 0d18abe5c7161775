"""`stoke convert SOURCE OUT_DIR`: a Hugging Face safetensors directory, or a llama.cpp GGUF file,
to a stoke checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from checkpoint_format.dtypes import FLOATING
from checkpoint_format.manifest import DEFAULT_CHUNK_SIZE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face model directory or a GGUF file to a stoke checkpoint",
        description=(
            "Convert SOURCE into a stoke checkpoint at OUT_DIR, which must not exist or be "
            "empty. SOURCE is a Hugging Face model directory (model.safetensors, or sharded "
            "safetensors with model.safetensors.index.json, plus config and tokenizer files, "
            "copied verbatim), or a llama.cpp/Ollama .gguf file (Llama, Mistral, Qwen2, Qwen3; "
            "weights in F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 are dequantized to "
            "float32 unless --dtype says otherwise, and config.json, tokenizer.json and the chat "
            "template are built from its metadata). Tensors are aligned for O_DIRECT and "
            "zero-copy loads and checksummed per chunk. Pickle weights are never read; nothing "
            "is left in OUT_DIR if the conversion fails."
        ),
    )
    parser.add_argument(
        "hf_dir", metavar="SOURCE", help="Hugging Face model directory, or a .gguf file"
    )
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
    from checkpoint_format.from_gguf import convert_gguf

    if args.chunk_size <= 0 or args.chunk_size % 4096:
        raise LayoutError(f"--chunk-size {args.chunk_size}: must be a positive multiple of 4096")
    start = time.perf_counter()
    # A file can only be a GGUF (convert_gguf says so if its first bytes are not); a directory
    # is a Hugging Face model.
    convert = convert_gguf if Path(args.hf_dir).is_file() else convert_hf
    manifest = convert(
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
