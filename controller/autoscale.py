"""Keep-alive, min_instances and scale-in: a pure function from a cluster snapshot to instance
starts and stops, called by the controller's autoscaler loop every few seconds. Scale-out under
load is not here: `policy.decide` cold-starts an instance when every instance has
target_concurrency requests.

Keep-alive is fixed (`keep_alive: 5m`) or adaptive (`keep_alive: adaptive`): the function's
`windows`, learned from its idle times (`autoscaler.keepalive`), say when after the function goes
idle an instance should be loaded. With a pre-warm window the instance stops as soon as the
function is idle and one is started again when the window ends; either way it stops when the
keep-alive window ends.

Stopping an instance leaves its checkpoint in the node's DRAM and disk tiers, so the next cold
start of the function is fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from autoscaler.keepalive import format_duration
from controller.cluster import ClusterView, FunctionView, InstanceStatus, InstanceView


@dataclass(frozen=True, slots=True)
class StopInstance:
    """Stop `instance_id` (an instance of `function`) because of `reason`."""

    instance_id: str
    function: str
    reason: str
    migrate: bool = False
    """Its running requests move to the function's other instances first (scale-in)."""


@dataclass(frozen=True, slots=True)
class StartInstance:
    """Start one more instance of `function`; the controller places it with `policy.decide`."""

    function: str
    reason: str


ScaleAction = StopInstance | StartInstance

DELETED = "function deleted"


def autoscale(cluster: ClusterView, functions: Sequence[FunctionView]) -> list[ScaleAction]:
    """The starts and stops due now. Per function, by name: stop ready instances idle for at least
    keep_alive_s, oldest idle first, keeping min_instances (loading ones count); start instances
    up to min_instances. Then stop every idle instance of a function not in `functions`, by
    (function, instance_id)."""
    actions: list[ScaleAction] = []
    for fn in sorted(functions, key=lambda f: f.name):
        actions.extend(_scale(cluster, fn))
    known = {fn.name for fn in functions}
    orphans = [i for i in cluster.instances if i.function not in known and i.in_flight == 0]
    for inst in sorted(orphans, key=lambda i: (i.function, i.instance_id)):
        actions.append(StopInstance(inst.instance_id, inst.function, DELETED))
    return actions


def _scale(cluster: ClusterView, fn: FunctionView) -> list[ScaleAction]:
    mine = cluster.instances_of(fn.name)
    expired = sorted(
        (inst for inst in mine if _expired(inst, fn, cluster.now)),
        key=lambda inst: (_idle_key(inst), inst.instance_id),
    )
    stops = expired[: max(0, len(mine) - fn.min_instances)]
    actions: list[ScaleAction] = [
        StopInstance(inst.instance_id, fn.name, _stop_reason(inst, fn, cluster.now))
        for inst in stops
    ]
    if not stops:
        actions.extend(_scale_in(cluster, fn, mine))
    missing = fn.min_instances - len(mine)
    reason = f"min_instances is {fn.min_instances}, {len(mine)} running"
    actions.extend(StartInstance(fn.name, reason) for _ in range(missing))
    if missing <= 0 and not mine:
        actions.extend(_prewarm(fn, cluster.now))
    return actions


def _prewarm(fn: FunctionView, now: float) -> list[ScaleAction]:
    """Adaptive keep-alive with a pre-warm window: the function has no instance and has been
    idle into its keep-alive window, so start one before the next request is expected."""
    w, since = fn.windows, fn.idle_since
    if w is None or w.prewarm_s <= 0 or since is None or not w.wants_instance(now - since):
        return []
    reason = (
        f"adaptive keep-alive: pre-warm after {format_duration(now - since)} idle "
        f"(keep until {format_duration(w.end_s)}; {w.reason})"
    )
    return [StartInstance(fn.name, reason)]


def _scale_in(
    cluster: ClusterView, fn: FunctionView, mine: Sequence[InstanceView]
) -> list[ScaleAction]:
    """Consolidate an over-provisioned function: when every ready instance is busy (none idle,
    so keep-alive will not act), nothing is queued, and all their requests fit on one instance
    fewer at half its target concurrency (the half keeps scale-out, which happens at full
    concurrency, from undoing it at once), stop the least busy instance, migrating its
    requests to the others."""
    ready = [i for i in mine if i.state == InstanceStatus.READY]
    if len(ready) <= max(fn.min_instances, 1) or fn.queued or len(ready) != len(mine):
        return []
    if any(i.in_flight == 0 for i in ready):
        return []
    total = sum(i.in_flight for i in ready)
    if total > (len(ready) - 1) * fn.target_concurrency // 2:
        return []
    victim = min(ready, key=lambda i: (i.in_flight, i.instance_id))
    reason = (
        f"scale in: {total} requests fit on {len(ready) - 1} instance(s) at half their target "
        f"concurrency of {fn.target_concurrency}"
    )
    return [StopInstance(victim.instance_id, fn.name, reason, migrate=True)]


def _expired(inst: InstanceView, fn: FunctionView, now: float) -> bool:
    """Whether idle `inst` should stop. Fixed keep-alive: idle for keep_alive_s. Adaptive, while
    the whole function is idle: outside its windows measured from when the function went idle
    (so with a pre-warm window it stops as soon as it is idle, and a pre-warmed instance that
    served nothing stops when the keep-alive window ends). Adaptive, while other instances
    serve (or since when is unknown): idle through both windows."""
    if not inst.idle:
        return False
    w = fn.windows
    if w is not None and fn.idle_since is not None:
        return not w.wants_instance(now - fn.idle_since)
    limit = fn.keep_alive_s if w is None else w.end_s
    return inst.idle_since is not None and inst.idle_since + limit <= now


def _stop_reason(inst: InstanceView, fn: FunctionView, now: float) -> str:
    w = fn.windows
    if w is None:
        return f"idle {_idle_for(inst, now):.0f}s, past keep_alive {fn.keep_alive_s:g}s"
    idle = now - fn.idle_since if fn.idle_since is not None else _idle_for(inst, now)
    if fn.idle_since is not None and idle < w.prewarm_s:
        where = f"before its pre-warm window at {format_duration(w.prewarm_s)}"
    else:
        where = f"past its keep-alive window ending at {format_duration(w.end_s)}"
    return f"adaptive keep-alive: idle {format_duration(idle)}, {where} ({w.reason})"


def _idle_key(inst: InstanceView) -> float:
    """Oldest idle first; an instance that never served (pre-warmed) before any."""
    return inst.idle_since if inst.idle_since is not None else -math.inf


def _idle_for(inst: InstanceView, now: float) -> float:
    return now - inst.idle_since if inst.idle_since is not None else 0.0
