"""Real controller and node-agent processes for end-to-end tests, and small helpers to drive
them over HTTP (the `openai` client for invocation, httpx for the admin API)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx

from stoke.children import Child

START_TIMEOUT_S = 90.0
SECRET = "cluster-test-secret"
ADMIN_KEY = "sk-admin-test-0123456789"
INVOKE_KEY = "sk-invoke-test-0123456789"


def deadline() -> float:
    """When a process that is starting must have said it is ready."""
    return time.monotonic() + START_TIMEOUT_S


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_env() -> dict[str, str]:
    return {
        **os.environ,
        "STOKE_SECRET": SECRET,
        "STOKE_ADMIN_KEY": ADMIN_KEY,
        "STOKE_INVOKE_KEY": INVOKE_KEY,
        "PYTHONUNBUFFERED": "1",
    }


def start_controller(home: Path, grpc_port: int, *extra: str) -> tuple[Child, str]:
    """A `stoke controller` on a free HTTP port and `grpc_port`; returns it and its URL."""
    proc = Child.start(
        "controller",
        ["controller", "--listen", "127.0.0.1:0", "--grpc-listen", f"127.0.0.1:{grpc_port}",
         "--home", str(home), "--heartbeat", "0.5", "--node-timeout", "3", *extra],
        cluster_env(),
    )  # fmt: skip
    proc.wait_line("grpc listening on", deadline())
    return proc, "http://" + proc.wait_line("http listening on", deadline())


def start_node(tmp: Path, node_id: str, grpc_port: int, *extra: str) -> Child:
    proc = Child.start(
        node_id,
        ["node", "--controller", f"127.0.0.1:{grpc_port}", "--listen", "127.0.0.1:0",
         "--home", str(tmp / node_id), "--node-id", node_id, "--dram-dir",
         str(tmp / f"{node_id}-dram"), "--cpu-memory", "4GiB", "--dram-cache", "1GiB",
         "--disk-cache", "2GiB", "--slots", "2", "--heartbeat", "0.5", *extra],
        cluster_env(),
    )  # fmt: skip
    proc.wait_line("listening on", deadline())
    return proc


class Admin:
    """The admin API with the admin key."""

    def __init__(self, url: str, key: str = ADMIN_KEY) -> None:
        self.http = httpx.Client(
            base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=120
        )

    def deploy(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        r = self.http.put(f"/admin/functions/{name}", json=spec)
        assert r.status_code in (200, 201), r.text
        return dict(r.json())

    def function(self, name: str) -> dict[str, Any]:
        r = self.http.get(f"/admin/functions/{name}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.http.get("/admin/nodes").json()["nodes"])

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
        """Poll the controller's state until `check()` holds (state changes are asynchronous:
        heartbeats, keep-alive), or fail naming `what`."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.1)


def generate_json(model_dir: Path, prompt: str, *extra: str) -> dict[str, Any]:
    """`stoke generate --json` in a subprocess: the in-process reference output."""
    out = subprocess.run(
        [sys.executable, "-m", "stoke.cli", "generate", str(model_dir), prompt, "--json", *extra],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return dict(json.loads(out.stdout))


def run_cli(
    home: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`stoke ARGV` as a user on this machine would run it (STOKE_HOME points at the cluster)."""
    full_env = {**os.environ, "STOKE_HOME": str(home), **(env or {})}
    full_env.pop("STOKE_URL", None)
    full_env.pop("STOKE_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "stoke.cli", *argv], capture_output=True, text=True, env=full_env
    )


@contextlib.contextmanager
def throttled(*pids: int, run_s: float = 0.004, stopped_s: float = 0.012) -> Iterator[None]:
    """Slow processes to a quarter of their speed (SIGSTOP/SIGCONT in turn) for the block: a
    slow machine, on demand. One that exits meanwhile is dropped; the rest run normally again
    after."""
    done = threading.Event()
    live = set(pids)

    def send(sig: signal.Signals) -> None:
        for pid in list(live):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                live.discard(pid)

    def toggle() -> None:
        while not done.wait(run_s):
            send(signal.SIGSTOP)
            try:
                done.wait(stopped_s)
            finally:
                send(signal.SIGCONT)

    thread = threading.Thread(target=toggle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        send(signal.SIGCONT)


def worker_pid(admin: Admin, instance_id: str) -> int:
    """The instance's process id, from the first heartbeat that reports it."""
    found: list[int] = []

    def reported() -> bool:
        for node in admin.nodes():
            found.extend(
                int(i["pid"]) for i in node["reported_instances"] if i["instance_id"] == instance_id
            )
        return bool(found)

    admin.wait_for(f"a heartbeat reporting {instance_id}", reported)
    return found[0]
