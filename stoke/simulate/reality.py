"""`stoke simulate-check`: the simulator checked against a real cluster on the same trace slice.

A short slice of a request trace, thinned and its token counts scaled to what a small CPU
machine serves with the tiny demo model, is replayed twice: against a real local cluster
(`stoke up --autoscale`, `stoke.simulate.replay`) and through the simulator (`Simulation`, the
controller's own placement and keep-alive, the autoscaler's own node decisions), the simulator
given the speeds measured on that cluster just before (`replay.calibrate`: cold start per tier,
per-request overhead, prefill and decode rates, the instance's reserved memory), never figures
written down here. Both get the same arrivals, functions and keys (`keep_alive`,
`target_concurrency`, `max_instances`) and the same policy file. Compared: cold starts, peak
and mean instance counts over the slice, TTFT p50.

The tolerance (`Tolerance`) is what the two can honestly share, and why:

- **cold starts within 2 or 25%**: keep-alive stops an instance on the controller's 1 s tick
  and on the simulator's, not in phase: a request arriving within a tick of an instance's
  keep-alive running out finds it warm in one and gone in the other; and whether two requests
  of a function overlap (a second instance, a full node, an eviction) turns on milliseconds of
  real jitter. With a keep-alive near the typical gap between a function's requests (3 s on
  the conversation trace) the count is a knife edge (the real cluster itself gave 12 and 16 on
  the same 40 s slice); the default 5 s is clear of it.
- **peak instances within 1**: a second instance starts only when requests of one function
  overlap, and whether two overlap by a few milliseconds depends on the real run's jitter.
- **mean instances within 25% (or 0.25)**: the same keep-alive edges, on a short slice.
- **TTFT p50 within 30% or 15 ms**: warm first tokens of the tiny model take tens of
  milliseconds on a CPU, of which the machine's noise (two cores shared by the controller, the
  node, the client threads and whatever else runs) is a good part; the simulator's model is a
  measured line (overhead + context / prefill rate) with no contention.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoscaler.policy import PolicyError, PricedPolicy, load_policy
from controller.policy import ColdStart
from stoke.errors import StokeError
from stoke.simulate.cluster import SimInstance
from stoke.simulate.config import FunctionSpec, ModelSize, NodeShape, SimConfig
from stoke.simulate.engine import Simulation
from stoke.simulate.metrics import percentile
from stoke.simulate.replay import RealRun, Speeds, calibrate, local_cluster, replay
from stoke.simulate.spot_market import SpotMarket
from stoke.simulate.traces import TraceRequest, read_requests
from stoke.simulate.workload import Arrival, zipf_weights

Say = Callable[[str], None]

PRESTART = 2
"""Pre-started worker processes the node keeps (`stoke node --prestart`). A cold start that
finds none waits a second or two for a process to start, which the simulator does not model
(its cold start is the checkpoint's bytes over the tier's bandwidth); two keep that rare when
cold starts are seconds apart, as in the slice."""
NODE_ARGS = ["--threads", "1", "--dram-cache", "256MiB", "--disk-cache", "512MiB",
             "--heartbeat", "0.5", "--prestart", str(PRESTART)]  # fmt: skip
LOCAL_POLICY = {
    "pools": [
        {
            "name": "local",
            "provider": "local",
            "market": "on_demand",
            "price_per_hour": 0.10,
            "min_nodes": 1,
            "max_nodes": 1,
            "offers": {"slots": 4, "cpu_memory": "3GiB"},
            "node_args": NODE_ARGS,
        }
    ],
    "scaling": {"upscale_delay": "0s", "downscale_delay": "20s", "cooldown": "0s"},
}
"""One local node of 4 slots: the node count is fixed, so what varies is what the slice is
about (instances, cold starts, first tokens), not how fast this machine boots a node."""
TICK_S = 1.0
"""How often the simulated controller decides: the real scaling loop's `autoscale_interval_s`
(1 s, which `stoke up` keeps). Measured on the local cluster (instance ids polled every 50 ms
against each instance's last response), an idle instance leaves the listing 0.6 to 1.3 s after
its keep-alive ran out: a 1 s grid, plus the stop itself. A 0.1 s tick here would stop
instances ~0.5 s sooner than the real cluster does."""


@dataclass(frozen=True, slots=True)
class SliceSpec:
    start_s: float = 0.0
    seconds: float = 60.0
    rate: float = 1.0
    """Requests per second wanted: the slice keeps every k-th request of the trace."""
    functions: int = 3
    context_scale: float = 1 / 8
    generated_scale: float = 1 / 4
    max_context: int = 256
    max_generated: int = 64
    keep_alive_s: float = 5.0
    target_concurrency: int = 1
    max_instances: int = 2
    seed: int = 0

    def names(self) -> list[str]:
        return [f"fn-{i:02d}" for i in range(self.functions)]

    def autoscaling(self) -> dict[str, Any]:
        return {
            "target_concurrency": self.target_concurrency,
            "max_instances": self.max_instances,
            "keep_alive": f"{self.keep_alive_s:g}s",
        }


def take_slice(trace: Sequence[TraceRequest], spec: SliceSpec) -> list[Arrival]:
    """The trace's requests in [start, start + seconds), every k-th kept so that about `rate`
    arrive per second (arrival times stay the trace's), each given a function by Zipf
    popularity (seeded), token counts scaled and clamped to [1, max_context] and
    [2, max_generated] (two, so that every request decodes)."""
    if spec.seconds <= 0 or spec.rate <= 0 or spec.functions < 1:
        raise StokeError("--seconds, --rate and --functions must be positive")
    window = [r for r in trace if spec.start_s <= r.arrival_s < spec.start_s + spec.seconds]
    if len(window) < 2:
        raise StokeError(
            f"the trace has {len(window)} request(s) in [{spec.start_s:g}, "
            f"{spec.start_s + spec.seconds:g}) s; choose another --start or more --seconds"
        )
    keep = max(1, round(len(window) / spec.seconds / spec.rate))
    kept = window[::keep]
    names = spec.names()
    chosen = random.Random(spec.seed).choices(names, zipf_weights(len(names), 1.0), k=len(kept))
    first = kept[0].arrival_s
    return [
        Arrival(
            i,
            r.arrival_s - first,
            fn,
            min(spec.max_context, max(1, round(r.context_tokens * spec.context_scale))),
            min(spec.max_generated, max(2, round(r.generated_tokens * spec.generated_scale))),
        )
        for i, (r, fn) in enumerate(zip(kept, chosen, strict=True))
    ]


# ---- the simulated half ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeasuredModel(ModelSize):
    """A model whose instance reserves what the real controller reserves for it."""

    reserved_bytes: int = 0

    @property
    def memory_bytes(self) -> int:
        return self.reserved_bytes


class _Counted(Simulation):
    """A simulation that also records its instance count at every start and stop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts: list[tuple[float, int]] = [(0.0, 0)]

    def start_instance(self, function: str, cs: ColdStart) -> SimInstance:
        inst = super().start_instance(function, cs)
        self.counts.append((self.now, len(self.instances)))
        return inst

    def stop_instance(self, iid: str) -> None:
        super().stop_instance(iid)
        self.counts.append((self.now, len(self.instances)))


@dataclass(frozen=True, slots=True)
class Outcome:
    """One side's measures over the slice."""

    cold_starts: dict[str, int]
    ttfts: list[float]
    peak_instances: int
    mean_instances: float

    @property
    def cold_total(self) -> int:
        return sum(self.cold_starts.values())


def simulate_slice(
    arrivals: Sequence[Arrival], speeds: Speeds, policy: PricedPolicy, spec: SliceSpec
) -> Outcome:
    """The slice in the simulator, configured with `speeds`: a cold start from a tier takes the
    measured time (the tier's bandwidth is the checkpoint's bytes over it), a first token the
    measured overhead plus the prefill, the rest the measured decode rate."""
    model = MeasuredModel(
        "measured", speeds.checkpoint_bytes, speeds.prefill_tokens_per_s,
        speeds.decode_tokens_per_s, reserved_bytes=speeds.memory_bytes,
    )  # fmt: skip
    bandwidth = {
        tier: speeds.checkpoint_bytes / max(seconds, 1e-6)
        for tier, seconds in speeds.load_s.items()
    }
    span = arrivals[-1].at
    config = SimConfig(
        functions=spec.functions, hours=max(span, 1.0) / 3600.0, warmup_s=0.0,
        keep_alive=f"{spec.keep_alive_s:g}s", target_concurrency=spec.target_concurrency,
        max_instances=spec.max_instances, tick_s=TICK_S, boot_s=0.0,
        start_overhead_s=0.0, first_token_overhead_s=speeds.first_token_overhead_s,
        node=NodeShape(bandwidth=bandwidth), seed=spec.seed,
    )  # fmt: skip
    specs = [
        FunctionSpec(name, model, spec.target_concurrency, 0, spec.max_instances,
                     spec.keep_alive_s)
        for name in spec.names()
    ]  # fmt: skip
    market = SpotMarket(policy, [], 0.0, spec.seed)
    sim = _Counted("simulated", policy, specs, arrivals, market, config)
    result = sim.run()
    peak, mean = _instance_stats(sim.counts, span)
    return Outcome(dict(result.counters.cold_starts), list(result.ttfts), peak, mean)


def _instance_stats(counts: Sequence[tuple[float, int]], span: float) -> tuple[int, float]:
    """Peak and time-weighted mean of a step function of instance counts over [0, span]."""
    peak, area = 0, 0.0
    for (t, n), (t_next, _) in zip(counts, [*counts[1:], (span, 0)], strict=True):
        if t > span:
            break
        peak = max(peak, n)
        area += n * (min(t_next, span) - t)
    return peak, area / span if span > 0 else 0.0


def real_outcome(run: RealRun, span: float) -> Outcome:
    cold: dict[str, int] = {}
    for s in run.served:
        if s.cold:
            cold[s.tier] = cold.get(s.tier, 0) + 1
    window = [n for t, n in run.samples if t <= span]
    if not window:
        raise StokeError("no instance counts were read from the admin API during the replay")
    ttfts = [s.ttft_s for s in run.served if s.ttft_s is not None]
    return Outcome(cold, ttfts, max(window), sum(window) / len(window))


# ---- the comparison --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far the simulator may be from the real cluster (the module docstring says why)."""

    cold_starts_abs: int = 2
    cold_starts_rel: float = 0.25
    peak_instances_abs: int = 1
    mean_instances_rel: float = 0.25
    mean_instances_abs: float = 0.25
    ttft_p50_rel: float = 0.30
    ttft_p50_abs_s: float = 0.015


@dataclass(frozen=True, slots=True)
class Row:
    metric: str
    real: str
    simulated: str
    allowed: str
    ok: bool | None
    """None: shown, not checked."""


def _within(real: float, sim: float, absolute: float, relative: float) -> bool:
    return abs(real - sim) <= max(absolute, relative * abs(real))


def _tiers(cold: dict[str, int]) -> str:
    inner = ", ".join(f"{t} {n}" for t, n in sorted(cold.items()))
    return f"{sum(cold.values())} ({inner})" if inner else "0"


def compare(real: Outcome, sim: Outcome, tol: Tolerance = Tolerance()) -> list[Row]:
    r50, s50 = percentile(real.ttfts, 50), percentile(sim.ttfts, 50)
    r95, s95 = percentile(real.ttfts, 95), percentile(sim.ttfts, 95)
    return [
        Row("cold starts", _tiers(real.cold_starts), _tiers(sim.cold_starts),
            f"±{tol.cold_starts_abs} or {tol.cold_starts_rel:.0%}",
            _within(real.cold_total, sim.cold_total, tol.cold_starts_abs, tol.cold_starts_rel)),
        Row("peak instances", str(real.peak_instances), str(sim.peak_instances),
            f"±{tol.peak_instances_abs}",
            abs(real.peak_instances - sim.peak_instances) <= tol.peak_instances_abs),
        Row("mean instances", f"{real.mean_instances:.2f}", f"{sim.mean_instances:.2f}",
            f"±{tol.mean_instances_rel:.0%} or {tol.mean_instances_abs:g}",
            _within(real.mean_instances, sim.mean_instances, tol.mean_instances_abs,
                    tol.mean_instances_rel)),
        Row("TTFT p50", _ms(r50), _ms(s50),
            f"±{tol.ttft_p50_rel:.0%} or {tol.ttft_p50_abs_s * 1000:.0f} ms",
            _within(r50, s50, tol.ttft_p50_abs_s, tol.ttft_p50_rel)),
        Row("TTFT p95", _ms(r95), _ms(s95), "not checked", None),
    ]  # fmt: skip


def _ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


@dataclass(frozen=True)
class Report:
    spec: SliceSpec
    requests: int
    span_s: float
    speeds: Speeds
    real: Outcome
    simulated: Outcome
    rows: list[Row]

    @property
    def ok(self) -> bool:
        return all(r.ok is not False for r in self.rows)

    def table(self) -> str:
        cells = [["", "real", "simulated", "allowed", ""]] + [
            [r.metric, r.real, r.simulated, r.allowed,
             "" if r.ok is None else ("ok" if r.ok else "FAIL")]
            for r in self.rows
        ]  # fmt: skip
        widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "slice": dataclasses.asdict(self.spec),
                "requests": self.requests,
                "span_s": round(self.span_s, 3),
                "speeds": dataclasses.asdict(self.speeds),
                "real": _outcome_json(self.real),
                "simulated": _outcome_json(self.simulated),
                "rows": [dataclasses.asdict(r) for r in self.rows],
                "ok": self.ok,
            },
            indent=2,
        )


