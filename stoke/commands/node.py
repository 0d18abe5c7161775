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
PREEMPTION_SOURCES = ("aws", "gcp", "azure", "sigterm", "auto", "off")


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
            "'listening on HOST:PORT' once serving; SIGINT/SIGTERM stop it cleanly. With "
            "--preemption, it watches for a preemption notice (the cloud's metadata service, "
            "or SIGTERM from an orchestrator): then it takes no new work, tells the controller "
            "at once (which moves its running requests off by live migration before the "
            "deadline and stops its instances), and exits once empty if --exit-when-drained "
            "(always for SIGTERM; a second SIGTERM stops it at once)."
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
    parser.add_argument(
        "--dram-cache",
        default="2GiB",
        help="DRAM tier budget (2GiB): one arena of this size in /dev/shm, allocated and "
        "faulted in when the node starts (about 0.5-1.5 s per GiB)",
    )
    parser.add_argument("--disk-cache", default="20GiB", help="disk tier budget (20GiB)")
    parser.add_argument("--dram-dir", type=Path, help="DRAM tier directory (/dev/shm/stoke-UID-ID)")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds between beats (5)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate: listen with TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    parser.add_argument("--controller-ca", type=Path, help="CA to verify a TLS controller")
    parser.add_argument(
        "--preemption",
        choices=PREEMPTION_SOURCES,
        default="off",
        help="where preemption notices come from: a cloud's metadata service (aws: IMDSv2 "
        "spot/instance-action and rebalance; gcp: instance/preempted and maintenance-event; "
        "azure: Scheduled Events), sigterm (Kubernetes and other orchestrators), auto (the "
        "cloud whose metadata answers, else sigterm) or off (the default)",
    )
    parser.add_argument(
        "--preemption-endpoint",
        metavar="URL",
        help="base URL of the metadata service (default: the cloud's documented one)",
    )
    parser.add_argument(
        "--preemption-grace",
        type=float,
        default=30.0,
        metavar="S",
        help="sigterm: seconds between SIGTERM and the kill (terminationGracePeriodSeconds; 30)",
    )
    parser.add_argument(
        "--preemption-poll",
        type=float,
        metavar="S",
        help="seconds between metadata polls (default: what each cloud recommends)",
    )
    parser.add_argument(
        "--exit-when-drained",
        action="store_true",
        help="after a preemption notice, stop once the node runs nothing (or at the deadline)",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off). No key is "
        "asked: bind it where only Prometheus reaches it (deploy/k8s uses the pod IP behind a "
        "NetworkPolicy)",
    )
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
    from node_agent.preemption import PreemptionConfig
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
    if args.metrics_listen is not None:
        _check_address("--metrics-listen", args.metrics_listen)
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
    preemption = None
    if args.preemption != "off":
        if not args.preemption_grace > 0:
            raise StokeError(f"--preemption-grace {args.preemption_grace}: must be > 0 seconds.")
        if args.preemption_poll is not None and not args.preemption_poll > 0:
            raise StokeError(f"--preemption-poll {args.preemption_poll}: must be > 0 seconds.")
        preemption = PreemptionConfig(
            source=args.preemption,
            endpoint=args.preemption_endpoint,
            grace_s=args.preemption_grace,
            exit_when_drained=args.exit_when_drained,
            poll_interval_s=args.preemption_poll,
        )
    elif args.preemption_endpoint or args.exit_when_drained:
        raise StokeError("--preemption-endpoint and --exit-when-drained need --preemption.")
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
        preemption=preemption,
        metrics_listen=args.metrics_listen,
    )


def _check_address(flag: str, value: str) -> None:
    """`StokeError` unless `value` is HOST:PORT with a port 0..65535."""
    from stoke.errors import StokeError

    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise StokeError(f"{flag} {value!r}: expected HOST:PORT, e.g. 0.0.0.0:9400.")


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
