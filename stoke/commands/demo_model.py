"""`stoke demo-model OUT_DIR`: write a random-weight Llama-family model for offline demos."""

from __future__ import annotations

import argparse
import json

from stoke.demo_spec import ARCHS, DTYPES, SIZES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo-model` subcommand to the `stoke` parser."""
    parser = subparsers.add_parser(
        "demo-model",
        help="write a random-weight model in Hugging Face layout (for demos, tests, benchmarks)",
        description=(
            "Write a random-weight Llama-family model into OUT_DIR in Hugging Face layout: "
            "config.json, generation_config.json, safetensors weights (sharded above 1 GiB), and "
            "a real byte-level BPE tokenizer with a ChatML chat template. The output is "
            "byte-identical for equal arguments. `transformers` and `stoke generate` load it. "
            "Sizes: tiny (~0.3M parameters, for unit tests), small (~96M), 1b (~1.07B; "
            "4.3 GB in float32, 2.1 GB in bfloat16)."
        ),
    )
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", help="directory to write (created if missing)"
    )
    parser.add_argument("--size", choices=SIZES, default="tiny", help="model size (tiny)")
    parser.add_argument("--arch", choices=ARCHS, default="llama", help="architecture (llama)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (0)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="dtype of the stored weights (float32)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty OUT_DIR that is not a demo model (replaces its model files)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object describing it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the model and print where it went, its parameter count and its size."""
    from stoke.demo_model import make_demo_model, read_demo_info

    path = make_demo_model(
        args.out_dir,
        size=args.size,
        arch=args.arch,
        seed=args.seed,
        dtype=args.dtype,
        force=args.force,
    )
    info = read_demo_info(path)
    if args.json:
        print(json.dumps({"path": str(path.resolve()), **info}))
        return 0
    print(
        f"wrote {info['arch']} {info['size']} demo model to {path}: "
        f"{_count(info['parameters'])} parameters, {_bytes(info['weight_bytes'])} of "
        f"{info['dtype']} weights in {len(info['weight_files'])} file(s), seed {info['seed']}"
    )
    return 0


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
