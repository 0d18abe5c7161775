"""How many instance slots a function needs now (pure): what `decide` is given as demand.

Per function: its running plus queued requests over `target_concurrency`, or the instances it
has (kept alive: a node is not retired from under a warm instance; keep-alive decides when
those stop), whichever is more; at least `min_instances`, at most `max_instances`; one more
while it has load and its recent TTFT p99 misses `slo.ttft_p99` (queueing or slow cold starts:
more room helps both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SLO_MIN_SAMPLES = 5
"""Recent first tokens needed before the p99 is compared with the SLO."""


@dataclass(frozen=True, slots=True)
class FunctionLoad:
    name: str
    running: int
    queued: int
    min_instances: int
    max_instances: int
    target_concurrency: int
    slo_ttft_p99_s: float | None = None
    recent_ttfts: Sequence[float] = ()
    instances: int = 0
    """Its instances now (loading or ready, not stopping)."""


def p99(samples: Sequence[float]) -> float:
    """The 99th percentile (nearest rank)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def slots_needed(fn: FunctionLoad) -> tuple[int, str]:
    """(slots, why) for one function."""
    load = fn.running + fn.queued
    count = math.ceil(load / max(1, fn.target_concurrency))
    why = f"{load} request(s)" if load else ""
    if (
        fn.slo_ttft_p99_s is not None
        and load
        and len(fn.recent_ttfts) >= SLO_MIN_SAMPLES
        and (seen := p99(fn.recent_ttfts)) > fn.slo_ttft_p99_s
    ):
        count += 1
        why += f", TTFT p99 {seen:.2f}s over its SLO {fn.slo_ttft_p99_s:g}s: +1"
    if fn.instances > count:
        count = fn.instances
        why += f", {fn.instances} instance(s) kept alive"
    bounded = min(fn.max_instances, max(fn.min_instances, count))
    if bounded != count:
        why += f" (min {fn.min_instances}, max {fn.max_instances})"
    return bounded, why.lstrip(", ")
