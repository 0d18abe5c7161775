"""`stoke simulate`: replay a real request trace (and spot traces) through stoke's own policies
on a simulated cluster, in virtual time, and print what each policy costs and how fast it
serves, side by side."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from node_agent.facts.tiers import Origin
from node_agent.facts.units import InvalidSizeError, parse_duration, parse_size
from stoke.errors import StokeError

if TYPE_CHECKING:
    from stoke.simulate.config import SimConfig

REPO = Path(__file__).resolve().parents[2]
SHARED_TRACES = REPO.parent / "shared" / "traces"
DEFAULT_TRACE = SHARED_TRACES / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv"
DEFAULT_POLICY = REPO / "deploy" / "simulate" / "mixed.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    from stoke.simulate.config import MODELS, SimConfig

    d = SimConfig()
    p = subparsers.add_parser(
        "simulate",
        help="replay real traces through stoke's policies on a simulated cluster",
        description="Discrete-event simulation in virtual time: requests from an Azure LLM "
        "inference trace (spread over --functions with Zipf popularity, the trace repeated to "
        "fill --hours), node pools and prices from each --policy file, spot preemptions and "
        "capacity from --spot-trace files. Placement, keep-alive, the node autoscaler and the "
        "preemption drain are stoke's own functions. Every --policy x --keep-alive x "
        "--placement combination runs on the same workload and is printed side by side: cost, "
        "TTFT percentiles, SLO attainment, cold starts by tier, requests lost (0 expected), "
        "migrations, node-hours by pool. A day of the conversation trace takes seconds.",
    )
    p.add_argument(
        "--trace",
        type=Path,
        default=DEFAULT_TRACE,
        help=f"request trace, Azure format (default {DEFAULT_TRACE})",
    )
    p.add_argument(
        "--policy",
        type=Path,
        action="append",
        help=f"cluster policy file, repeatable (default {DEFAULT_POLICY})",
    )
    p.add_argument(
        "--spot-trace",
        type=Path,
        action="append",
        default=[],
        help="spot trace (skypilot format), repeatable: zone j of each spot pool "
        "follows the j-th (none: spot is never short)",
    )
    p.add_argument(
        "--spot-start",
        default="0s",
        help="where in the spot traces to start (a duration; default 0s)",
    )
    p.add_argument(
        "--spot-scale",
        type=float,
        default=None,
        help="spot capacity per node a trace counts (1: read availability traces "
        "literally); default: a trace's peak is the pool's max_nodes",
    )
    p.add_argument(
        "--functions",
        type=int,
        default=d.functions,
        help=f"functions sharing the cluster ({d.functions})",
    )
    p.add_argument(
        "--hours",
        type=float,
        default=d.hours,
        help=f"simulated hours; the trace repeats to fill them ({d.hours:g})",
    )
    p.add_argument(
        "--keep-alive",
        action="append",
        help=f"fixed keep-alive (30s, 5m) or `adaptive`, repeatable ({d.keep_alive})",
    )
    p.add_argument(
        "--placement",
        action="append",
        help=f"locality, random or least-loaded, repeatable ({d.placement})",
    )
    p.add_argument(
        "--models",
        default=",".join(d.models),
        help=f"model sizes, function i runs the (i mod n)-th; of {', '.join(MODELS)}",
    )
    p.add_argument(
        "--bandwidth",
        action="append",
        default=[],
        metavar="TIER=SIZE",
        help="a GPU node's load bandwidth per second for dram, disk or remote, "
        "e.g. disk=3GB (default dram=20GB disk=6GB remote=1.2GB, ServerlessLLM's)",
    )
    p.add_argument(
        "--slo",
        default=f"{d.slo_ttft_s:g}s",
        help=f"every function's slo.ttft_p99 ({d.slo_ttft_s:g}s)",
    )
    p.add_argument("--target-concurrency", type=int, default=d.target_concurrency)
    p.add_argument("--max-instances", type=int, default=d.max_instances)
    p.add_argument(
        "--boot", default=f"{d.boot_s:g}s", help=f"a node's launch to registration ({d.boot_s:g}s)"
    )
    p.add_argument(
        "--notice",
        default=f"{d.notice_s:g}s",
        help=f"spot preemption notice ({d.notice_s:g}s, AWS)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", action="store_true", help="print each run's summary as JSON")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="OUT.png",
        help="write cost vs p99 TTFT per run and nodes and spend over time (needs matplotlib)",
    )
    p.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from stoke.simulate.report import table
    from stoke.simulate.runs import load_policies, simulate, variants
    from stoke.simulate.traces import read_requests, read_spot

    config = _config(args)
    if args.plot is not None:
        from stoke.simulate.plot import require_matplotlib

        require_matplotlib()
    trace = read_requests(_exists(args.trace, "--trace"))
    spot = [read_spot(_exists(p, "--spot-trace")) for p in args.spot_trace]
    policies = load_policies([_exists(p, "--policy") for p in args.policy or [DEFAULT_POLICY]])
    runs = variants(policies, args.keep_alive or ["5m"], args.placement or ["locality"], config)
    results = []
    for v in runs:
        started = time.perf_counter()
        results.append(simulate(v, trace, spot))
        print(f"simulated {v.label}: {results[-1].hours:.2f} h in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)  # fmt: skip
    if args.json:
        print(json.dumps([r.summary() for r in results], indent=2))
    else:
        print(table(results, markdown=args.markdown))
        for note in sorted({n for r in results for n in r.notes}):
            print(f"note: {note}")
    if args.plot is not None:
        from stoke.simulate.plot import plot

        plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _config(args: argparse.Namespace) -> SimConfig:
    import dataclasses

    from stoke.simulate.config import NodeShape, SimConfig

    if args.spot_scale is not None and args.spot_scale <= 0:
        raise StokeError(f"--spot-scale {args.spot_scale:g}: give a positive number")
    if args.functions < 1:
        raise StokeError(f"--functions {args.functions}: give 1 or more")
    shape = NodeShape()
    bandwidth = dict(shape.bandwidth)
    for item in args.bandwidth:
        tier, _, size = item.partition("=")
        if tier not in (Origin.DRAM, Origin.DISK, Origin.REMOTE):
            raise StokeError(f"--bandwidth {item!r}: give dram=, disk= or remote= and a size")
        try:
            bandwidth[tier] = float(parse_size(size, what="--bandwidth", minimum=1))
        except InvalidSizeError as exc:
            raise StokeError(str(exc)) from None
    return SimConfig(
        functions=args.functions,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        hours=args.hours,
        slo_ttft_s=_duration(args.slo, "--slo"),
        target_concurrency=args.target_concurrency,
        max_instances=args.max_instances,
        boot_s=_duration(args.boot, "--boot"),
        notice_s=_duration(args.notice, "--notice"),
        spot_start_s=_duration(args.spot_start, "--spot-start"),
        spot_scale=args.spot_scale,
        node=dataclasses.replace(shape, bandwidth=bandwidth),
        seed=args.seed,
    )


def _duration(value: str, flag: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise StokeError(f"{flag}: {exc}") from None


def _exists(path: Path, flag: str) -> Path:
    if not path.is_file():
        raise StokeError(f"{flag} {path}: no such file; give the path of one")
    return path
