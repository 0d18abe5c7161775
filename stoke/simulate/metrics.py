"""What one simulated run measured, and its summary (the columns `stoke simulate` prints)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(samples: Sequence[float], p: float) -> float:
    """The p-th percentile by nearest rank (NaN for no samples)."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class Sample:
    """The cluster at one moment (one a minute), for the plot."""

    t: float
    nodes: dict[str, int]
    per_hour: float
    spent: float


@dataclass
class Counters:
    arrived: int = 0
    """Every request, the warm-up's too (what `lost` is counted against)."""
    completed: int = 0
    measured: int = 0
    """Requests that arrived after the warm-up: the TTFTs and SLO attainment are theirs."""
    slo_met: int = 0
    refused: int = 0
    """Requests the placement policy refused at least once (no node had room); they waited."""
    migrations: int = 0
    """Requests moved off a node before it went (retirement, preemption notice, scale-in)."""
    resumed: int = 0
    """Requests still on a preempted node at its deadline, resumed elsewhere from their tokens."""
    preemptions: int = 0
    preempted_requests: int = 0
    """Requests on a node when its preemption notice came (moved at once, left to finish
    there, or resumed at the deadline)."""
    launches: dict[str, int] = field(default_factory=dict)
    launch_refusals: int = 0
    """Spot launches the traces refused for capacity."""
    cold_starts: dict[str, int] = field(default_factory=dict)
    instance_s: float = 0.0
    idle_instance_s: float = 0.0
    """Instance-seconds loaded and serving nothing: what keep-alive spends memory on."""


@dataclass
class RunResult:
    label: str
    hours: float
    ttfts: list[float]
    counters: Counters
    cost_total: float
    node_hours: dict[str, float]
    cost_by_pool: dict[str, float]
    timeline: list[Sample]
    notes: list[str]

    @property
    def lost(self) -> int:
        return self.counters.arrived - self.counters.completed

    def summary(self) -> dict[str, Any]:
        c = self.counters
        return {
            "policy": self.label,
            "hours": round(self.hours, 3),
            "cost_total_usd": round(self.cost_total, 2),
            "cost_per_hour_usd": round(self.cost_total / self.hours, 2) if self.hours else 0.0,
            "ttft_p50_s": round(percentile(self.ttfts, 50), 3),
            "ttft_p95_s": round(percentile(self.ttfts, 95), 3),
            "ttft_p99_s": round(percentile(self.ttfts, 99), 3),
            "slo_attainment": round(c.slo_met / len(self.ttfts), 4) if self.ttfts else 0.0,
            "requests": c.measured,
            "completed": c.completed,
            "lost": self.lost,
            "cold_starts": {str(k): v for k, v in sorted(c.cold_starts.items())},
            "cold_starts_total": sum(c.cold_starts.values()),
            "idle_instance_hours": round(c.idle_instance_s / 3600, 2),
            "instance_hours": round(c.instance_s / 3600, 2),
            "migrations": c.migrations,
            "resumed": c.resumed,
            "preemptions": c.preemptions,
            "preempted_requests": c.preempted_requests,
            "spot_launches_refused": c.launch_refusals,
            "waited_for_room": c.refused,
            "launches": dict(sorted(c.launches.items())),
            "node_hours": {k: round(v, 2) for k, v in sorted(self.node_hours.items())},
            "notes": self.notes,
        }
