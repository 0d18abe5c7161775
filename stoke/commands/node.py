"""`stoke node`: run one node agent (checkpoint store, model instances, gRPC service)."""

from __future__ import annotations

import argparse
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node_agent.server import NodeConfig

DEFAULT_LISTEN = "127.0.0.1:7071"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `node` subcommand to the `stoke` parser."""
    parser = subparsers.add_parser(
        "node",
        help="run a node agent",
        description=(
            "Run a node agent: serve the NodeAgent gRPC service on --listen, keep checkpoints "
            "in DRAM/disk tiers under --home, run model instances as worker processes within "
            "--cpu-memory and --slots (on a node with CUDA GPUs, each instance on one GPU "
            "within its memory), and (with --controller) register and heartbeat. Every "
            "call must carry the shared secret (--secret or $STOKE_SECRET). Prints "
            "'listening on HOST:PORT' once serving; SIGINT/SIGTERM stop it cleanly."
        ),
    )
    parser.add_argument("--controller", metavar="HOST:PORT", help="controller to register with")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT ({DEFAULT_LISTEN})")
    parser.add_argument("--advertise", metavar="HOST:PORT", help="address given to the controller")
    parser.add_argument("--home", type=Path, help="state directory (~/.stoke/node)")
    parser.add_argument("--node-id", help="node name (default: the host name)")
    parser.add_argument("--secret", help="shared secret (default: $STOKE_SECRET)")
    parser.add_argument("--cpu-memory", default="8GiB", help="memory for instances (8GiB)")
    parser.add_argument("--slots", type=int, default=4, help="instances at most (4)")
    parser.add_argument(
        "--prestart", type=int, default=1, help="idle warm workers to keep, per GPU if any (1)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads per instance (default: CPU cores // --slots, at least 1)",
    )
    parser.add_argument("--dram-cache", default="2GiB", help="DRAM tier budget (2GiB)")
    parser.add_argument("--disk-cache", default="20GiB", help="disk tier budget (20GiB)")
    parser.add_argument("--dram-dir", type=Path, help="DRAM tier directory (/dev/shm/stoke-UID-ID)")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds between beats (5)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate: listen with TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    parser.add_argument("--controller-ca", type=Path, help="CA to verify a TLS controller")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the configuration, then serve until SIGINT/SIGTERM."""
    import asyncio
    import logging

    config = build_config(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve_until_signal(config))
    return 0


def build_config(args: argparse.Namespace) -> NodeConfig:
    """`NodeConfig` from parsed arguments; `StokeError` names a bad value and the fix."""
    from node_agent.auth import SECRET_ENV, TlsFiles
    from node_agent.facts.units import parse_size
    from node_agent.heartbeat import MIN_INTERVAL_S
    from node_agent.instances.spawn import default_threads
    from node_agent.server import NodeConfig
    from node_agent.store import StoreConfig, StoreError
    from stoke.errors import StokeError

    secret = args.secret or os.environ.get(SECRET_ENV, "")
    if not secret:
        raise StokeError(f"no shared secret: pass --secret or set ${SECRET_ENV}.")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise StokeError("--tls-cert and --tls-key go together; pass both or neither.")
    if args.slots < 1 or args.prestart < 0:
        raise StokeError(f"--slots {args.slots} must be >= 1, --prestart {args.prestart} >= 0.")
    if args.threads is not None and args.threads < 1:
        raise StokeError(f"--threads {args.threads}: must be at least 1 (or leave it out).")
    if not args.heartbeat >= MIN_INTERVAL_S:
        raise StokeError(
            f"--heartbeat {args.heartbeat}: must be at least {MIN_INTERVAL_S} s (a shorter "
            "period only loads the controller); choose a larger value."
        )
    home = (args.home or Path.home() / ".stoke" / "node").expanduser()
    node_id = args.node_id or re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:63]
    try:
        store = StoreConfig(
            node_id=node_id,
            disk_dir=home / "disk",
            disk_budget=parse_size(args.disk_cache, what="--disk-cache", minimum=1),
            dram_budget=parse_size(args.dram_cache, what="--dram-cache", minimum=1),
            dram_dir=args.dram_dir,
        )
        cpu_memory = parse_size(args.cpu_memory, what="--cpu-memory", minimum=1)
    except StoreError as exc:
        raise StokeError(str(exc)) from None
    return NodeConfig(
        store=store,
        secret=secret,
        listen=args.listen,
        advertise=args.advertise,
        controller=args.controller,
        cpu_memory=cpu_memory,
        slots=args.slots,
        prestart=args.prestart,
        threads=args.threads or default_threads(args.slots),
        heartbeat_s=args.heartbeat,
        tls=TlsFiles(args.tls_cert, args.tls_key) if args.tls_cert else None,
        controller_ca=args.controller_ca,
    )


async def _serve_until_signal(config: NodeConfig) -> None:
    import asyncio
    import signal

    from node_agent.auth import AuthConfigError
    from node_agent.server import NodeStartError, serve
    from node_agent.store import StoreError
    from stoke.errors import StokeError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def announce(address: str) -> None:
        print(f"listening on {address}", flush=True)

    try:
        await serve(config, stop, announce)
    except (NodeStartError, StoreError, AuthConfigError) as exc:
        raise StokeError(str(exc)) from None
