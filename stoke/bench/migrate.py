"""stoke bench migrate: the client-visible pause of a live migration, against stop-and-resume.

On a local two-node cluster (one instance of a demo model on each node), for each context
length a streamed request runs on one node and is moved by `POST /admin/requests/{id}/migrate`
after a few tokens. Reported per context (prompt + generated tokens at the hand-over):

- the median inter-token gap the client saw (its decode speed);
- the live migration's pause at the hand-over (from the source's last token to the
  destination's first, as the controller measured it) as a multiple of that gap, its rounds
  and its whole time;
- stop-and-resume, the recovery stoke used before (the destination re-prefills the whole
  context, then decodes): the time to the first token of a `Generate` on the destination with
  the same context, measured in the same run, alternating with the live migrations.

Target: the live pause at most 2 median gaps at every context length (independent of
context), while stop-and-resume's grows with it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from stoke.bench.coldstart_cluster import START_TIMEOUT_S, BenchCluster, NodeSizing
from stoke.bench.common import default_workdir, demo_model_dir
from stoke.errors import StokeError

NODES = ("bench-a", "bench-b")
GENERATED = 200  # tokens generated in all (room for the rounds); the move starts after 8
MIGRATE_AFTER = 8


def register(benches: argparse._SubParsersAction) -> None:
    """Add `stoke bench migrate`."""
    parser = benches.add_parser(
        "migrate",
        help="live migration's pause vs stop-and-resume, by context length",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", choices=("tiny", "small"), default="small", help="demo model")
    parser.add_argument(
        "--contexts",
        default="128,512,1024,1800",
        help="prompt + generated tokens at the hand-over, comma-separated (the model's maximum "
        "is 2048, less the 200 generated)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="repeats per context (3)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.set_defaults(func=run)


class TwoNodes(BenchCluster):
    """The coldstart bench's cluster with two nodes (one instance slot each)."""

    def start(self, sizing: NodeSizing) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        controller = self._spawn(
            "controller",
            ["controller", "--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0",
             "--home", str(self.home / "controller"), "--heartbeat", "0.5",
             "--node-timeout", "30", "--migration-round-timeout", "300"],
        )  # fmt: skip
        grpc_address = controller.wait_line("grpc listening on", deadline)
        self.url = "http://" + controller.wait_line("http listening on", deadline)
        self.addresses: dict[str, str] = {}
        for node_id in NODES:
            node = self._spawn(
                node_id,
                ["node", "--controller", grpc_address, "--listen", "127.0.0.1:0",
                 "--home", str(self.home / node_id), "--node-id", node_id,
                 "--dram-dir", str(self.dram_dir / node_id), "--cpu-memory", sizing.cpu_memory,
                 "--dram-cache", sizing.dram_cache, "--disk-cache", sizing.disk_cache,
                 "--slots", "1", "--heartbeat", "0.5", "--threads", str(sizing.threads)],
            )  # fmt: skip
            self.addresses[node_id] = node.wait_line("listening on", deadline)
        import httpx2 as httpx

        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(600.0))
        self.wait("both nodes", lambda: sum(n["alive"] for n in self.nodes()) == 2)

    def use_node(self, node_id: str) -> None:
        """Point the direct gRPC calls at `node_id`."""
        self.node_address = self.addresses[node_id]
        self._open_node_channel()