def _outcome_json(o: Outcome) -> dict[str, Any]:
    return {
        "cold_starts": o.cold_starts,
        "cold_starts_total": o.cold_total,
        "peak_instances": o.peak_instances,
        "mean_instances": round(o.mean_instances, 3),
        "ttft_p50_s": round(percentile(o.ttfts, 50), 4),
        "ttft_p95_s": round(percentile(o.ttfts, 95), 4),
        "requests": len(o.ttfts),
    }


# ---- the whole check -------------------------------------------------------------------------


def check_reality(trace: Path, spec: SliceSpec, model: Path | None, work: Path, say: Say) -> Report:
    """Replay the slice on a real local cluster (its speeds measured first), then in the
    simulator with those speeds, and compare. `work` holds the models, the cluster's home and
    its log (`up.log`)."""
    import shutil

    arrivals = take_slice(read_requests(trace), spec)
    span = arrivals[-1].at
    contexts = sorted(a.context_tokens for a in arrivals)
    say(f"slice: {len(arrivals)} requests over {span:.1f} s to {spec.functions} functions, "
        f"contexts {contexts[0]}-{contexts[-1]} tokens")  # fmt: skip
    if model is None:
        from stoke.demo_model import make_demo_model

        say("building the tiny demo model")
        model = make_demo_model(work / "tiny-model", size="tiny", arch="llama", seed=0)
    policy_path = work / "cluster.yaml"
    policy_path.write_text(json.dumps(LOCAL_POLICY, indent=1))  # JSON is YAML
    try:
        policy = load_policy(policy_path)
    except PolicyError as exc:
        raise StokeError(str(exc)) from None
    say(f"starting a local cluster: stoke up --autoscale {policy_path} (log: {work / 'up.log'})")
    with local_cluster(policy_path, work) as cluster:
        say(f"cluster up at {cluster.url}; measuring this machine's speeds")
        speeds = calibrate(cluster, model, work, max(contexts), PRESTART, say)
        for name in spec.names():
            copy = work / "models" / name  # a checkpoint each, as the simulator's functions
            shutil.copytree(model, copy, dirs_exist_ok=True)
            cluster.deploy(name, copy, spec.autoscaling())
        say(f"replaying {len(arrivals)} requests open-loop through the openai client")
        run = replay(cluster, arrivals, say)
    say("simulating the slice with the measured speeds")
    real = real_outcome(run, span)
    simulated = simulate_slice(arrivals, speeds, policy, spec)
    return Report(spec, len(arrivals), span, speeds, real, simulated, compare(real, simulated))
