"""Spot capacity from real traces: which launches a zone refuses and which nodes it takes back.

Every zone of every spot pool is given one trace (zone j of a pool the j-th `--spot-trace`,
round-robin when there are fewer traces than zones). A trace's count, as a fraction of its peak,
is the fraction of the pool's `max_nodes` the zone can hold then: a launch beyond it is refused
for capacity (the autoscaler marks the zone short, `record_launch_failure`). With `scale` (the
CLI's `--spot-scale`) the count times `scale` is the capacity instead: `--spot-scale 1` reads an
availability trace literally (how many p3.2xlarge the zone had to give). A drop from n to m
takes each of our nodes in the zone with probability (n - m) / n (a preemption with a notice),
and more if we still hold more than the zone's capacity. Without traces spot never runs short.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from autoscaler.policy import Market, PricedPolicy
from stoke.simulate.traces import SpotTrace


@dataclass(frozen=True, slots=True)
class ZoneTrace:
    pool: str
    zone: str
    trace: SpotTrace
    max_nodes: int
    scale: float | None = None

    def capacity(self, t: float) -> int:
        """Nodes of the pool this zone can hold at trace time `t`."""
        if self.scale is not None:
            return math.ceil(self.trace.at(t) * self.scale)
        return math.ceil(self.trace.at(t) / self.trace.peak * self.max_nodes)


class SpotMarket:
    """The spot zones of a policy, each following its trace from `start_s` on."""

    def __init__(
        self,
        policy: PricedPolicy,
        traces: Sequence[SpotTrace],
        start_s: float,
        seed: int,
        scale: float | None = None,
    ) -> None:
        self.start_s = start_s
        self.rng = random.Random(seed)
        self.zones: dict[tuple[str, str], ZoneTrace] = {}
        if not traces:
            return
        for pool in policy.policy.pools:
            if pool.market is not Market.SPOT:
                continue
            for j, zone in enumerate(pool.zones):
                trace = traces[j % len(traces)]
                self.zones[(pool.name, zone)] = ZoneTrace(
                    pool.name, zone, trace, pool.max_nodes, scale
                )

    def describe(self) -> list[str]:
        return [f"{p}/{z} <- {zt.trace.name}" for (p, z), zt in sorted(self.zones.items())]

    def has_room(self, pool: str, zone: str, ours: int, now: float) -> bool:
        """Whether a launch in `pool`/`zone` is granted with `ours` nodes there already."""
        zt = self.zones.get((pool, zone))
        return zt is None or ours < zt.capacity(self.start_s + now)

    def tick_times(self, horizon_s: float) -> list[float]:
        """Sim times at which some zone's trace moves to its next tick, up to `horizon_s`."""
        times: set[float] = set()
        for zt in self.zones.values():
            gap = zt.trace.gap_s
            first = math.ceil(self.start_s / gap) * gap - self.start_s
            k = 0
            while first + k * gap <= horizon_s:
                if first + k * gap > 0:
                    times.add(first + k * gap)
                k += 1
        return sorted(times)

    def takes(self, pool: str, zone: str, ours: Sequence[str], now: float) -> list[str]:
        """Which of `ours` (node ids, oldest first) the zone takes back at sim time `now`."""
        zt = self.zones.get((pool, zone))
        if zt is None or not ours:
            return []
        t = self.start_s + now
        before, after = zt.trace.at(t - zt.trace.gap_s), zt.trace.at(t)
        taken = []
        if after < before:
            taken = [n for n in ours if self.rng.random() < (before - after) / before]
        left = [n for n in ours if n not in taken]
        excess = len(left) - zt.capacity(t)
        if excess > 0:
            taken += left[:excess]
        return taken
