"""stoke bench faults: a real spot trace replayed on a local cluster under load; nothing lost.

A controller and one node agent per node the trace has alive (at most --max-nodes), serving a
demo model, under a steady load of streamed completions whose arrivals and lengths come from
the Azure LLM inference trace (greedy and seeded sampling, alternating). The spot trace's ticks
are compressed (--tick-s seconds each): every drop is that many nodes preempted, every rise that
many new nodes. Nodes take turns at how they go: a notice through a loopback AWS IMDS (deadline
--notice-s away), GCP metadata (GCP's fixed 30 s), Azure Scheduled Events (NotBefore --notice-s
away), SIGTERM (grace --notice-s), or a plain SIGKILL with no notice. A node still running at
its deadline is killed (the cloud takes it back). The same arrivals are first run with no
faults, for the TTFT baseline.

Reported: requests sent, completed, failed (refused before streaming: no capacity), lost (a
stream that broke or ended without a finish), outputs that differ from the in-process reference
(text, and token counts above or below it: duplicated or skipped tokens), the preemption
migrations, their pauses and whether each ended before its node's deadline, and TTFT p50/p99
against the baseline. Target: 0 lost, 0 duplicated or skipped, every output equal to the
reference, every migration before its deadline.

The loopback metadata servers are the test suite's (`tests/cloud_metadata.py`): run this from
a checkout of the repository.
"""

from __future__ import annotations

import argparse
import csv
import email.utils
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stoke.bench.coldstart_cluster import START_TIMEOUT_S, BenchCluster, _Child
from stoke.bench.common import default_workdir, demo_model_dir
from stoke.errors import StokeError

REPO = Path(__file__).resolve().parents[2]
TRACES = REPO.parent / "shared" / "traces"
DEFAULT_TRACE = TRACES / "spot" / "preemption_4-node_aws-08-03-2023_us-east-1f_v100_1.json"
DEFAULT_ARRIVALS = TRACES / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv"
KINDS = ("aws", "gcp", "azure", "sigterm", "kill")
GCP_NOTICE_S = 30.0  # GCP's preemption notice, fixed by the cloud (and by spot.notices.gcp)
PROMPT_CAP = 200  # context tokens taken from the trace, at most (the demo model is small)
MAX_TOKENS = {"tiny": (4, 64, 1200), "small": (1, 32, 256)}
"""Per model: the trace's generated tokens times this, clamped to this range (the tiny model
decodes ~1 ms a token, the small one ~30: long enough to still run when a notice comes)."""


def register(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser(
        "faults",
        help="a spot trace replayed under load: lost/duplicated requests, migrations, TTFT",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="spot trace (JSON)")
    parser.add_argument(
        "--ticks",
        default="127:150",
        help="the slice of the trace to replay, START:END (default 127:150: 7 drops and 3 "
        "rises, never empty)",
    )
    parser.add_argument("--tick-s", type=float, default=3.0, help="seconds per trace tick (3)")
    parser.add_argument(
        "--arrivals", type=Path, default=DEFAULT_ARRIVALS, help="Azure LLM trace (CSV)"
    )
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second (3)")
    parser.add_argument(
        "--notice-s",
        type=float,
        default=3.0,
        help="notice length: AWS's (SIGTERM's grace is half, Azure's NotBefore twice; 3 s)",
    )
    parser.add_argument("--max-nodes", type=int, default=4, help="node agents at most (4)")
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny", help="demo model")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--logs", type=Path, help="copy the cluster's logs into this folder")
    parser.set_defaults(func=run)


# ---- inputs ------------------------------------------------------------------------------------


def load_trace(path: Path, ticks: str, max_nodes: int) -> list[int]:
    """Nodes alive at each tick of the slice, capped at `max_nodes`."""
    try:
        data = json.loads(path.read_text())["data"]
        start, end = (int(x) for x in ticks.split(":"))
    except (OSError, ValueError, KeyError) as exc:
        raise StokeError(f"--trace {path} / --ticks {ticks}: {exc}") from None
    alive = [min(int(n), max_nodes) for n in data[start:end]]
    if len(alive) < 2 or min(alive) < 1:
        raise StokeError(f"--ticks {ticks}: pick a slice of at least 2 ticks, never empty")
    return alive


