"""`stoke autoscaler` (the node autoscaler's pools, nodes, demand and recent decisions) and
`stoke cost` (spend per hour and so far, by pool and function), over the admin API."""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

_ENV_NOTE = (
    " Talks to the controller at $STOKE_URL with the admin key (defaults: what `stoke up` saved "
    "under $STOKE_HOME or ~/.stoke). Needs a controller started with --autoscale."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    scaler = subparsers.add_parser(
        "autoscaler",
        help="show the node autoscaler's pools, nodes and decisions",
        description="Show each node pool (market, price, nodes and their phase, zones taken for "
        "short of spot), the demand in instance slots, what is held back (delays, cooldown, "
        "budget) and the latest launches and retirements with their reasons." + _ENV_NOTE,
    )
    scaler.add_argument("--json", action="store_true", help="print the admin API's JSON")
    scaler.add_argument("--events", type=int, default=10, help="recent events to show (10)")
    scaler.set_defaults(func=run_autoscaler)
    cost = subparsers.add_parser(
        "cost",
        help="show what the cluster's nodes cost",
        description="Spend per hour now and so far (node-hours x price), against the budget, "
        "by pool and by function (each function's share of the nodes' slots)." + _ENV_NOTE,
    )
    cost.add_argument("--json", action="store_true", help="print the admin API's JSON")
    cost.set_defaults(func=run_cost)


def _client() -> Any:
    from stoke.client import Client

    return Client.from_env()


def run_autoscaler(args: argparse.Namespace) -> int:
    report = _client().call("GET", "/admin/autoscaler")
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    budget = report["budget"]
    cap = budget["max_per_hour"]
    print(
        f"demand: {report['demand']['slots']} slot(s) ({report['demand']['why']}); "
        f"spend ${budget['spend_per_hour']:.4f}/h"
        + (f" of ${cap:.4f}/h budget" if cap is not None else " (no budget)")
    )
    for pool in report["pools"]:
        nodes = ", ".join(f"{n['node_id']} {n['phase']}" for n in pool["nodes"]) or "no nodes"
        short = ", ".join(f"{z} short {s:.0f} s more" for z, s in pool["short_zones_s"].items())
        print(
            f"{pool['name']} ({pool['provider']}, {pool['market']}, {pool['instance_type']}, "
            f"${pool['price_per_hour']:.4f}/h from {pool['price_source']}; "
            f"{pool['min_nodes']}-{pool['max_nodes']} nodes): {nodes}"
            + (f"; {short}" if short else "")
        )
    for note in report["held"]:
        print(f"held: {note}")
    for event in report["events"][-args.events :]:
        when = datetime.datetime.fromtimestamp(event["unix"]).strftime("%H:%M:%S")
        target = f" {event['target']}" if event["target"] else ""
        print(f"{when} {event['action']}{target}: {event['reason']}")
    return 0


def run_cost(args: argparse.Namespace) -> int:
    cost = _client().call("GET", "/admin/cost")
    if args.json:
        print(json.dumps(cost, indent=1))
        return 0
    cap = cost["budget_per_hour"]
    print(
        f"now ${cost['per_hour']:.4f}/h"
        + (f" (budget ${cap:.4f}/h)" if cap is not None else "")
        + f"; so far ${cost['total']:.6f}"
    )
    for pool, spent in cost["by_pool"].items():
        print(
            f"  pool {pool}: ${spent:.6f} over {cost['node_hours'].get(pool, 0.0):.4f} node-hours"
        )
    for function, spent in cost["by_function"].items():
        print(f"  function {function}: ${spent:.6f}")
    return 0
