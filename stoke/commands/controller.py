"""`stoke controller`: run the controller (HTTP API + gRPC for node agents)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "controller",
        help="run the controller",
        description=(
            "Run the controller: the OpenAI-compatible and admin HTTP API on --listen and the "
            "gRPC service node agents register with on --grpc-listen. State (functions, nodes) "
            "is kept in SQLite under --home, so a restart keeps every deployed function. API "
            "keys come from --config (invoke_keys, admin_keys) or $STOKE_INVOKE_KEY and "
            "$STOKE_ADMIN_KEY; the node secret from --secret or $STOKE_SECRET. Prints "
            "'http listening on HOST:PORT' and 'grpc listening on HOST:PORT' once serving; "
            "SIGINT/SIGTERM stop it cleanly."
        ),
    )
    parser.add_argument("--config", type=Path, help="controller settings (YAML)")
    parser.add_argument("--listen", help="HTTP HOST:PORT (127.0.0.1:8080)")
    parser.add_argument("--grpc-listen", help="gRPC HOST:PORT for node agents (127.0.0.1:7070)")
    parser.add_argument("--home", type=Path, help="state directory (~/.stoke/controller)")
    parser.add_argument("--secret", help="node shared secret (default: $STOKE_SECRET)")
    parser.add_argument(
        "--policy", help="cold-start placement: locality (default), random, least-loaded"
    )
    parser.add_argument("--heartbeat", type=float, help="seconds between node heartbeats (2)")
    parser.add_argument("--node-timeout", type=float, help="seconds of silence = node gone (10)")
    parser.add_argument(
        "--migration-round-timeout",
        type=float,
        help="seconds one live-migration round may take before the migration aborts (60)",
    )
    parser.add_argument(
        "--autoscale",
        type=Path,
        metavar="POLICY.yaml",
        help="a cluster policy (node pools, prices, budget): launch and retire nodes to follow "
        "the load (see deploy/local.yaml and the README's policy keys)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from autoscaler.policy import PolicyError, load_policy
    from controller.config import ControllerConfigError, load_config
    from stoke.errors import StokeError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_config(
            args.config,
            {
                "http_listen": args.listen,
                "grpc_listen": args.grpc_listen,
                "home": args.home,
                "secret": args.secret,
                "policy": args.policy,
                "heartbeat_interval_s": args.heartbeat,
                "node_timeout_s": args.node_timeout,
                "migration_round_timeout_s": args.migration_round_timeout,
                "autoscale": args.autoscale,
            },
        )
        config.check_ready()
        if config.autoscale is not None:
            load_policy(config.autoscale)  # every problem now, before anything listens
    except (ControllerConfigError, PolicyError) as exc:
        raise StokeError(str(exc)) from None
    import uvloop

    # uvloop under both servers: uvicorn's HTTP and grpc.aio share this one loop.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve_until_signal(config))
    return 0


async def _serve_until_signal(config: object) -> None:
    import asyncio
    import signal

    from controller.server import ControllerStartError, serve
    from stoke.errors import StokeError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def announce(kind: str, address: str) -> None:
        print(f"{kind} listening on {address}", flush=True)

    try:
        await serve(config, stop, announce)  # type: ignore[arg-type]
    except (ControllerStartError, SystemExit) as exc:
        raise StokeError(f"controller did not start: {exc}") from None
