"""`stoke up`: a whole local cluster — a controller and N node agents as processes here."""

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

START_TIMEOUT_S = 120.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run a local cluster (controller + node agents)",
        description=(
            "Start a controller and --nodes node agents as processes on this machine, with "
            "embedded defaults, and keep them running until Ctrl-C (SIGINT) or SIGTERM, which "
            "stops all of them cleanly. State lives under --home: the controller's SQLite file "
            "(deployed functions survive a restart) and each node's disk tier. Without "
            "--api-key, keys are generated on first use, printed, and saved in "
            "HOME/credentials.json, where `stoke deploy/invoke/...` find them (set STOKE_HOME "
            "if HOME is not ~/.stoke)."
        ),
    )
    parser.add_argument("--nodes", type=int, default=2, help="node agents to start (2)")
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
    parser.add_argument("--keep-dram", action="store_true", help="keep DRAM tiers after exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stoke.client import read_credentials, stoke_home, write_credentials
    from stoke.errors import StokeError

    if not 1 <= args.nodes <= 64:
        raise StokeError(f"--nodes {args.nodes}: start between 1 and 64 node agents.")
    if not 0 <= args.port <= 65535:
        raise StokeError(f"--port {args.port}: not a TCP port.")
    if args.api_key is not None and len(args.api_key) < 8:
        raise StokeError("--api-key: use at least 8 characters.")
    home = (args.home or stoke_home()).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    saved = read_credentials(home)
    admin_key = args.api_key or saved.get("admin_key") or "sk-admin-" + secrets.token_urlsafe(24)
    invoke_key = args.api_key or saved.get("invoke_key") or "sk-" + secrets.token_urlsafe(24)
    secret = saved.get("node_secret") or secrets.token_urlsafe(32)
    env = {
        **os.environ,
        "STOKE_SECRET": secret,
        "STOKE_ADMIN_KEY": admin_key,
        "STOKE_INVOKE_KEY": invoke_key,
        "PYTHONUNBUFFERED": "1",
    }
    threads = max(1, (os.cpu_count() or 1) // args.nodes)

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())

    from stoke.children import Child

    children: list[Child] = []

    def spawn(name: str, *argv: str) -> Child:
        child = Child.start(name, list(argv), env)
        children.append(child)
        return child

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        controller = spawn(
            "controller", "controller",
            "--listen", f"127.0.0.1:{args.port}", "--grpc-listen", "127.0.0.1:0",
            "--home", str(home / "controller"), "--heartbeat", "1", "--node-timeout", "5",
            "--policy", args.policy,
        )  # fmt: skip
        grpc_address = controller.wait_line("grpc listening on", deadline)
        http_address = controller.wait_line("http listening on", deadline)
        url = f"http://{http_address}"
        nodes = []
        for i in range(args.nodes):
            node_id = f"node-{i}"
            nodes.append(
                spawn(
                    node_id,
                    "node",
                    "--controller",
                    grpc_address,
                    "--listen",
                    "127.0.0.1:0",
                    "--home",
                    str(home / "nodes" / node_id),
                    "--node-id",
                    node_id,
                    "--cpu-memory",
                    args.cpu_memory,
                    "--dram-cache",
                    args.dram_cache,
                    "--disk-cache",
                    args.disk_cache,
                    "--slots",
                    str(args.slots),
                    "--dram-dir",
                    str(_dram_dir(home, node_id)),
                    "--heartbeat",
                    "1",
                    "--threads",
                    str(threads),
                )
            )
        for node in nodes:
            node.wait_line("listening on", deadline)
        write_credentials(
            home,
            {
                "url": url,
                "admin_key": admin_key,
                "invoke_key": invoke_key,
                "node_secret": secret,
                "controller_grpc": grpc_address,
            },
        )
        _wait_registered(url, admin_key, args.nodes, deadline, stopping)
        print(f"stoke up: controller at {url} with {args.nodes} node(s); Ctrl-C stops the cluster.")
        print(f"  invoke key: {invoke_key}")
        print(f"  admin key:  {admin_key}")
        home_hint = "" if home == stoke_home().resolve() else f"STOKE_HOME={home} "
        print(f"  try: {home_hint}stoke deploy NAME --model MODEL_DIR")
        print(f"       {home_hint}stoke invoke NAME 'Hello'")
        print("  OpenAI clients: base_url=" + f"{url}/v1, api_key=<invoke key>", flush=True)
        while not stopping.is_set():
            for child in children:
                if child.proc.poll() is not None:
                    raise StokeError(
                        f"{child.name} exited with status {child.proc.returncode}; "
                        "stopping the cluster."
                    )
            stopping.wait(0.5)
        print("stoke up: stopping", flush=True)
        return 0
    finally:
        for child in reversed(children):  # nodes first, then the controller
            child.stop()
        if not args.keep_dram:
            for i in range(args.nodes):
                shutil.rmtree(_dram_dir(home, f"node-{i}"), ignore_errors=True)


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
