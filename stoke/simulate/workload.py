"""The simulated workload: the trace's requests spread over N functions.

The Azure trace is one service; a serverless cluster runs many functions. As the ServerlessLLM
paper does, each request is given to a function drawn with Zipf popularity (function i with
weight 1 / (i+1)^s), so a few functions are hot and a long tail is cold: the cold starts,
keep-alive and placement decisions the simulator exists to measure. A run longer than the trace
repeats it back to back (`period`: the one-hour Azure trace spans 58 min 22 s, so a day is 24.7
copies): the arrival pattern within each copy is real, the day has no diurnal swing (say so
when quoting a day's numbers).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from autoscaler.keepalive import format_duration
from node_agent.facts.units import parse_duration
from stoke.errors import StokeError
from stoke.simulate.config import MODELS, FunctionSpec, SimConfig
from stoke.simulate.traces import TraceRequest


@dataclass(frozen=True, slots=True)
class Arrival:
    request_id: int
    at: float
    function: str
    context_tokens: int
    generated_tokens: int


def functions(config: SimConfig) -> list[FunctionSpec]:
    """The N functions of a run (`fn-00` the most popular), each with its model and keys."""
    unknown = [m for m in config.models if m not in MODELS]
    if unknown:
        raise StokeError(f"--models: {', '.join(unknown)} unknown; choose from {', '.join(MODELS)}")
    adaptive, keep_alive = keep_alive_setting(config.keep_alive)
    width = max(2, len(str(config.functions - 1)))
    return [
        FunctionSpec(
            name=f"fn-{i:0{width}d}",
            model=MODELS[config.models[i % len(config.models)]],
            target_concurrency=config.target_concurrency,
            max_instances=config.max_instances,
            keep_alive_s=keep_alive,
            adaptive=adaptive,
            slo_ttft_s=config.slo_ttft_s,
        )
        for i in range(config.functions)
    ]


def keep_alive_setting(value: str) -> tuple[bool, float]:
    """(adaptive, fixed keep-alive seconds) for `--keep-alive` (`adaptive` falls back to 5m)."""
    if value == "adaptive":
        return True, 300.0
    try:
        return False, parse_duration(value)
    except ValueError as exc:
        raise StokeError(f"--keep-alive: {exc}, or `adaptive`") from None


def keep_alive_label(value: str) -> str:
    adaptive, seconds = keep_alive_setting(value)
    return "adaptive" if adaptive else format_duration(seconds)


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


def period(trace: Sequence[TraceRequest]) -> float:
    """How far apart the copies of a repeated trace start: its span plus one mean gap between
    arrivals, so the seam looks like any other moment of the trace (rounding up to the hour
    would put a silence there that empties the cluster)."""
    span = trace[-1].arrival_s
    return span + (span / (len(trace) - 1) if len(trace) > 1 and span > 0 else 1.0)


def arrivals(
    trace: Sequence[TraceRequest], specs: Sequence[FunctionSpec], config: SimConfig
) -> list[Arrival]:
    """The run's arrivals: the trace repeated to fill the warm-up and `config.hours`, each
    request given a function by Zipf popularity (seeded: the same run gives the same workload)."""
    if config.hours <= 0:
        raise StokeError(f"--hours {config.hours:g}: give a positive number of hours")
    rng = random.Random(config.seed)
    names = [s.name for s in specs]
    weights = zipf_weights(len(specs), config.zipf_s)
    span = period(trace)
    horizon = config.warmup_s + config.hours * 3600.0
    out: list[Arrival] = []
    for copy in range(math.ceil(horizon / span)):
        chosen = rng.choices(names, weights, k=len(trace))
        for req, fn in zip(trace, chosen, strict=True):
            at = copy * span + req.arrival_s
            if at >= horizon:
                break
            out.append(Arrival(len(out), at, fn, req.context_tokens, req.generated_tokens))
    return out
