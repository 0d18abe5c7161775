"""The real half of `stoke simulate-check`: a local cluster started as a user starts one
(`stoke up --autoscale POLICY`, node agents launched by the local provider), this machine's
speeds measured on it, and a trace slice replayed against its OpenAI API open-loop.

Each request is a streamed `completions` call from the official `openai` client, sent at its
arrival time on a thread of its own whatever the others are doing (open loop: a slow cluster
gets the same arrivals as a fast one). Its prompt is `context_tokens` token ids and it produces
exactly `generated_tokens` (`max_tokens`, `ignore_eos`), so the token counts the simulator is
given are the ones served. What the cluster did comes from the response headers
(`x-stoke-cold-start`, `x-stoke-tier`, `x-stoke-instance`) and, for instance counts, from the
admin API (`/admin/functions`) polled every `SAMPLE_S`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai

from node_agent.facts.tiers import Origin
from stoke.errors import StokeError
from stoke.simulate.workload import Arrival

START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0
SAMPLE_S = 0.1
"""How often the instance counts are read from the admin API."""
FIRST_TOKEN_ID = 5
"""Prompts are token ids FIRST_TOKEN_ID, FIRST_TOKEN_ID + 1, ... (past the special tokens)."""
TIER_OF_HEADER: dict[str, str] = {
    Origin.DRAM: Origin.DRAM,
    Origin.DISK: Origin.DISK,
    Origin.REMOTE: Origin.REMOTE,
    Origin.LOCAL: Origin.REMOTE,
    Origin.CONVERTED: Origin.REMOTE,
}
"""`x-stoke-tier` as the placement policy (and so the simulator) names the tier: a checkpoint
no tier of the node holds comes from its source, whether downloaded, copied or converted."""

Say = Callable[[str], None]


@dataclass
class Served:
    """What the real cluster did with one request of the slice."""

    arrival: Arrival
    ttft_s: float | None = None
    total_s: float | None = None
    cold: bool = False
    tier: str = ""
    instance: str = ""
    tokens: int = 0
    error: str | None = None


@dataclass
class RealRun:
    served: list[Served]
    samples: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since the first arrival, instances of the slice's functions, loading or ready)."""