def run(args: argparse.Namespace) -> int:
    contexts = [int(c) for c in args.contexts.split(",")]
    most = 2048 - GENERATED + MIGRATE_AFTER  # the prompt and every generated token must fit
    if any(c <= MIGRATE_AFTER or c > most for c in contexts):
        raise StokeError(f"--contexts: each must be in ({MIGRATE_AFTER}, {most}]")
    model = demo_model_dir(default_workdir(), args.size)
    from node_agent.facts.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model)
    with tempfile.TemporaryDirectory(prefix="stoke-bench-migrate-") as tmp:
        cluster = TwoNodes(Path(tmp), dict(os.environ))
        threads = max(1, (os.cpu_count() or 2) // 2)
        try:
            cluster.start(NodeSizing("8GiB", "2GiB", "4GiB", 1, threads))
            rows = _measure(cluster, model, tokenizer, contexts, args.rounds)
        except BaseException:
            print(cluster.logs())
            raise
        finally:
            cluster.stop()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table(rows, args.size)
    return 0


def _measure(
    cluster: TwoNodes, model: Path, tokenizer: Any, contexts: list[int], rounds: int
) -> list[dict[str, Any]]:
    spec = {"model": str(model), "autoscaling": {"min_instances": 2, "keep_alive": 3600}}
    cluster.admin("PUT", "/admin/functions/bench", spec)

    def ready() -> bool:
        nodes = {i["node"] for i in cluster.instances("bench") if i["state"] == "ready"}
        return nodes == set(NODES)

    cluster.wait("an instance on each node", ready)
    rows = []
    for context in contexts:
        prompt_ids = _prompt(tokenizer, context - MIGRATE_AFTER)
        live: list[dict[str, Any]] = []
        resume: list[float] = []
        for _ in range(rounds):
            live.append(_live(cluster, tokenizer.decode(prompt_ids)))
            resume.append(_stop_and_resume(cluster, live[-1]["to"], prompt_ids))
        gap = statistics.median(r["gap_s"] for r in live)
        pause = statistics.median(r["pause_s"] for r in live)
        resume_s = statistics.median(resume)
        rows.append(
            {
                "context": context,
                "median_gap_ms": round(gap * 1000, 2),
                "live_pause_ms": round(pause * 1000, 2),
                "live_pause_gaps": round(pause / gap, 2),
                "live_rounds": statistics.median(r["rounds"] for r in live),
                "live_migration_s": round(statistics.median(r["duration_s"] for r in live), 3),
                "resume_pause_ms": round(resume_s * 1000, 2),
                "resume_pause_gaps": round(resume_s / gap, 2),
                "runs": len(live),
            }
        )
        print(f"context {context}: {rows[-1]}", flush=True)
    return rows


def _prompt(tokenizer: Any, n: int) -> list[int]:
    """`n` token ids that decode to text which encodes back to the same ids."""
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * (n // 4 + 8))
    ids = tokenizer.encode(text, add_special_tokens=False)[:n]
    for _ in range(4):
        again = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)[:n]
        if again == ids:
            break
        ids = again
    return list(ids)


def _live(cluster: TwoNodes, prompt: str) -> dict[str, Any]:
    """One streamed request moved after MIGRATE_AFTER tokens: the client's gaps and the
    controller's report."""
    body = {
        "model": "bench", "prompt": prompt, "max_tokens": GENERATED, "temperature": 0,
        "stream": True, "stop": None,
    }  # fmt: skip
    times: list[float] = []
    report: dict[str, Any] = {}
    mover: threading.Thread | None = None
    assert cluster._http is not None
    headers = {"authorization": f"Bearer {cluster.invoke_key}"}
    with cluster._http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            raise StokeError(f"the request failed: HTTP {response.status_code}: {response.text}")
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            times.append(time.perf_counter())
            if len(times) == MIGRATE_AFTER:

                def migrate() -> None:
                    report.update(cluster.admin("POST", f"/admin/requests/{request_id}/migrate"))

                mover = threading.Thread(target=migrate, daemon=True)
                mover.start()
    if mover is not None:
        mover.join(600)
    if report.get("outcome") != "completed":
        raise StokeError(f"the migration did not complete: {report}")
    recorded = cluster.admin("GET", "/admin/migrations")["migrations"]
    (done,) = [m for m in recorded if m["request_id"] == request_id]
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]  # from the second token on
    return {**done, "gap_s": statistics.median(gaps)}


def _stop_and_resume(cluster: TwoNodes, node_id: str, prompt_ids: list[int]) -> float:
    """Seconds to the first token when the destination re-prefills the whole context
    (prompt + the tokens generated before the move), as a resume does."""
    from node_agent.proto import node_agent_pb2 as pb

    (inst,) = [i for i in cluster.instances("bench") if i["node"] == node_id]
    cluster.use_node(node_id)
    request = pb.GenerateRequest(
        instance_id=inst["instance_id"],
        request_id=f"bench-{uuid.uuid4().hex}",
        prompt_ids=prompt_ids,
        output_ids=prompt_ids[:MIGRATE_AFTER],
        params=pb.SamplingParams(max_tokens=MIGRATE_AFTER + 2, temperature=0.0, top_p=1.0),
    )
    start = time.perf_counter()
    for event in cluster._call("Generate", request, timeout=600):
        if event.has_token:
            return time.perf_counter() - start
    raise StokeError("the resumed Generate produced no token")


def _print_table(rows: list[dict[str, Any]], size: str) -> None:
    print(f"\nstoke bench migrate --size {size}: client-visible pause at the hand-over")
    print(
        f"{'context':>8} {'gap ms':>8} {'live pause ms':>14} {'(gaps)':>7} {'rounds':>7} "
        f"{'migration s':>12} {'resume pause ms':>16} {'(gaps)':>7}"
    )
    for r in rows:
        print(
            f"{r['context']:>8} {r['median_gap_ms']:>8.1f} {r['live_pause_ms']:>14.1f} "
            f"{r['live_pause_gaps']:>7.2f} {r['live_rounds']:>7} {r['live_migration_s']:>12.3f} "
            f"{r['resume_pause_ms']:>16.1f} {r['resume_pause_gaps']:>7.2f}"
        )
    met = all(r["live_pause_gaps"] <= 2.0 for r in rows)
    print(f"target (live pause <= 2 median gaps at every context): {'met' if met else 'missed'}")
