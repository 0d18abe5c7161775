"""Resumes under repeated node failures, with real processes: a controller and three node
agents serve concurrent streamed greedy requests; the agent serving some of them is killed
(SIGKILL), then, while they resume, the agent they resumed on. Every request must still end
with the in-process reference text, and the controller must never try to start an instance on
a node it has marked suspect. Three rounds, the killed agents restarted between them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import openai
import pytest
from cluster_fixtures import (
    INVOKE_KEY,
    Admin,
    cluster_env,
    deadline,
    free_port,
    start_node,
)

from controller.suspects import SUSPECT_S
from stoke.children import Child

NODES = ("node-a", "node-b", "node-c")
PROMPTS = ("Once upon a time", "The river", "In the morning")
PER_PROMPT = 2
"""Requests per prompt and round: six, over three instances (two requests each)."""
MAX_TOKENS = 1500
ROUNDS = 3
FUNCTION = "phoenix"


@dataclass
class Cluster:
    tmp: Path
    grpc_port: int
    url: str
    log: Path
    """The controller's log (its stderr)."""
    controller: Child
    nodes: dict[str, Child]

    def admin(self) -> Admin:
        return Admin(self.url)


def start_logged_controller(home: Path, grpc_port: int, log: Path) -> tuple[Child, str]:
    """`stoke controller` with its log in `log`; heartbeats and the node timeout at their
    defaults' proportions (a dead node counts as alive for 10 s, as in `stoke up`)."""
    argv = [sys.executable, "-m", "stoke.cli", "controller", "--listen", "127.0.0.1:0",
            "--grpc-listen", f"127.0.0.1:{grpc_port}", "--home", str(home),
            "--heartbeat", "0.5", "--node-timeout", "10"]  # fmt: skip
    with log.open("w") as err:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=err, text=True, env=cluster_env()
        )
    child = Child("controller", proc)
    threading.Thread(target=_pump, args=(child,), daemon=True).start()
    child.wait_line("grpc listening on", deadline())
    return child, "http://" + child.wait_line("http listening on", deadline())


def _pump(child: Child) -> None:
    assert child.proc.stdout is not None
    for line in child.proc.stdout:
        child.lines.put(line.rstrip("\n"))


@pytest.fixture(scope="module")
def references(tiny_ckpt_dir: Path) -> Iterator[dict[str, Future[str]]]:
    """Each prompt's greedy text from an in-process run, computed in the background while the
    cluster starts."""
    with ThreadPoolExecutor(2) as pool:
        yield {p: pool.submit(reference, tiny_ckpt_dir, p) for p in PROMPTS}