class LocalCluster:
    """`stoke up --autoscale POLICY` in a process of its own, and its admin API. Its log (the
    controller's and `stoke up`'s messages) goes to `work/up.log`."""

    def __init__(self, policy: Path, work: Path) -> None:
        self.key = "sk-check-" + secrets.token_urlsafe(16)
        self.log_path = work / "up.log"
        argv = [sys.executable, "-m", "stoke.cli", "up", "--autoscale", str(policy),
                "--home", str(work / "home"), "--port", "0", "--api-key", self.key]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in ("STOKE_URL", "STOKE_API_KEY", "STOKE_HOME"):
            env.pop(name, None)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env
            )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self._wait_url()
        self.admin = httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {self.key}"}, timeout=60
        )
        self.client = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, timeout=REQUEST_TIMEOUT_S
        )

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))

    def _wait_url(self) -> str:
        """`stoke up` prints `controller at URL ...` once its policy's min_nodes registered."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    self.stop()
                    raise StokeError(
                        f"`stoke up` exited with status {self.proc.returncode} while starting; "
                        f"see {self.log_path}"
                    ) from None
                continue
            if line.startswith("stoke up: controller at "):
                return line.removeprefix("stoke up: controller at ").split()[0]
        self.stop()
        raise StokeError(f"`stoke up` was not serving after {START_TIMEOUT_S:.0f} s; see "
                         f"{self.log_path}")  # fmt: skip

    def stop(self) -> None:
        """SIGTERM: `stoke up` stops the controller, which stops the nodes it launched."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def deploy(self, name: str, model: Path, autoscaling: dict[str, Any]) -> dict[str, Any]:
        r = self.admin.put(
            f"/admin/functions/{name}", json={"model": str(model), "autoscaling": autoscaling}
        )
        if r.status_code not in (200, 201):
            raise StokeError(f"deploying {name}: {r.status_code} {r.text}")
        return dict(r.json())

    def delete(self, name: str) -> None:
        self.admin.delete(f"/admin/functions/{name}").raise_for_status()

    def instances(self, names: set[str] | None = None) -> int:
        """Instances (loading or ready) of `names` (None: of every function)."""
        functions = self.admin.get("/admin/functions").json()["functions"]
        return sum(len(f["instances"]) for f in functions if names is None or f["name"] in names)

    def workers_ready(self, prestart: int) -> bool:
        """Whether every node has heartbeated since its last instance start and holds
        `prestart` pre-started workers again (a cold start takes one; a new one takes a
        second or two of CPU to start)."""
        for node in self.admin.get("/admin/nodes").json()["nodes"]:
            reported = {i["instance_id"] for i in node["reported_instances"]}
            listed = {i["instance_id"] for i in node["instances"]}
            if not listed <= reported or node["idle_workers"] < prestart:
                return False
        return True

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise StokeError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)

    def send(self, served: Served) -> None:
        """One streamed request; fills in `served` (its error instead, if it failed)."""
        a = served.arrival
        prompt = [FIRST_TOKEN_ID + k % 500 for k in range(a.context_tokens)]
        started = time.monotonic()
        try:
            raw = self.client.completions.with_raw_response.create(
                model=a.function, prompt=prompt, max_tokens=a.generated_tokens, stream=True,
                temperature=0.0, extra_body={"ignore_eos": True},
            )  # fmt: skip
            headers = raw.headers
            served.cold = headers.get("x-stoke-cold-start") == "true"
            served.tier = TIER_OF_HEADER.get(headers.get("x-stoke-tier", ""), "")
            served.instance = headers.get("x-stoke-instance", "")
            for chunk in raw.parse():
                if any(c.text for c in chunk.choices):
                    if served.ttft_s is None:
                        served.ttft_s = time.monotonic() - started
                    served.tokens += 1
            served.total_s = time.monotonic() - started
        except Exception as exc:  # on a thread of its own: kept, and the replay reports it
            served.error = f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def local_cluster(policy: Path, work: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(policy, work)
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass(frozen=True, slots=True)
class Speeds:
    """This machine's speeds, measured on the running cluster before the replay."""

    load_s: dict[str, float]
    """What a cold start adds to a request's first token, per tier it loads from."""
    first_token_overhead_s: float
    """A warm request's first token, less its prefill: HTTP, routing, tokenizing, one step."""
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    checkpoint_bytes: int
    memory_bytes: int
    """What one instance reserves on a node (the controller's figure)."""

    def describe(self) -> str:
        loads = ", ".join(f"{t} {s * 1000:.0f} ms" for t, s in sorted(self.load_s.items()))
        return (
            f"cold start {loads}; first token {self.first_token_overhead_s * 1000:.1f} ms + "
            f"prefill {self.prefill_tokens_per_s:,.0f} tokens/s; decode "
            f"{self.decode_tokens_per_s:,.0f} tokens/s"
        )


def calibrate(
    cluster: LocalCluster, model: Path, work: Path, max_context: int, prestart: int, say: Say
) -> Speeds:
    """Measure the speeds the simulator needs, on functions of their own (deleted after):

    - a first cold start, not counted: it pays the node's one-time warm-ups;
    - warm first tokens at contexts up to `max_context`: a least-squares line gives the
      per-request overhead (intercept) and the prefill rate (slope);
    - decode: the time between the first and the last token of 64-token requests;
    - a cold start from the source (a checkpoint no tier holds) and from DRAM (a second
      function of a model already loaded): each is the cold request's first token less the
      warm line's prediction for it, each started with the node's pre-started workers all
      there (`prestart`), as the replay starts. The disk tier is not measured (the slice never
      reaches it: the DRAM tier holds every checkpoint); the simulator is given the source's
      figure for it.
    """
    copies = []
    for name in ("calibrate-a", "calibrate-b"):
        shutil.copytree(model, work / name, dirs_exist_ok=True)
        copies.append(work / name)
    scaling = {"target_concurrency": 1, "max_instances": 1, "keep_alive": "10m"}
    names = ["calibrate-warmup", "calibrate-source", "calibrate-dram"]
    record = cluster.deploy(names[0], copies[0], scaling)
    ask = _Asker(cluster)
    ask(names[0], 8, 2)  # the node's first load: warm-ups included, not measured
    contexts = sorted({8, max(8, max_context // 4), max(8, max_context // 2), max(8, max_context)})
    warm = [(c, ask(names[0], c, 1).ttft_s or 0.0) for c in contexts for _ in range(3)]
    overhead, per_token = _line(warm)
    decode = []
    for _ in range(3):
        r = ask(names[0], 8, 64)
        if r.ttft_s is None or r.total_s is None:
            raise StokeError(f"calibration: a request to {names[0]} streamed no token")
        decode.append((r.total_s - r.ttft_s) / 63)  # ignore_eos: all 64 tokens came
    loads: dict[str, float] = {}
    cluster.deploy(names[1], copies[1], scaling)
    cluster.deploy(names[2], copies[0], scaling)  # the warm-up's model: in DRAM now
    for name in names[1:]:
        cluster.wait_for("the node's pre-started workers", lambda: cluster.workers_ready(prestart))
        r = ask(name, 8, 1)
        if not r.cold or r.ttft_s is None:
            raise StokeError(f"calibration: {name}'s first request was not a cold start")
        loads[r.tier] = max(0.0, r.ttft_s - (overhead + 8 * per_token))
    loads.setdefault(Origin.DISK, loads.get(Origin.REMOTE, 0.0))
    for name in names:
        cluster.delete(name)
    cluster.wait_for("the calibration's instances to stop", lambda: cluster.instances() == 0)
    cluster.wait_for("the node's pre-started workers", lambda: cluster.workers_ready(prestart))
    speeds = Speeds(
        load_s=loads,
        first_token_overhead_s=overhead,
        prefill_tokens_per_s=1.0 / per_token,
        decode_tokens_per_s=1.0 / statistics.median(decode),
        checkpoint_bytes=int(record["checkpoint_bytes"]),
        memory_bytes=int(record["memory_bytes"]),
    )
    say(f"measured: {speeds.describe()}")
    return speeds


class _Asker:
    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster, self.serial = cluster, 0

    def __call__(self, function: str, context: int, generated: int) -> Served:
        self.serial += 1
        served = Served(Arrival(-self.serial, 0.0, function, context, generated))
        self.cluster.send(served)
        if served.error is not None:
            raise StokeError(f"calibration request to {function} failed: {served.error}")
        return served


def _line(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of first-token time over context tokens; a slope that
    noise made 0 or less is taken as 1 µs a token (prefill too fast to see)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    slope = max(slope, 1e-6)
    return max(0.0, my - slope * mx), slope


def replay(cluster: LocalCluster, arrivals: Sequence[Arrival], say: Say) -> RealRun:
    """Send every arrival at its time (open loop) and sample the instance counts meanwhile."""
    names = {a.function for a in arrivals}
    run = RealRun([Served(a) for a in arrivals])
    done = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(httpx.HTTPError):
                run.samples.append((time.monotonic() - t0, cluster.instances(names)))
            done.wait(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = []
    span = arrivals[-1].at if arrivals else 0.0
    next_note = 10.0
    for served in run.served:
        delay = t0 + served.arrival.at - time.monotonic()
        if delay > 0:
            done.wait(delay)  # the trace's own schedule: the workload, not a synchronisation
        if served.arrival.at >= next_note:
            say(f"replay: {served.arrival.at:.0f} of {span:.0f} s")
            next_note += 10.0
        thread = threading.Thread(target=cluster.send, args=(served,), daemon=True)
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    done.set()
    sampler.join()
    late = sum(t.is_alive() for t in threads)
    failed = [s for s in run.served if s.error is not None]
    if late or failed:
        first = failed[0].error if failed else "no answer in time"
        raise StokeError(
            f"the real cluster failed {len(failed) + late} of {len(arrivals)} requests "
            f"(first: {first}); see {cluster.log_path}"
        )
    return run