@dataclass(frozen=True)
class Arrival:
    at_s: float
    context: int
    max_tokens: int
    seed: int | None


def load_arrivals(path: Path, rate: float, duration_s: float, size: str) -> list[Arrival]:
    """The trace's first requests, their gaps scaled to `rate` per second, for `duration_s`."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise StokeError(f"--arrivals {path}: {exc}") from None
    stamps = [_stamp(r["TIMESTAMP"]) for r in rows[:5000]]
    trace_rate = (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)
    scale = trace_rate / rate
    out = []
    for i, (row, t) in enumerate(zip(rows, stamps, strict=False)):
        at = (t - stamps[0]) * scale
        if at > duration_s:
            break
        times, least, most = MAX_TOKENS[size]
        gen = int(row["GeneratedTokens"]) * times
        out.append(
            Arrival(
                at,
                min(int(row["ContextTokens"]), PROMPT_CAP),
                max(least, min(gen, most)),
                None if i % 2 == 0 else 1000 + i,
            )
        )
    return out


def _stamp(text: str) -> float:
    hms = text.split(" ")[1]
    h, m, s = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


# ---- the cluster -------------------------------------------------------------------------------


@dataclass
class Node:
    node_id: str
    kind: str
    child: _Child
    server: Any = None  # the loopback metadata server for a cloud kind
    deadline: float | None = None  # unix time it goes, once noticed
    killed: bool = False


class FaultCluster(BenchCluster):
    """The coldstart bench's cluster with any number of nodes, each watching its notices."""

    def __init__(self, home: Path, env: dict[str, str], notice_s: float) -> None:
        super().__init__(home, env)
        self.notice_s = notice_s
        self.grpc_address = ""
        self.count = 0
        self.fleet: list[Node] = []
        self.log: list[str] = []

    def start_controller(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        config = self.home / "controller.yaml"
        config.write_text("preemption_margin_s: 1.0\n")
        controller = self._spawn(
            "controller",
            ["controller", "--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0",
             "--home", str(self.home / "controller"), "--heartbeat", "0.5",
             "--node-timeout", "3", "--config", str(config)],
        )  # fmt: skip
        self.grpc_address = controller.wait_line("grpc listening on", deadline)
        self.url = "http://" + controller.wait_line("http listening on", deadline)
        import httpx2 as httpx

        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(600.0))

    def add_node(self, servers: Any) -> Node:
        kind = KINDS[self.count % len(KINDS)]
        node_id = f"node-{self.count}"
        self.count += 1
        server = None
        preemption = ["--preemption", "off"]
        if kind in ("aws", "gcp", "azure"):
            server = {"aws": servers.AwsImds, "gcp": servers.GcpMetadata}.get(
                kind, servers.AzureScheduledEvents
            )().start()
            preemption = ["--preemption", kind, "--preemption-endpoint", server.url,
                          "--preemption-poll", "0.2", "--exit-when-drained"]  # fmt: skip
        elif kind == "sigterm":
            grace = str(self.notice_s / 2)
            preemption = ["--preemption", "sigterm", "--preemption-grace", grace]
        child = self._spawn(
            node_id,
            ["node", "--controller", self.grpc_address, "--listen", "127.0.0.1:0",
             "--home", str(self.home / node_id), "--node-id", node_id,
             "--dram-dir", str(self.dram_dir) + f"-{node_id}", "--cpu-memory", "2GiB",
             "--dram-cache", "512MiB", "--disk-cache", "1GiB", "--slots", "2",
             "--heartbeat", "0.5", "--threads", "1", "--prestart", "0", *preemption],
        )  # fmt: skip
        child.wait_line("listening on", time.monotonic() + START_TIMEOUT_S)
        node = Node(node_id, kind, child, server)
        self.fleet.append(node)
        return node

    def preempt(self, node: Node) -> None:
        """Take `node` away the way its kind says; it is killed at its deadline if it is still
        there (`reap`)."""
        now = time.time()
        if node.kind == "kill":
            node.child.proc.send_signal(signal.SIGKILL)
            node.deadline, node.killed = now, True
            return
        if node.kind == "aws":
            node.deadline = now + self.notice_s
            node.server.inject_instance_action("terminate", _iso_z(node.deadline))
            node.deadline = float(int(node.deadline))  # IMDS gives whole seconds
        elif node.kind == "gcp":
            node.deadline = now + GCP_NOTICE_S
            node.server.set_value("preempted", "TRUE")
        elif node.kind == "azure":
            node.deadline = float(int(now + 2 * self.notice_s))  # RFC 1123: whole seconds
            node.server.inject_event(
                "Preempt", not_before=email.utils.formatdate(node.deadline, usegmt=True)
            )
        else:
            node.deadline = now + self.notice_s / 2
            node.child.proc.send_signal(signal.SIGTERM)

    def reap(self) -> None:
        """Kill the noticed nodes past their deadline (the cloud takes them back)."""
        for node in self.fleet:
            past = node.deadline is not None and time.time() >= node.deadline
            if past and not node.killed and node.child.proc.poll() is None:
                node.child.proc.send_signal(signal.SIGKILL)
                node.killed = True
                self.note(f"{node.node_id} killed at its deadline (it was still running)")

    def note(self, line: str) -> None:
        self.log.append(line)
        print("  " + line, file=sys.stderr, flush=True)

    def alive(self) -> list[Node]:
        return [n for n in self.fleet if n.deadline is None and n.child.proc.poll() is None]

    def stop(self) -> None:
        for node in self.fleet:
            if node.server is not None:
                node.server.stop()
        super().stop()
        import shutil

        for node in self.fleet:
            shutil.rmtree(str(self.dram_dir) + f"-{node.node_id}", ignore_errors=True)


