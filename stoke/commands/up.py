"""`stoke up`: a whole local cluster — a controller and N node agents as processes here, kept
running: a process that dies is restarted (within `RestartPolicy`'s bound) like a real
cluster's supervisor would, while the rest keep serving."""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import signal
import threading
import time
from pathlib import Path

from stoke.children import Child, RestartPolicy, Supervisor

START_TIMEOUT_S = 120.0
POLL_S = 0.25
HOST = "127.0.0.1"


def register(subparsers: argparse._SubParsersAction) -> None:
    restarts = RestartPolicy()
    parser = subparsers.add_parser(
        "up",
        help="run a local cluster (controller + node agents)",
        description=(
            "Start a controller and --nodes node agents as processes on this machine, with "
            "embedded defaults, and keep them running until Ctrl-C (SIGINT) or SIGTERM, which "
            "stops all of them cleanly (nodes first). A process that exits is logged and "
            "restarted with the same arguments (a node keeps its id and --home, the controller "
            "its HTTP and gRPC addresses), after a short backoff and at most --max-restarts "
            f"times per {restarts.window_s:g} s; past that a node is given up while the rest "
            "keep serving, and the controller stops the cluster. State lives under --home: the "
            "controller's SQLite file (deployed functions survive a restart) and each node's "
            "disk tier. Without --api-key, keys are generated on first use, printed, and saved "
            "in HOME/credentials.json, where `stoke deploy/invoke/...` find them (set "
            "STOKE_HOME if HOME is not ~/.stoke)."
        ),
    )
    parser.add_argument("--nodes", type=int, help="node agents to start (2; 0 with --autoscale)")
    parser.add_argument(
        "--autoscale",
        type=Path,
        metavar="POLICY.yaml",
        help="a cluster policy: the controller launches and retires node agents itself, from "
        "each pool's min_nodes up with the load (e.g. deploy/local.yaml)",
    )
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (8080; 0 = any free)")
    parser.add_argument("--home", type=Path, help="state directory (~/.stoke or $STOKE_HOME)")
    parser.add_argument("--api-key", help="one key for invoking and for admin (local use)")
    parser.add_argument("--cpu-memory", default="4GiB", help="instance memory per node (4GiB)")
    parser.add_argument("--dram-cache", default="2GiB", help="DRAM tier per node (2GiB)")
    parser.add_argument("--disk-cache", default="20GiB", help="disk tier per node (20GiB)")
    parser.add_argument("--slots", type=int, default=2, help="instances per node at most (2)")
    parser.add_argument(
        "--policy", default="locality", help="cold-start placement: locality, random, least-loaded"
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=restarts.max_restarts,
        metavar="N",
        help=(
            f"restarts of one process per {restarts.window_s:g} s before giving up on it "
            f"({restarts.max_restarts}; 0 = stop the cluster when any process exits)"
        ),
    )
    parser.add_argument("--keep-dram", action="store_true", help="keep DRAM tiers after exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stoke.client import stoke_home, write_credentials

    _check_args(args)
    min_nodes = _policy_min_nodes(args.autoscale) if args.autoscale else 0
    home = (args.home or stoke_home()).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    creds = _credentials(home, args.api_key)
    env = {
        **os.environ,
        "STOKE_SECRET": creds["node_secret"],
        "STOKE_ADMIN_KEY": creds["admin_key"],
        "STOKE_INVOKE_KEY": creds["invoke_key"],
        "PYTHONUNBUFFERED": "1",
    }
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    policy = RestartPolicy(max_restarts=args.max_restarts)
    supervisor = Supervisor(policy, _say, stopping)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        url, grpc_address = _start_controller(supervisor, args, home, env, deadline)
        _start_nodes(supervisor, args, home, env, grpc_address, deadline)
        write_credentials(home, {"url": url, **creds, "controller_grpc": grpc_address})
        _wait_registered(url, creds["admin_key"], args.nodes + min_nodes, deadline, stopping)
        _print_banner(url, args.nodes + min_nodes, creds, home)
        while not stopping.is_set():
            supervisor.check(time.monotonic())
            stopping.wait(POLL_S)
        _say("stopping")
        return 0
    finally:
        supervisor.stop_all()  # nodes first, then the controller
        if not args.keep_dram:
            for i in range(args.nodes):
                shutil.rmtree(_dram_dir(home, f"node-{i}"), ignore_errors=True)


def _check_args(args: argparse.Namespace) -> None:
    from stoke.errors import StokeError

    if args.nodes is None:
        args.nodes = 0 if args.autoscale else 2
    if not (0 if args.autoscale else 1) <= args.nodes <= 64:
        raise StokeError(f"--nodes {args.nodes}: start between 1 and 64 node agents.")
    if not 0 <= args.port <= 65535:
        raise StokeError(f"--port {args.port}: not a TCP port.")
    if args.api_key is not None and len(args.api_key) < 8:
        raise StokeError("--api-key: use at least 8 characters.")
    if not 0 <= args.max_restarts <= 100:
        raise StokeError(f"--max-restarts {args.max_restarts}: choose 0 to 100.")


def _policy_min_nodes(path: Path) -> int:
    """The policy's nodes at start (every pool's min_nodes); its problems, before anything runs."""
    from autoscaler.policy import PolicyError, load_policy
    from stoke.errors import StokeError

    try:
        return sum(p.min_nodes for p in load_policy(path).policy.pools)
    except PolicyError as exc:
        raise StokeError(str(exc)) from None


def _credentials(home: Path, api_key: str | None) -> dict[str, str]:
    """The keys and node secret: --api-key, else those saved under `home`, else new ones."""
    from stoke.client import read_credentials

    saved = read_credentials(home)
    return {
        "admin_key": api_key or saved.get("admin_key") or "sk-admin-" + secrets.token_urlsafe(24),
        "invoke_key": api_key or saved.get("invoke_key") or "sk-" + secrets.token_urlsafe(24),
        "node_secret": saved.get("node_secret") or secrets.token_urlsafe(32),
    }


def _say(message: str) -> None:
    print(f"stoke up: {message}", flush=True)


def _start_controller(
    supervisor: Supervisor, args: argparse.Namespace, home: Path, env: dict[str, str],
    deadline: float,
) -> tuple[str, str]:  # fmt: skip
    """Start the controller and supervise it; (its URL, its gRPC HOST:PORT). Ports chosen now
    (--port 0, and gRPC's always) are the ones a restart asks for: nodes and clients keep
    using them."""
    from stoke.errors import StokeError

    controller = Child.start(
        "controller", _controller_argv(args, home, f"{HOST}:{args.port}", f"{HOST}:0"), env
    )
    try:
        grpc_address = controller.wait_line("grpc listening on", deadline)
        http_address = controller.wait_line("http listening on", deadline)
    except StokeError:
        controller.stop()
        raise
    again = _controller_argv(args, home, http_address, grpc_address)
    supervisor.watch(controller, restart_argv=again, essential=True)
    return f"http://{http_address}", grpc_address


def _controller_argv(
    args: argparse.Namespace, home: Path, http_listen: str, grpc_listen: str
) -> list[str]:
    return [
        "controller", "--listen", http_listen, "--grpc-listen", grpc_listen,
        "--home", str(home / "controller"), "--heartbeat", "1", "--node-timeout", "5",
        "--policy", args.policy,
        *(["--autoscale", str(args.autoscale.resolve())] if args.autoscale else []),
    ]  # fmt: skip


def _start_nodes(
    supervisor: Supervisor, args: argparse.Namespace, home: Path, env: dict[str, str],
    grpc_address: str, deadline: float,
) -> None:  # fmt: skip
    """Start --nodes node agents, supervise them, and wait until each listens. A node is
    essential (its exit stops the cluster) only with --max-restarts 0."""
    threads = max(1, (os.cpu_count() or 1) // max(1, args.nodes))
    nodes = []
    for i in range(args.nodes):
        argv = _node_argv(args, home, f"node-{i}", grpc_address, threads)
        nodes.append(Child.start(f"node-{i}", argv, env))
        supervisor.watch(nodes[-1], essential=args.max_restarts == 0)
    for node in nodes:
        node.wait_line("listening on", deadline)


def _node_argv(
    args: argparse.Namespace, home: Path, node_id: str, grpc_address: str, threads: int
) -> list[str]:
    """A node's arguments, the same at every restart: its id and home (so it re-registers and
    finds its disk tier) and any free port (it tells the controller its address)."""
    return [
        "node", "--controller", grpc_address, "--listen", f"{HOST}:0",
        "--home", str(home / "nodes" / node_id), "--node-id", node_id,
        "--cpu-memory", args.cpu_memory, "--dram-cache", args.dram_cache,
        "--disk-cache", args.disk_cache, "--slots", str(args.slots),
        "--dram-dir", str(_dram_dir(home, node_id)), "--heartbeat", "1",
        "--threads", str(threads),
    ]  # fmt: skip


def _print_banner(url: str, nodes: int, creds: dict[str, str], home: Path) -> None:
    from stoke.client import stoke_home

    _say(f"controller at {url} with {nodes} node(s); Ctrl-C stops the cluster.")
    print(f"  invoke key: {creds['invoke_key']}")
    print(f"  admin key:  {creds['admin_key']}")
    home_hint = "" if home == stoke_home().resolve() else f"STOKE_HOME={home} "
    print(f"  try: {home_hint}stoke deploy NAME --model MODEL_DIR")
    print(f"       {home_hint}stoke invoke NAME 'Hello'")
    print("  OpenAI clients: base_url=" + f"{url}/v1, api_key=<invoke key>", flush=True)


def _wait_registered(
    url: str, key: str, count: int, deadline: float, stopping: threading.Event
) -> None:
    """Until the controller reports `count` live nodes."""
    from stoke.client import Client
    from stoke.errors import StokeError

    client = Client(url, key, timeout_s=10)
    while not stopping.is_set():
        alive = sum(n["alive"] for n in client.call("GET", "/admin/nodes")["nodes"])
        if alive >= count:
            return
        if time.monotonic() > deadline:
            raise StokeError(
                f"only {alive} of {count} nodes registered in {START_TIMEOUT_S:.0f} s."
            )
        stopping.wait(0.2)


def _dram_dir(home: Path, node_id: str) -> Path:
    """A DRAM tier per (cluster home, node), so two local clusters never share one."""
    tag = hashlib.sha256(str(home).encode()).hexdigest()[:8]
    return Path("/dev/shm") / f"stoke-{os.getuid()}-{tag}-{node_id}"
