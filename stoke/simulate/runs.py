"""Runs side by side: every policy file x keep-alive x placement asked for, on one workload.

All runs of one command share the arrivals (same trace, same Zipf draw) and the spot traces, so
their differences come from the policies alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from autoscaler.policy import PolicyError, PricedPolicy, load_policy
from controller.policy import POLICIES
from stoke.errors import StokeError
from stoke.simulate.config import SimConfig
from stoke.simulate.engine import Simulation
from stoke.simulate.metrics import RunResult
from stoke.simulate.spot_market import SpotMarket
from stoke.simulate.traces import SpotTrace, TraceRequest
from stoke.simulate.workload import arrivals, functions, keep_alive_label


@dataclass(frozen=True, slots=True)
class Variant:
    label: str
    policy: PricedPolicy
    config: SimConfig


def load_policies(paths: Sequence[Path]) -> list[tuple[str, PricedPolicy]]:
    """(label, priced policy) per file; the label is the file's stem."""
    out = []
    for path in paths:
        try:
            out.append((path.stem, load_policy(path)))
        except PolicyError as exc:
            raise StokeError(str(exc)) from None
    return out


def variants(
    policies: Sequence[tuple[str, PricedPolicy]],
    keep_alives: Sequence[str],
    placements: Sequence[str],
    base: SimConfig,
) -> list[Variant]:
    """The cartesian product; each label names only what varies."""
    for name in placements:
        if name not in POLICIES:
            raise StokeError(f"--placement {name!r}: choose from {', '.join(POLICIES)}")
    out = []
    for label, policy in policies:
        for keep in keep_alives:
            for place in placements:
                parts = [label] if len(policies) > 1 else []
                if len(keep_alives) > 1:
                    parts.append(f"keep-alive {keep_alive_label(keep)}")
                if len(placements) > 1:
                    parts.append(place)
                config = dataclasses.replace(base, keep_alive=keep, placement=place)
                out.append(Variant(" / ".join(parts) or label, policy, config))
    return out


def simulate(
    variant: Variant, trace: Sequence[TraceRequest], spot: Sequence[SpotTrace]
) -> RunResult:
    """One run of `variant` on the trace (and spot traces)."""
    config = variant.config
    specs = functions(config)
    work = arrivals(trace, specs, config)
    market = SpotMarket(variant.policy, spot, config.spot_start_s, config.seed, config.spot_scale)
    return Simulation(variant.label, variant.policy, specs, work, market, config).run()
