"""The `stoke` command: the composition root that wires the packages together.

Each subcommand lives in its own module under `stoke.commands` (or `stoke.bench` for
benchmarks) and exposes `register(subparsers)`, which adds its parser and sets `func`.
Heavy imports (torch, transformers) happen inside the command, so `stoke --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from checkpoint_format.errors import CheckpointError
from node_agent.facts.errors import EngineError
from stoke.errors import StokeError

COMMAND_MODULES: tuple[str, ...] = (
    "stoke.commands.demo_model",
    "stoke.commands.generate",
    "stoke.commands.bench",
    "stoke.commands.convert",
    "stoke.commands.verify",
    "stoke.commands.push",
    "stoke.commands.node",
    "stoke.commands.controller",
    "stoke.commands.up",
    "stoke.commands.functions",
    "stoke.commands.migrate",
    "stoke.commands.autoscaler",
    "stoke.commands.simulate",
    "stoke.commands.simulate_check",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stoke",
        description="stoke: a serverless runtime for LLM functions with fast cold start.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (StokeError, CheckpointError, EngineError) as exc:
        print(f"stoke {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stoke {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