def reference(model_dir: Path, prompt: str) -> str:
    """`stoke generate --json`'s greedy text for `prompt`, on one torch thread (beside a
    cluster, more would spin-wait against its workers)."""
    argv = [sys.executable, "-m", "stoke.cli", "generate", str(model_dir), prompt, "--json",
            "--max-tokens", str(MAX_TOKENS), "--temperature", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
    return str(json.loads(done.stdout)["text"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("resume-faults")
    port = free_port()
    log = tmp / "controller.log"
    controller, url = start_logged_controller(tmp / "controller", port, log)
    c = Cluster(tmp, port, url, log, controller, {n: start_node(tmp, n, port) for n in NODES})
    yield c
    for proc in [*c.nodes.values(), c.controller]:
        proc.stop()


def wait_for_nodes(admin: Admin, addresses: dict[str, str] | None = None) -> None:
    """Every node alive with an idle worker (cold starts are quick), and the ones named in
    `addresses` registered again at a new address (restarted)."""
    old = addresses or {}

    def ready() -> bool:
        nodes = {n["node_id"]: n for n in admin.nodes()}
        return all(
            n in nodes
            and nodes[n]["alive"]
            and nodes[n]["idle_workers"] >= 1
            and nodes[n]["address"] != old.get(n)
            for n in NODES
        )

    admin.wait_for("every node up with an idle worker", ready, timeout=90)


@dataclass
class Stream:
    """One streamed greedy completion read in a thread of its own."""

    prompt: str
    text: str = ""
    request_id: str = ""
    error: BaseException | None = None
    started: threading.Event = field(default_factory=threading.Event)

    def run(self, client: openai.OpenAI) -> None:
        try:
            raw = client.completions.with_raw_response.create(
                model=FUNCTION, prompt=self.prompt, max_tokens=MAX_TOKENS, temperature=0,
                stream=True, extra_body={"stop": None},
            )  # fmt: skip
            self.request_id = raw.headers["x-request-id"]
            for chunk in raw.parse():
                for choice in chunk.choices:
                    self.text += choice.text
                self.started.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()


def start_streams(url: str) -> tuple[list[Stream], list[threading.Thread]]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=INVOKE_KEY, max_retries=0)
    streams = [Stream(p) for p in PROMPTS for _ in range(PER_PROMPT)]
    threads = [threading.Thread(target=s.run, args=(client,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    for s in streams:
        assert s.started.wait(90), "a stream produced no tokens"
        assert s.error is None, s.error
    return streams, threads


def where(admin: Admin) -> dict[str, str | None]:
    """Request id -> the node it runs on now (None while it finds one)."""
    doc = admin.http.get("/admin/requests").json()
    return {r["request_id"]: r["node"] for r in doc["requests"]}


def resumed_node(admin: Admin, moved: set[str], dead: str) -> str:
    """The node the first of `moved` (requests that ran on `dead`) resumed on."""
    found: list[str] = []

    def resumed() -> bool:
        found.extend(n for rid, n in where(admin).items() if rid in moved and n not in (None, dead))
        return bool(found)

    admin.wait_for(f"a request from {dead} to resume elsewhere", resumed, timeout=60)
    return found[0]


def kill_twice(c: Cluster, streams: list[Stream]) -> tuple[str, str, set[str]]:
    """SIGKILL the agent running most requests, then the one the first of them resumed on;
    returns both nodes and the requests that ran on the first."""
    admin = c.admin()
    running = where(admin)
    on = [running.get(s.request_id) for s in streams]
    first = max(NODES, key=on.count)
    moved = {s.request_id for s in streams if running.get(s.request_id) == first}
    assert moved, f"no request is running: {running}"
    c.nodes[first].stop(signal.SIGKILL)
    second = resumed_node(admin, moved, first)
    c.nodes[second].stop(signal.SIGKILL)
    return first, second, moved


LINE = re.compile(r"^(\S+ \S+) (\S+) (.*)$")


def log_lines(log: Path) -> list[tuple[float, str]]:
    """(wall time, "logger message") of each line of the controller's log."""
    out = []
    for raw in log.read_text().splitlines():
        m = LINE.match(raw)
        if m is None:
            continue
        try:
            when = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        out.append((when, f"{m[2]} {m[3]}"))
    return out


def starts_on_suspects(lines: list[tuple[float, str]]) -> list[str]:
    """Start attempts logged on a node within SUSPECT_S (less a margin) after it was logged
    suspect, unless it was cleared since or the router said every node left was suspect (then
    it tries them)."""
    marked: dict[str, float] = {}
    bad = []
    for when, line in lines:
        if m := re.search(r"node (\S+) is suspect for", line):
            marked[m[1]] = when
        elif m := re.search(r"node (\S+) is no longer suspect", line):
            marked.pop(m[1], None)
        elif m := re.search(r"is suspect \((.*)\); trying them anyway", line):
            for node in m[1].split(", "):
                marked.pop(node, None)
        elif m := re.search(r"starting an instance on (\S+)", line):
            since = marked.get(m[1])
            if since is not None and when - since < SUSPECT_S - 0.5:
                bad.append(line)
    return bad


def test_requests_survive_two_node_deaths_in_a_row(
    references: dict[str, Future[str]], cluster: Cluster, tiny_ckpt_dir: Path
) -> None:
    """Each round: six streams over three instances; kill the node running most of them, then
    the node the first of those resumed on. Every text equals its reference, the second resume
    avoided both dead nodes (its log line says so), and no instance was started on a node
    within its suspicion."""
    admin = cluster.admin()
    wait_for_nodes(admin)
    spec = {"autoscaling": {"target_concurrency": 2, "max_instances": 6, "keep_alive": 600}}
    admin.deploy(FUNCTION, {"model": str(tiny_ckpt_dir), **spec})
    for round_ in range(ROUNDS):
        seen = len(log_lines(cluster.log))
        streams, threads = start_streams(cluster.url)
        first, second, moved = kill_twice(cluster, streams)
        for t in threads:
            t.join(120)
        lines = log_lines(cluster.log)[seen:]
        context = f"round {round_}: killed {first}, then {second}; log in {cluster.log}"
        assert not any(t.is_alive() for t in threads), f"{context}: a stream never ended"
        for s in streams:
            assert s.error is None, f"{context}: request {s.request_id} lost: {s.error}"
            assert s.text == references[s.prompt].result(), (
                f"{context}: request {s.request_id} differs"
            )
        suspects = {n for _, line in lines for n in NODES if f"node {n} is suspect for" in line}
        assert {first, second} <= suspects, context
        assert starts_on_suspects(lines) == [], context
        avoid = f"resuming on a node other than {', '.join(sorted([first, second]))}"
        twice = [
            rid for rid in moved
            if any(f"request {rid} lost {second}" in line and avoid in line for _, line in lines)
        ]  # fmt: skip
        assert twice, f"{context}: no request resumed a second time"
        if round_ < ROUNDS - 1:
            restart(cluster, first, second)


def restart(c: Cluster, *nodes: str) -> None:
    """Start the killed agents again (same ids and homes) and wait until they serve."""
    admin = c.admin()
    addresses = {n["node_id"]: n["address"] for n in admin.nodes()}
    for node in nodes:
        c.nodes[node] = start_node(c.tmp, node, c.grpc_port)
    wait_for_nodes(admin, {n: addresses[n] for n in nodes})
