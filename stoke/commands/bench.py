"""`stoke bench ...`: benchmarks that measure stoke against its baselines in one run."""

from __future__ import annotations

import argparse
import importlib

BENCH_MODULES: tuple[str, ...] = (
    "stoke.bench.engine",
    "stoke.bench.load",
    "stoke.bench.fetch",
    "stoke.bench.coldstart",
    "stoke.bench.migrate",
    "stoke.bench.faults",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks (engine, load, ...)",
        description=(
            "Benchmarks are commands, not timed tests: each measures stoke and its baselines "
            "in the same run, alternating, and reports ratios next to absolute numbers."
        ),
    )
    benches = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name in BENCH_MODULES:
        importlib.import_module(name).register(benches)
