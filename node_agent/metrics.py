"""A node agent's own Prometheus metrics, served over plain HTTP by `stoke node --metrics-listen`.

Two kinds: what happens at a load (`observe_load`: each phase's time and where the checkpoint
was found, counted as it happens so no load between two scrapes is missed), and the node's state
now, read from the same `NodeStatus` snapshot the heartbeat sends (tiers, fetch bandwidths,
instances, slots, draining, a preemption notice) at each scrape. Labels never carry checkpoint
sources or instance ids, so the series stay few whatever the node runs.

The endpoint has no key, like most exporters: bind it where only Prometheus reaches it (a pod
IP behind a NetworkPolicy, as deploy/k8s does). It runs on the agent's event loop, so a scrape
reads the agent's state without racing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node_agent.proto import node_agent_pb2 as pb

log = logging.getLogger(__name__)

COLD_START_BUCKETS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
"""Seconds, 100 ms to 120 s: a load from DRAM to a large model fetched from S3. The controller's
`stoke_instance_load_seconds` uses the same (a test keeps them equal)."""

LOAD_PHASES = ("queue", "fetch", "read_build", "streamed", "total")
"""`LoadTimings` fields, without their `_s`."""

_HEAD_LIMIT = 8192
_READ_TIMEOUT_S = 5.0


class NodeMetrics:
    """The registry behind a node's `/metrics`. `observe_load` is called by the gRPC service;
    `watch(status)` gives the snapshot read at each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.load_phases = Histogram(
            "stoke_node_load_phase_seconds",
            "Instance loads on this node, by phase (queue: waiting for a worker; fetch: bringing "
            "the checkpoint into its tier; read_build: the worker reading weights and building "
            "the model; streamed: how long weights kept arriving after the instance took "
            "requests; total) and by where the checkpoint was found.",
            ["phase", "tier"],
            buckets=COLD_START_BUCKETS,
            registry=self.registry,
        )
        self.loads = Counter(
            "stoke_node_loads_total",
            "Instance loads, by where the store found the checkpoint (dram, disk: tier hits; "
            "remote, local, converted: misses). The DRAM hit rate is dram / all.",
            ["tier"],
            registry=self.registry,
        )
        self.loaded_bytes = Counter(
            "stoke_node_loaded_bytes_total",
            "Weight bytes of the instances loaded, by where the checkpoint was found.",
            ["tier"],
            registry=self.registry,
        )
        self._state = _StateCollector()
        self.registry.register(self._state)

    def watch(self, status: Callable[[], pb.NodeStatus]) -> None:
        """Read the node's state from `status()` at each scrape."""
        self._state.status = status

    def observe_load(self, reply: pb.LoadInstanceReply) -> None:
        """Count one finished load and time its phases."""
        tier = reply.loaded_from or "unknown"
        self.loads.labels(tier).inc()
        self.loaded_bytes.labels(tier).inc(reply.weight_bytes)
        for phase in LOAD_PHASES:
            seconds = getattr(reply.timings, f"{phase}_s")
            if phase != "streamed" or seconds > 0:  # only streamed loads have a streamed phase
                self.load_phases.labels(phase, tier).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges from a fresh `NodeStatus` at each scrape (none until `status` is set)."""

    def __init__(self) -> None:
        self.status: Callable[[], pb.NodeStatus] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.status is None:
            return
        now = self.status()
        yield from _tier_metrics(now)
        yield from _instance_metrics(now)
        yield from _preemption_metrics(now)


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _tier_metrics(now: pb.NodeStatus) -> Iterator[Metric]:
    used = _gauge("stoke_node_tier_bytes", "Checkpoint bytes held in each tier.", ["tier"])
    budget = _gauge("stoke_node_tier_budget_bytes", "Each tier's byte budget.", ["tier"])
    held = _gauge("stoke_node_tier_checkpoints", "Checkpoints held in each tier.", ["tier"])
    arena = _gauge(
        "stoke_node_arena_bytes",
        "Memory a tier holds as its arena (allocated at start, used or not).",
        ["tier"],
    )
    arena_free = _gauge("stoke_node_arena_free_bytes", "Unallocated bytes of the arena.", ["tier"])
    for tier in now.tiers:
        used.add_metric([tier.tier], sum(h.bytes for h in tier.holdings))
        budget.add_metric([tier.tier], tier.budget_bytes)
        held.add_metric([tier.tier], len(tier.holdings))
        if tier.HasField("arena"):
            arena.add_metric([tier.tier], tier.arena.size_bytes)
            arena_free.add_metric([tier.tier], tier.arena.free_bytes)
    bandwidth = _gauge(
        "stoke_node_fetch_bandwidth_bytes_per_second",
        "Measured read bandwidth out of each place a checkpoint comes from (dram, disk, remote; "
        "a moving average; absent until measured).",
        ["origin"],
    )
    for b in now.bandwidths:
        bandwidth.add_metric([b.tier], b.bytes_per_s)
    yield from (used, budget, held, arena, arena_free, bandwidth)


def _instance_metrics(now: pb.NodeStatus) -> Iterator[Metric]:
    states = _gauge("stoke_node_instances", "Model instances on this node, by state.", ["state"])
    counts = dict.fromkeys(("loading", "ready", "stopping"), 0)
    for inst in now.instances:
        name = pb.InstanceState.Name(inst.state).removeprefix("INSTANCE_STATE_").lower()
        counts[name] = counts.get(name, 0) + 1
    for state, n in counts.items():
        states.add_metric([state], n)
    cpu = now.devices.cpu
    yield states
    yield GaugeMetricFamily(
        "stoke_node_running_requests",
        "Requests running on this node's instances.",
        value=sum(i.running_requests for i in now.instances),
    )
    yield GaugeMetricFamily("stoke_node_slots", "Instances this node may run.", cpu.slots_total)
    yield GaugeMetricFamily("stoke_node_slots_used", "Instance slots in use.", cpu.slots_used)
    yield GaugeMetricFamily(
        "stoke_node_memory_budget_bytes", "Memory for instances.", cpu.memory_budget_bytes
    )
    yield GaugeMetricFamily(
        "stoke_node_memory_reserved_bytes",
        "Memory reserved by instances (weights + KV cache).",
        cpu.memory_reserved_bytes,
    )
    yield GaugeMetricFamily(
        "stoke_node_idle_workers", "Pre-started worker processes waiting.", now.idle_workers
    )
    gpu_free = _gauge("stoke_node_gpu_free_bytes", "Free memory of each GPU.", ["gpu"])
    gpu_total = _gauge("stoke_node_gpu_total_bytes", "Memory of each GPU.", ["gpu"])
    for gpu in now.devices.gpus:
        gpu_free.add_metric([str(gpu.index)], gpu.free_bytes)
        gpu_total.add_metric([str(gpu.index)], gpu.total_bytes)
    yield from (gpu_free, gpu_total)


def _preemption_metrics(now: pb.NodeStatus) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "stoke_node_draining", "1 while the node takes no new work.", float(now.draining)
    )
    notice = _gauge(
        "stoke_node_preemption_notice",
        "1 once a preemption notice arrived, labelled with where from and its kind.",
        ["source", "kind"],
    )
    deadline = _gauge(
        "stoke_node_preemption_deadline_timestamp_seconds",
        "When a preempted node goes (unix seconds; absent without a notice or a deadline).",
    )
    drained = _gauge(
        "stoke_node_preemption_drained", "1 once a preempted node runs nothing any more."
    )
    if now.HasField("preemption"):
        notice.add_metric([now.preemption.source, now.preemption.kind], 1)
        if now.preemption.deadline_unix:
            deadline.add_metric([], now.preemption.deadline_unix)
        drained.add_metric([], float(now.preemption.drained))
    yield from (notice, deadline, drained)


async def start_http(metrics: NodeMetrics, listen: str) -> tuple[asyncio.Server, str]:
    """Serve `GET /metrics` on `listen` (HOST:PORT; port 0 picks one); the server and the
    address it listens on. `OSError` if the address cannot be bound."""
    host, _, port = listen.rpartition(":")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            writer.write(_answer(metrics, head))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # a client that sent no whole request head gets nothing
        except ConnectionError:
            pass  # it left
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host.strip("[]"), int(port), limit=_HEAD_LIMIT)
    bound = server.sockets[0].getsockname()
    return server, f"{host}:{bound[1]}"


def _answer(metrics: NodeMetrics, head: bytes) -> bytes:
    method, path, *_ = [*head.split(b"\r\n", 1)[0].split(b" "), b"", b""]
    if method not in (b"GET", b"HEAD"):
        return _response(405, "text/plain", b"only GET /metrics\n")
    if path.split(b"?", 1)[0] != b"/metrics":
        return _response(404, "text/plain", b"not found: this server has only /metrics\n")
    body = metrics.render()
    return _response(200, "text/plain; version=0.0.4; charset=utf-8", body, method == b"HEAD")


def _response(status: int, kind: str, body: bytes, head_only: bool = False) -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body
