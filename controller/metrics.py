"""Prometheus metrics of one controller (its own registry, so tests can run several)."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

RECENT_TTFTS = 200
"""First tokens kept per function for the SLO check."""
RECENT_TTFT_WINDOW_S = 120.0
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
COLD_START_BUCKETS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
"""Seconds, 100 ms (a load from DRAM) to 120 s (a large model fetched from S3); the node
agents' `stoke_node_load_phase_seconds` uses the same (a test keeps them equal)."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._add_request_metrics()
        self._add_instance_metrics()
        self._add_migration_metrics()
        self._add_autoscaler_metrics()
        self.preemptions = Counter(
            "stoke_preemptions_total",
            "Preemption notices from nodes, by where they came from (aws, gcp, azure, sigterm) "
            "and their kind (preempt, maintenance, terminate; rebalance is advisory).",
            ["source", "kind"],
            registry=self.registry,
        )
        self.preemption_requests = Counter(
            "stoke_preemption_requests_total",
            "Requests a preempted node's drain moved, by how the move ended (a migration "
            "outcome, or refused: it could not begin).",
            ["outcome"],
            registry=self.registry,
        )
        self.nodes = Gauge(
            "stoke_nodes", "Nodes known, by liveness.", ["alive"], registry=self.registry
        )
        self._refresh: list[Callable[[], None]] = []
        self._recent_ttft: dict[str, collections.deque[tuple[float, float]]] = {}

    def _add_request_metrics(self) -> None:
        self.requests = Counter(
            "stoke_requests_total",
            "HTTP invocations by function, endpoint and status code.",
            ["function", "endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "stoke_ttft_seconds",
            "Time from request arrival to its first token.",
            ["function", "cold_start"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "stoke_generated_tokens_total",
            "Tokens streamed to clients.",
            ["function"],
            registry=self.registry,
        )
        self.queue = Gauge(
            "stoke_queue_length",
            "Requests waiting for capacity.",
            ["function"],
            registry=self.registry,
        )

    def _add_instance_metrics(self) -> None:
        self.load = Histogram(
            "stoke_instance_load_seconds",
            "Instance load time reported by the node (fetch + read + build), by where the node "
            "found the checkpoint.",
            ["function", "tier"],
            buckets=COLD_START_BUCKETS,
            registry=self.registry,
        )
        self.cold_starts = Counter(
            "stoke_cold_starts_total",
            "Instances started, by where their node found the checkpoint (its own report: dram, "
            "disk, remote, local or converted).",
            ["function", "tier"],
            registry=self.registry,
        )
        self.instances = Gauge(
            "stoke_instances",
            "Instances by function and state.",
            ["function", "state"],
            registry=self.registry,
        )

    def _add_migration_metrics(self) -> None:
        self.migrations = Counter(
            "stoke_migrations_total",
            "Live migrations of running requests, by why and how they ended (completed, "
            "takeover, aborted, finished, cancelled).",
            ["reason", "outcome"],
            registry=self.registry,
        )
        self.migration_pause = Histogram(
            "stoke_migration_pause_seconds",
            "Client-visible pause at a migration's hand-over: from the source's last token to "
            "the destination's first.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.migration_seconds = Histogram(
            "stoke_migration_seconds",
            "A completed migration's whole time, from its first round to the hand-over.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def _add_autoscaler_metrics(self) -> None:
        self.autoscaler_actions = Counter(
            "stoke_autoscaler_actions_total",
            "Node autoscaler actions, by kind (launch, launch_failed, retire) and pool.",
            ["action", "pool"],
            registry=self.registry,
        )
        self.autoscaler_nodes = Gauge(
            "stoke_autoscaler_nodes",
            "Nodes the autoscaler launched, by pool, market and phase (launching, ready, "
            "retiring, preempted).",
            ["pool", "market", "phase"],
            registry=self.registry,
        )
        self.spend_per_hour = Gauge(
            "stoke_spend_per_hour_usd",
            "What the autoscaler's running nodes cost per hour (USD).",
            registry=self.registry,
        )
        self.spend_total = Gauge(
            "stoke_spend_usd", "What the autoscaler's nodes have cost so far (USD).",
            registry=self.registry,
        )  # fmt: skip
        self.budget_per_hour = Gauge(
            "stoke_budget_per_hour_usd",
            "The policy's budget.max_per_hour (USD; absent without a budget).",
            registry=self.registry,
        )
        self.function_spend = Gauge(
            "stoke_function_spend_usd",
            "Spend so far attributed to each function by its share of the nodes' slots "
            "((idle) for unused slots).",
            ["function"],
            registry=self.registry,
        )

    def record_ttft(self, function: str, cold_start: str, seconds: float) -> None:
        """`stoke_ttft_seconds`, and the function's recent first tokens (the autoscaler
        compares their p99 with the function's `slo.ttft_p99`)."""
        self.ttft.labels(function, cold_start).observe(seconds)
        recent = self._recent_ttft.setdefault(function, collections.deque(maxlen=RECENT_TTFTS))
        recent.append((time.monotonic(), seconds))

    def recent_ttfts(self, function: str, window_s: float = RECENT_TTFT_WINDOW_S) -> list[float]:
        """The function's times to first token of the last `window_s` seconds."""
        since = time.monotonic() - window_s
        return [s for t, s in self._recent_ttft.get(function, ()) if t >= since]

    def on_scrape(self, refresh: Callable[[], None]) -> None:
        """Run `refresh` (which sets gauges) before each scrape."""
        self._refresh.append(refresh)

    def render(self) -> bytes:
        for refresh in self._refresh:
            refresh()
        return generate_latest(self.registry)
