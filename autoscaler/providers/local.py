"""The `local` provider: node agents as processes on this machine, so the whole elastic loop
(launch, register, serve, drain, retire) runs on one machine, for `stoke up --autoscale` and the
tests. Each node gets `--node-id`, a home of its own under the provider's directory, its
pool's `offers` as `--slots`/`--cpu-memory` and the pool's `node_args`; spot pools' nodes treat
SIGTERM as a preemption notice (they drain, then exit), as a cloud's spot node would.

What it started is recorded in `nodes.json` (pid, pool, zone, launch time; written atomically),
so a restarted controller finds its nodes again (`list_nodes` keeps those whose process is still
that node). `close` stops the nodes it started; a crashed controller leaves them running, to be
adopted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from autoscaler.policy import Market
from autoscaler.providers.base import LaunchError, LaunchRequest, NodeStatus, ProviderNode

STOP_TIMEOUT_S = 30.0


class LocalProvider:
    name = "local"

    def __init__(self, home: Path, *, python: str = sys.executable) -> None:
        self.home, self.python = home, python
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._closed = False

    @property
    def _index(self) -> Path:
        return self.home / "nodes.json"

    def launch(self, request: LaunchRequest) -> ProviderNode:
        pool = request.pool
        node_home = self.home / request.node_id
        node_home.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = [
            self.python, "-m", "stoke.cli", "node",
            "--controller", request.controller_address, "--listen", "127.0.0.1:0",
            "--home", str(node_home), "--node-id", request.node_id,
            "--dram-dir", str(self.dram_dir(request.node_id)),
            "--slots", str(pool.offers.slots),
        ]  # fmt: skip
        if pool.offers.cpu_memory:
            argv += ["--cpu-memory", str(pool.offers.cpu_memory)]
        if pool.market is Market.SPOT:
            argv += ["--preemption", "sigterm", "--exit-when-drained"]
        argv += pool.node_args
        with self._lock:  # one at a time, and none once closed (no orphan from a late launch)
            if self._closed:
                raise LaunchError("the provider is closed (the controller is stopping)")
            return self._start(request, argv, node_home)

    def _start(self, request: LaunchRequest, argv: list[str], node_home: Path) -> ProviderNode:
        pool = request.pool
        log = (node_home / "node.log").open("ab")
        try:
            proc = subprocess.Popen(
                argv,
                env={**os.environ, "STOKE_SECRET": request.secret},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C at the terminal is the controller's to handle
            )
        except OSError as exc:
            raise LaunchError(f"could not start a node process: {exc}") from None
        finally:
            log.close()
        node = ProviderNode(
            request.node_id, pool.name, request.zone, str(proc.pid), NodeStatus.PENDING, time.time()
        )
        self._procs[request.node_id] = proc
        records = self._read()
        records[request.node_id] = {
            "pid": proc.pid, "pool": pool.name, "zone": request.zone,
            "launched_unix": node.launched_unix,
        }  # fmt: skip
        self._write(records)
        return node

    def list_nodes(self) -> list[ProviderNode]:
        with self._lock:
            records = self._read()
            alive = {k: v for k, v in records.items() if self._running(k, int(v["pid"]))}
            if len(alive) != len(records):
                self._write(alive)
        for gone in records.keys() - alive.keys():  # exited by itself (a spot node's notice)
            shutil.rmtree(self.dram_dir(gone), ignore_errors=True)  # its arena holds memory
        return [
            ProviderNode(
                node_id,
                r["pool"],
                r["zone"],
                str(r["pid"]),
                NodeStatus.RUNNING,
                float(r["launched_unix"]),
            )
            for node_id, r in sorted(alive.items())
        ]

    def terminate(self, node: ProviderNode) -> None:
        """SIGTERM (the node drains whatever is left and exits), SIGKILL after STOP_TIMEOUT_S."""
        self._stop(node, signal.SIGTERM)

    def _stop(self, node: ProviderNode, sig: int) -> None:
        pid = int(node.provider_id)
        if not self._running(node.node_id, pid):
            self._forget(node.node_id)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self._running(node.node_id, pid) and time.monotonic() < deadline:
            proc = self._procs.get(node.node_id)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.2)
            else:
                time.sleep(0.2)  # not our child (adopted): poll its /proc entry
        if self._running(node.node_id, pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc = self._procs.pop(node.node_id, None)
        if proc is not None:
            proc.wait()
        self._forget(node.node_id)

    def close(self) -> None:
        """Stop every node this provider started or adopted, at once (SIGINT: no drain; the
        cluster is going away with the controller)."""
        with self._lock:
            self._closed = True
        for node in self.list_nodes():
            self._stop(node, signal.SIGINT)

    def dram_dir(self, node_id: str) -> Path:
        """A DRAM tier per (provider home, node): two local clusters never share one."""
        tag = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:8]
        return Path("/dev/shm") / f"stoke-{os.getuid()}-{tag}-{node_id}"

    def _running(self, node_id: str, pid: int) -> bool:
        proc = self._procs.get(node_id)
        if proc is not None:
            return proc.poll() is None
        try:  # adopted: the pid must still be that node (pids are reused)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return node_id.encode() in cmdline and b"node" in cmdline

    def _forget(self, node_id: str) -> None:
        shutil.rmtree(self.dram_dir(node_id), ignore_errors=True)  # it holds memory
        with self._lock:
            records = self._read()
            if records.pop(node_id, None) is not None:
                self._write(records)

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._index.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # unreadable: nothing to adopt (the nodes still register and are kept)
        return data if isinstance(data, dict) else {}

    def _write(self, records: dict[str, dict[str, Any]]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.home, prefix=".nodes-")
        with os.fdopen(fd, "w") as f:
            json.dump(records, f, indent=1, sort_keys=True)
        os.replace(tmp, self._index)