def _iso_z(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


# ---- load --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    arrival: Arrival
    prompt: str
    sent: float = 0.0
    ttft_s: float | None = None
    text: str = ""
    completion_tokens: int | None = None
    finish: str | None = None
    status: int | None = None
    error: str | None = None
    node: str = ""
    events: list[str] = field(default_factory=list)


def send(cluster: FaultCluster, out: Outcome) -> None:
    body = {"model": "faults", "prompt": out.prompt, "max_tokens": out.arrival.max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "stop": None,
            "temperature": 0.0 if out.arrival.seed is None else 0.9, "top_p": 1.0}  # fmt: skip
    if out.arrival.seed is not None:
        body["seed"] = out.arrival.seed
    assert cluster._http is not None
    headers = {"authorization": f"Bearer {cluster.invoke_key}"}
    out.sent = time.perf_counter()
    try:
        with cluster._http.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            out.status = r.status_code
            if r.status_code != 200:
                r.read()
                out.error = r.text[:200]
                return
            out.node = r.headers.get("x-stoke-node", "")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = str(chunk["error"])[:200]
                    return
                for choice in chunk.get("choices", []):
                    if choice.get("text") and out.ttft_s is None:
                        out.ttft_s = time.perf_counter() - out.sent
                    out.text += choice.get("text") or ""
                    out.finish = choice.get("finish_reason") or out.finish
                if chunk.get("usage"):
                    out.completion_tokens = chunk["usage"]["completion_tokens"]
    except Exception as exc:  # the connection broke
        out.error = f"{type(exc).__name__}: {exc}"[:200]


def run_load(
    cluster: FaultCluster,
    outcomes: list[Outcome],
    on_tick: Any = None,
    tick_s: float = 0.0,
    ticks: int = 0,
) -> None:
    """Send every request at its arrival time (a thread each), calling `on_tick(i)` at each of
    `ticks` ticks `tick_s` apart; then wait for every stream, killing nodes at their
    deadlines meanwhile."""
    start = time.monotonic()
    pending = sorted(outcomes, key=lambda o: o.arrival.at_s)
    tick = 0
    with ThreadPoolExecutor(max_workers=64) as pool:
        futures = []
        while pending or tick < ticks:
            now = time.monotonic() - start
            while pending and pending[0].arrival.at_s <= now:
                futures.append(pool.submit(send, cluster, pending.pop(0)))
            if tick < ticks and now >= tick * tick_s:
                on_tick(tick)
                tick += 1
            cluster.reap()
            time.sleep(0.02)
        while not all(f.done() for f in futures):
            cluster.reap()
            time.sleep(0.1)


# ---- references --------------------------------------------------------------------------------


def references(model: Path, outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """Each request run in-process (the engine the nodes run), in batches."""
    from node_agent.engine import Request, SamplingParams, load_engine

    engine = load_engine(model)
    refs: list[dict[str, Any]] = [{"text": "", "tokens": 0} for _ in outcomes]
    for first in range(0, len(outcomes), 8):
        batch = list(enumerate(outcomes))[first : first + 8]
        for i, out in batch:
            a = out.arrival
            params = SamplingParams(
                max_tokens=a.max_tokens,
                temperature=0.0 if a.seed is None else 0.9,
                top_p=1.0,
                seed=a.seed or 0,  # greedy: the seed plays no part
            )
            ids = engine.tokenizer.encode(out.prompt, add_special_tokens=True)
            engine.add(engine.validate(Request(f"r{i}", tuple(ids), params)))
        while engine.has_work():
            for event in engine.step():
                ref = refs[int(event.request_id[1:])]
                ref["text"] += event.text
                ref["tokens"] += event.token_id is not None
    return refs


# ---- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    alive = load_trace(args.trace, args.ticks, args.max_nodes)
    duration = len(alive) * args.tick_s
    arrivals = load_arrivals(args.arrivals, args.rate, duration, args.size)
    model = demo_model_dir(default_workdir(), args.size)
    tests = REPO / "tests"
    if not (tests / "cloud_metadata.py").exists():
        raise StokeError(f"the loopback metadata servers ({tests}/cloud_metadata.py) are needed")
    sys.path.insert(0, str(tests))
    import cloud_metadata as servers

    from node_agent.facts.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model)
    prompts = [_prompt(tokenizer, a.context) for a in arrivals]
    with tempfile.TemporaryDirectory(prefix="stoke-bench-faults-") as tmp:
        cluster = FaultCluster(Path(tmp), dict(os.environ), args.notice_s)
        try:
            cluster.start_controller()
            for _ in range(alive[0]):
                cluster.add_node(servers)
            spec = {"model": str(model), "autoscaling": {"min_instances": alive[0],
                                                         "keep_alive": 600}}  # fmt: skip
            cluster.admin("PUT", "/admin/functions/faults", spec)
            cluster.wait("instances on every node", lambda: _ready(cluster) >= alive[0])
            baseline = [Outcome(a, p) for a, p in zip(arrivals, prompts, strict=True)]
            print(f"baseline: {len(baseline)} requests, no faults", file=sys.stderr, flush=True)
            run_load(cluster, baseline)
            faulty = [Outcome(a, p) for a, p in zip(arrivals, prompts, strict=True)]
            print(
                f"faults: {len(alive)} ticks of {args.tick_s} s: {alive}",
                file=sys.stderr,
                flush=True,
            )

            def on_tick(i: int) -> None:
                if i == 0:
                    return
                change = alive[i] - alive[i - 1]
                for _ in range(max(0, -change)):
                    victims = cluster.alive()
                    if len(victims) <= 1:
                        break
                    cluster.preempt(victims[0])
                    cluster.note(f"t={i}: {victims[0].node_id} preempted ({victims[0].kind})")
                for _ in range(max(0, change)):
                    node = cluster.add_node(servers)
                    cluster.note(f"t={i}: {node.node_id} joined ({node.kind})")

            run_load(cluster, faulty, on_tick, args.tick_s, len(alive))
            migrations = cluster.admin("GET", "/admin/migrations")["migrations"]
        except BaseException:
            print(cluster.logs(), file=sys.stderr)
            raise
        finally:
            cluster.stop()
            if args.logs is not None:
                import shutil

                shutil.copytree(Path(tmp) / "logs", args.logs, dirs_exist_ok=True)
    refs = references(model, faulty)
    base_refs = references(model, baseline)
    result = _report(baseline, base_refs, faulty, refs, migrations, cluster.fleet, cluster.log)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print(result)
    return 0


def _ready(cluster: FaultCluster) -> int:
    return sum(i["state"] == "ready" for i in cluster.instances("faults"))


def _prompt(tokenizer: Any, n: int) -> str:
    words = " ".join(["the quick brown fox jumps over the lazy dog"] * (n // 8 + 2))
    ids = tokenizer.encode(words, add_special_tokens=False)[: max(n, 1)]
    return str(tokenizer.decode(ids))


def _counts(outcomes: list[Outcome], refs: list[dict[str, Any]]) -> dict[str, Any]:
    completed = [o for o in outcomes if o.finish is not None and o.error is None]
    failed = [o for o in outcomes if o.status is not None and o.status != 200]
    lost = [o for o in outcomes if o.status == 200 and (o.finish is None or o.error)]
    broken = [o for o in outcomes if o.status is None]
    differ = dup = skipped = 0
    for o, ref in zip(outcomes, refs, strict=True):
        if o not in completed:
            continue
        differ += o.text != ref["text"]
        dup += (o.completion_tokens or 0) > ref["tokens"]
        skipped += (o.completion_tokens or 0) < ref["tokens"]
    ttfts = sorted(o.ttft_s for o in completed if o.ttft_s is not None)
    return {
        "sent": len(outcomes),
        "completed": len(completed),
        "failed": len(failed),
        "lost": len(lost) + len(broken),
        "differ": differ,
        "duplicated": dup,
        "skipped": skipped,
        "equal_pct": round(100.0 * (len(completed) - differ) / max(len(completed), 1), 1),
        "ttft_p50_ms": round(1000 * _pct(ttfts, 0.5), 1),
        "ttft_p99_ms": round(1000 * _pct(ttfts, 0.99), 1),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


def _report(
    baseline: list[Outcome],
    base_refs: list[dict[str, Any]],
    faulty: list[Outcome],
    refs: list[dict[str, Any]],
    migrations: list[dict[str, Any]],
    fleet: list[Node],
    log: list[str],
) -> dict[str, Any]:
    deadlines = {n.node_id: n.deadline for n in fleet if n.deadline is not None}
    moved = [m for m in migrations if m["reason"] == "preemption"]
    handed_over = [m for m in moved if m["outcome"] in ("completed", "takeover")]
    on_time = [
        m for m in handed_over if m["from"] in deadlines and m["ended_unix"] <= deadlines[m["from"]]
    ]
    pauses = sorted(m["pause_s"] for m in moved if m.get("pause_s") is not None)
    return {
        "baseline": _counts(baseline, base_refs),
        "faults": _counts(faulty, refs),
        "preemptions": sum(1 for line in log if "preempted" in line),
        "joined": sum(1 for line in log if "joined" in line),
        "migrations": len(moved),
        "migrations_by_outcome": _by(moved, "outcome"),
        "migrations_handed_over": len(handed_over),
        "migrations_before_deadline": len(on_time),
        "pause_p50_ms": round(1000 * statistics.median(pauses), 1) if pauses else None,
        "pause_max_ms": round(1000 * max(pauses), 1) if pauses else None,
        "events": log,
    }


def _by(items: list[dict[str, Any]], key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item[key]] = out.get(item[key], 0) + 1
    return out


def _print(r: dict[str, Any]) -> None:
    print("\nstoke bench faults")
    for line in r["events"]:
        print(f"  {line}")
    keys = ("sent", "completed", "failed", "lost", "differ", "duplicated", "skipped",
            "equal_pct", "ttft_p50_ms", "ttft_p99_ms")  # fmt: skip
    print(f"{'':>10}" + "".join(f"{k:>12}" for k in keys))
    for name in ("baseline", "faults"):
        print(f"{name:>10}" + "".join(f"{r[name][k]:>12}" for k in keys))
    print(
        f"preemptions {r['preemptions']}, nodes joined {r['joined']}, preemption migrations "
        f"{r['migrations']} {r['migrations_by_outcome']}, handed over before their deadline "
        f"{r['migrations_before_deadline']} of {r['migrations_handed_over']}, pause p50 "
        f"{r['pause_p50_ms']} ms, max {r['pause_max_ms']} ms"
    )
    f = r["faults"]
    met = (
        f["lost"] == 0
        and f["duplicated"] == 0
        and f["skipped"] == 0
        and f["differ"] == 0
        and r["migrations_before_deadline"] == r["migrations_handed_over"]
    )
    print(f"target (0 lost, 0 duplicated/skipped, all equal, migrations on time): "
          f"{'met' if met else 'missed'}")  # fmt: skip
    for e in f["errors"]:
        print(f"  error: {e}")
