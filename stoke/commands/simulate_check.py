"""`stoke simulate-check`: the simulator against reality. A short slice of a request trace runs
on a real local cluster (`stoke up --autoscale`) and in the simulator given the speeds measured
on that cluster; the two are compared metric by metric, each within a stated tolerance."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from node_agent.facts.units import parse_duration
from stoke.errors import StokeError


def register(subparsers: argparse._SubParsersAction) -> None:
    from stoke.commands.simulate import DEFAULT_TRACE
    from stoke.simulate.reality import SliceSpec

    d = SliceSpec()
    p = subparsers.add_parser(
        "simulate-check",
        help="check the simulator against a real local cluster on a trace slice",
        description="Take --seconds of a request trace from --start, keep about --rate "
        "requests a second (every k-th, arrival times unchanged), spread them over --functions "
        "with Zipf popularity and scale their token counts to what a small CPU machine serves "
        "with the tiny demo model (or --model). Start a real local cluster (`stoke up "
        "--autoscale` with one local node of 4 slots), measure this machine's speeds on it "
        "(cold start per tier, first-token overhead, prefill and decode rates), replay the "
        "slice against its OpenAI API open-loop with the openai client, then run the same slice "
        "in the simulator given the measured speeds. Prints real against simulated: cold "
        "starts, peak and mean instance counts and TTFT p50 (each with its tolerance, pass or "
        "fail) and TTFT p95 (shown only). Exit status 1 when a metric is out of tolerance. "
        "Takes --seconds plus about 20 s.",
    )
    p.add_argument(
        "--trace",
        type=Path,
        default=DEFAULT_TRACE,
        help=f"request trace, Azure format (default {DEFAULT_TRACE})",
    )
    p.add_argument("--start", default="0s", help="where in the trace the slice starts (0s)")
    p.add_argument(
        "--seconds", type=float, default=d.seconds, help=f"the slice's length ({d.seconds:g})"
    )
    p.add_argument(
        "--rate", type=float, default=d.rate, help=f"requests per second kept ({d.rate:g})"
    )
    p.add_argument("--functions", type=int, default=d.functions, help=f"({d.functions})")
    p.add_argument(
        "--keep-alive",
        default=f"{d.keep_alive_s:g}s",
        help=f"each function's ({d.keep_alive_s:g}s)",
    )
    p.add_argument("--target-concurrency", type=int, default=d.target_concurrency,
                   help=f"({d.target_concurrency})")  # fmt: skip
    p.add_argument("--max-instances", type=int, default=d.max_instances,
                   help=f"({d.max_instances})")  # fmt: skip
    p.add_argument("--context-scale", type=float, default=d.context_scale,
                   help=f"trace context tokens times this ({d.context_scale:g})")  # fmt: skip
    p.add_argument("--generated-scale", type=float, default=d.generated_scale,
                   help=f"trace generated tokens times this ({d.generated_scale:g})")  # fmt: skip
    p.add_argument("--max-context", type=int, default=d.max_context, help=f"({d.max_context})")
    p.add_argument(
        "--max-generated", type=int, default=d.max_generated, help=f"({d.max_generated})"
    )
    p.add_argument(
        "--model",
        type=Path,
        help="a Hugging Face model directory (default: the tiny demo model, built here)",
    )
    p.add_argument(
        "--work",
        type=Path,
        help="keep the cluster's home, models and log (up.log) here (default: a temporary "
        "directory, removed after)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="the functions' Zipf draw (0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stoke.simulate.reality import SliceSpec, check_reality

    spec = SliceSpec(
        start_s=_duration(args.start, "--start"),
        seconds=args.seconds,
        rate=args.rate,
        functions=args.functions,
        context_scale=args.context_scale,
        generated_scale=args.generated_scale,
        max_context=args.max_context,
        max_generated=args.max_generated,
        keep_alive_s=_duration(args.keep_alive, "--keep-alive"),
        target_concurrency=args.target_concurrency,
        max_instances=args.max_instances,
        seed=args.seed,
    )
    _check(args)
    started = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:5.1f} s] {message}", file=sys.stderr, flush=True)

    work = args.work or Path(tempfile.mkdtemp(prefix="stoke-simulate-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = check_reality(args.trace, spec, args.model, work.resolve(), say)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(report.to_json())
    else:
        print(f"{report.requests} requests over {report.span_s:.1f} s; "
              f"measured: {report.speeds.describe()}")  # fmt: skip
        print(report.table())
        print("agree within tolerance" if report.ok else "OUT OF TOLERANCE (see FAIL above)")
    return 0 if report.ok else 1


def _check(args: argparse.Namespace) -> None:
    if not args.trace.is_file():
        raise StokeError(f"--trace {args.trace}: no such file; give the path of one")
    if args.model is not None and not args.model.is_dir():
        raise StokeError(f"--model {args.model}: no such directory; give a model directory")
    positive = {"--seconds": args.seconds, "--rate": args.rate, "--context-scale":
                args.context_scale, "--generated-scale": args.generated_scale}  # fmt: skip
    for flag, value in positive.items():
        if not value > 0:
            raise StokeError(f"{flag} {value:g}: give a positive number")
    counts = {"--functions": args.functions, "--target-concurrency": args.target_concurrency,
              "--max-instances": args.max_instances, "--max-context": args.max_context,
              "--max-generated": args.max_generated}  # fmt: skip
    for flag, count in counts.items():
        if count < 1:
            raise StokeError(f"{flag} {count}: give 1 or more")
    if args.max_generated < 2:
        raise StokeError(f"--max-generated {args.max_generated}: give 2 or more")


def _duration(value: str, flag: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise StokeError(f"{flag}: {exc}") from None
