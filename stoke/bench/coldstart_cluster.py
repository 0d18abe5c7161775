"""A private local cluster for `stoke bench coldstart`: one controller and one node agent as
processes (the `stoke up` pattern), with a secret and keys of its own and all state in a scratch
home, plus the clients the benchmark times requests with: the HTTP API (admin calls, streaming
completions timed to the first text) and the node's NodeAgent gRPC service (Status, Prefetch,
Evict, and Generate timed the same way, for the controller-overhead comparison).

Children log to files under `home/logs`; `stop` ends them (nodes first) and deletes the node's
DRAM tier in /dev/shm, which a node keeps across its own restarts by design.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx2 as httpx

from node_agent.facts.tiers import TierName
from stoke.errors import StokeError

START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 1800.0  # a cold start from the loopback S3 server can take minutes
NODE_ID = "bench-node"


@dataclass(frozen=True)
class NodeSizing:
    """The node agent's budgets (`stoke node` size strings) and torch threads per instance."""

    cpu_memory: str
    dram_cache: str
    disk_cache: str
    slots: int
    threads: int


@dataclass(frozen=True)
class FirstToken:
    """One streamed request, timed on the client from sending it."""

    ttft_s: float  # to the first chunk carrying text
    total_s: float  # to the end of the stream
    headers: dict[str, str]


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[str]
    log: Path
    ready: dict[str, str]

    def wait_line(self, prefix: str, deadline: float) -> str:
        """The rest of the first stdout line starting with `prefix` (read by `_pump`)."""
        while prefix not in self.ready:
            if self.proc.poll() is not None:
                raise StokeError(
                    f"{self.name} exited with status {self.proc.returncode} while starting; "
                    f"last lines of {self.log}:\n{tail(self.log)}"
                )
            if time.monotonic() > deadline:
                raise StokeError(f"{self.name} did not start in {START_TIMEOUT_S:.0f} s.")
            time.sleep(0.05)
        return self.ready[prefix]

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file ('' if it is missing)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class BenchCluster:
    """Controller + one node under `home`. `start`, use, then always `stop` (idempotent)."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.admin_key = "sk-admin-" + secrets.token_urlsafe(18)
        self.invoke_key = "sk-" + secrets.token_urlsafe(18)
        self.secret = secrets.token_urlsafe(24)
        self.env = env | {
            "STOKE_SECRET": self.secret,
            "STOKE_ADMIN_KEY": self.admin_key,
            "STOKE_INVOKE_KEY": self.invoke_key,
            "PYTHONUNBUFFERED": "1",
        }
        self.dram_dir = Path("/dev/shm") / f"stoke-{os.getuid()}-bench-coldstart-{os.getpid()}"
        self.node_home = home / "node"
        self.children: list[_Child] = []
        self.url = ""
        self.node_address = ""
        self._http: httpx.Client | None = None
        self._conn: http.client.HTTPConnection | None = None  # the timed requests'
        self._channel: Any = None
        self._stub: Any = None
        self._metadata: tuple[tuple[str, str], ...] = ()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, sizing: NodeSizing) -> None:
        """Spawn the controller, then the node; return once the node is registered."""
        deadline = time.monotonic() + START_TIMEOUT_S
        controller = self._spawn(
            "controller",
            ["controller", "--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0",
             "--home", str(self.home / "controller"), "--heartbeat", "0.5",
             "--node-timeout", "30"],
        )  # fmt: skip
        grpc_address = controller.wait_line("grpc listening on", deadline)
        self.url = "http://" + controller.wait_line("http listening on", deadline)
        node = self._spawn(
            "node",
            ["node", "--controller", grpc_address, "--listen", "127.0.0.1:0",
             "--home", str(self.node_home), "--node-id", NODE_ID,
             "--dram-dir", str(self.dram_dir), "--cpu-memory", sizing.cpu_memory,
             "--dram-cache", sizing.dram_cache, "--disk-cache", sizing.disk_cache,
             "--slots", str(sizing.slots), "--heartbeat", "0.5",
             "--threads", str(sizing.threads)],
        )  # fmt: skip
        self.node_address = node.wait_line("listening on", deadline)
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(REQUEST_TIMEOUT_S))
        self._open_node_channel()
        self.wait("the node to register", lambda: any(n["alive"] for n in self.nodes()))

    def stop(self) -> None:
        """Stop every child (nodes first), close the clients, delete the DRAM tier."""
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        shutil.rmtree(self.dram_dir, ignore_errors=True)

    def logs(self) -> str:
        """The tail of every child's log, for an error report."""
        return "\n".join(f"--- {c.log}\n{tail(c.log)}" for c in self.children)

    def _spawn(self, name: str, argv: list[str]) -> _Child:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        with open(log, "ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "stoke.cli", *argv],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=self.env,
            )
        child = _Child(name, proc, log, {})
        assert proc.stdout is not None
        threading.Thread(target=_pump, args=(proc.stdout, child.ready, log), daemon=True).start()
        self.children.append(child)
        return child

    # -- the HTTP API -------------------------------------------------------------------------

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """One admin call; a non-2xx answer raises `StokeError` with the controller's words."""
        assert self._http is not None
        headers = {"authorization": f"Bearer {self.admin_key}"}
        response = self._http.request(method, path, json=body, headers=headers)
        if response.status_code >= 400:
            raise StokeError(f"{method} {path}: HTTP {response.status_code}: {response.text}")
        return response.json()

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.admin("GET", "/admin/nodes")["nodes"])

    def instances(self, function: str) -> list[dict[str, Any]]:
        return list(self.admin("GET", f"/admin/functions/{function}")["instances"])

    def first_token(self, function: str, prompt: str, max_tokens: int) -> FirstToken:
        """Stream one greedy completion; time the first chunk with text and the end.

        Timed with the standard library's `http.client` on a kept-alive connection: the
        thinnest HTTP client Python has, so the controller is not charged for a client
        library's own work (httpx's is ~1 ms a request here), as the direct path uses gRPC's
        own client."""
        body = json.dumps(
            {"model": function, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
             "stream": True}
        ).encode()  # fmt: skip
        headers = {"authorization": f"Bearer {self.invoke_key}", "content-type": "application/json"}
        first = None
        start = time.perf_counter()
        response = self._timed_request("POST", "/v1/completions", body, headers)
        if response.status >= 400:
            raise StokeError(f"{function}: HTTP {response.status}: {response.read().decode()}")
        while line := response.readline():
            if not line.startswith(b"data: {"):
                continue
            if first is None and _chunk_text(line.removeprefix(b"data: ").decode(), function):
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        if first is None:
            raise StokeError(f"{function}: the stream carried no text; raise max_tokens.")
        return FirstToken(first, total, {k.lower(): v for k, v in response.getheaders()})

    def healthz_s(self) -> float:
        """Seconds for one GET /healthz: the controller's HTTP round trip, without a node."""
        start = time.perf_counter()
        response = self._timed_request("GET", "/healthz", None, {})
        response.read()
        if response.status != 200:
            raise StokeError(f"/healthz: HTTP {response.status}")
        return time.perf_counter() - start

    def _timed_request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> http.client.HTTPResponse:
        """Send on the kept-alive connection (reopened once if the server closed it idle)."""
        for attempt in (1, 2):
            if self._conn is None:
                parsed = urllib.parse.urlsplit(self.url)
                self._conn = http.client.HTTPConnection(
                    parsed.hostname or "127.0.0.1", parsed.port, timeout=REQUEST_TIMEOUT_S
                )
            try:
                self._conn.request(method, path, body=body, headers=headers)
                return self._conn.getresponse()
            except (ConnectionError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def server_ttft(self, function: str) -> tuple[float, int]:
        """(sum of seconds, count) of the controller's own warm TTFT histogram for `function`:
        from the request's arrival in the router (parsed and tokenized) to its first token."""
        text = self.admin_text("/metrics")
        got = {}
        for part in ("sum", "count"):
            pattern = rf'^stoke_ttft_seconds_{part}\{{(?=[^}}]*function="{re.escape(function)}")'
            pattern += r'(?=[^}]*cold_start="false")[^}]*\} (\S+)$'
            match = re.search(pattern, text, re.MULTILINE)
            got[part] = float(match.group(1)) if match else 0.0
        return got["sum"], int(got["count"])

    def admin_text(self, path: str) -> str:
        """GET `path` with the admin key; the body as text."""
        assert self._http is not None
        headers = {"authorization": f"Bearer {self.admin_key}"}
        response = self._http.get(path, headers=headers)
        response.raise_for_status()
        return response.text

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 300.0) -> None:
        """Poll `check` until it holds, or raise `StokeError` naming `what`."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise StokeError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)

    # -- the node's gRPC service --------------------------------------------------------------

    def _open_node_channel(self) -> None:
        """A blocking gRPC channel (the bench has no event loop); every call carries the
        shared secret as `node_agent.auth` expects it."""
        import grpc

        from node_agent.auth import AUTH_KEY
        from node_agent.proto import node_agent_pb2_grpc as pb_grpc

        self._channel = grpc.insecure_channel(self.node_address)
        self._stub = pb_grpc.NodeAgentStub(self._channel)
        self._metadata = ((AUTH_KEY, f"Bearer {self.secret}"),)

    def _call(self, method: str, request: Any, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        return getattr(self._stub, method)(request, timeout=timeout, metadata=self._metadata)

    def status(self) -> Any:
        """The node's `NodeStatus`."""
        from node_agent.proto import node_agent_pb2 as pb

        return self._call("Status", pb.StatusRequest(), timeout=30)

    def held(self, key: str) -> set[TierName]:
        """The tiers of the node that hold checkpoint `key`."""
        tiers = self.status().tiers
        return {TierName(t.tier) for t in tiers if any(h.key == key for h in t.holdings)}

    def prefetch(self, source: str, tier: TierName) -> None:
        from node_agent.proto import node_agent_pb2 as pb

        self._call("Prefetch", pb.PrefetchRequest(source=source, tier=tier))

    def evict(self, key: str, tier: TierName) -> int:
        from node_agent.proto import node_agent_pb2 as pb

        return int(self._call("Evict", pb.EvictRequest(checkpoint_key=key, tier=tier)).freed_bytes)

    def direct_first_token(self, instance_id: str, prompt_ids: list[int], max_tokens: int) -> float:
        """Seconds from calling the node's Generate on `instance_id` to the first text event."""
        from node_agent.proto import node_agent_pb2 as pb

        request = pb.GenerateRequest(
            instance_id=instance_id,
            request_id=f"bench-{uuid.uuid4().hex}",
            prompt_ids=prompt_ids,
            params=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0),
        )
        first = None
        start = time.perf_counter()
        for event in self._call("Generate", request, timeout=600):
            if event.finish_reason in (pb.FINISH_REASON_ERROR, pb.FINISH_REASON_ABORT):
                raise StokeError(f"Generate on {instance_id} failed: {event.error}")
            if first is None and event.text:
                first = time.perf_counter() - start
        if first is None:
            raise StokeError(f"Generate on {instance_id} carried no text; raise max_tokens.")
        return first


def _pump(stdout: IO[str], ready: dict[str, str], log: Path) -> None:
    """Record each child's announcement lines; copy all of its stdout into its log."""
    with open(log, "a") as out:
        for line in stdout:
            for prefix in ("grpc listening on", "http listening on", "listening on"):
                if line.startswith(prefix):
                    ready.setdefault(prefix, line.removeprefix(prefix).strip())
                    break
            out.write(line)
            out.flush()


def _chunk_text(data: str, function: str) -> str:
    event = json.loads(data)
    if "error" in event:
        raise StokeError(f"{function}: the stream failed: {event['error'].get('message')}")
    choices = event.get("choices") or [{}]
    return str(choices[0].get("text") or "")
