"""`stoke migrate` (move running requests by live migration) and `stoke requests` (what runs
where), over the controller's admin API."""

from __future__ import annotations

import argparse
import json
from typing import Any

from stoke.errors import StokeError

_ENV_NOTE = (
    " Talks to the controller at $STOKE_URL with the admin key (defaults: what `stoke up` saved "
    "under $STOKE_HOME or ~/.stoke)."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    migrate = subparsers.add_parser(
        "migrate",
        help="move running requests to another instance, live",
        description=(
            "Move a running request (REQUEST_ID, the x-request-id of its response; see `stoke "
            "requests`) or every request of an instance (--instance) to another instance while "
            "it keeps generating: the destination rebuilds its KV cache from the tokens so far "
            "in rounds and takes over between two tokens; the client's stream goes on with no "
            "token lost or repeated. Without --to, the destination is another instance of the "
            "function with a free slot, or a cold start where placement says, on another node. "
            "Prints each migration's outcome (completed, aborted: the request stayed where it "
            "was, finished: it ended first)." + _ENV_NOTE
        ),
    )
    what = migrate.add_mutually_exclusive_group(required=True)
    what.add_argument("request_id", nargs="?", metavar="REQUEST_ID", help="the request to move")
    what.add_argument("--instance", metavar="ID", help="move every request of this instance")
    migrate.add_argument("--to", metavar="NODE", help="move to this node (as `stoke nodes` lists)")
    migrate.add_argument("--json", action="store_true", help="print JSON")
    migrate.set_defaults(func=run_migrate)

    requests = subparsers.add_parser(
        "requests",
        help="list running requests and where they run",
        description="List the requests in flight: function, node, instance, tokens." + _ENV_NOTE,
    )
    requests.add_argument("--json", action="store_true", help="print JSON")
    requests.set_defaults(func=run_requests)


def _client() -> Any:
    from stoke.client import Client

    return Client.from_env()


def run_migrate(args: argparse.Namespace) -> int:
    body = {"to": args.to} if args.to else None
    if args.instance:
        reply = _client().call("POST", f"/admin/instances/{args.instance}/migrate", body)
        reports = reply["migrations"]
    else:
        reports = [_client().call("POST", f"/admin/requests/{args.request_id}/migrate", body)]
    if args.json:
        print(json.dumps(reports if args.instance else reports[0], indent=1))
    elif not reports:
        print(f"instance {args.instance} has no running request to move")
    for report in [] if args.json else reports:
        print(_describe(report))
    moved = all(r["outcome"] in ("completed", "takeover", "finished") for r in reports)
    if not moved and not args.json and not args.instance:
        raise StokeError(f"request {reports[0]['request_id']} did not move: {reports[0]['detail']}")
    return 0 if moved else 1


def _describe(report: dict[str, Any]) -> str:
    rid = report["request_id"]
    if report["outcome"] == "refused":
        return f"{rid}: not moved: {report['detail']}"
    line = f"{rid}: {report['outcome']}, {report['from']} -> {report['to']}"
    if report["outcome"] in ("completed", "takeover"):
        line += f" after {report['rounds']} round(s), {report['duration_s'] * 1000:.0f} ms"
        line += f", {report['context_tokens']} tokens of context"
    elif report.get("detail"):
        line += f" ({report['detail']})"
    return line


def run_requests(args: argparse.Namespace) -> int:
    requests = _client().call("GET", "/admin/requests")["requests"]
    if args.json:
        print(json.dumps(requests, indent=1))
        return 0
    if not requests:
        print("no request is running")
    for r in requests:
        moving = f", moving to {r['migrating_to']}" if r["migrating_to"] else ""
        print(
            f"{r['request_id']}  {r['function']} on {r['node']} ({r['instance']}): "
            f"{r['prompt_tokens']} prompt + {r['output_tokens']}/{r['max_tokens']} tokens, "
            f"{r['age_s']:.1f} s{moving}"
        )
    return 0
