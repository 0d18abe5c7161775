"""Keep-alive, min_instances and scale-in: a pure function from a cluster snapshot to instance
starts and stops, called by the controller's autoscaler loop every few seconds. Scale-out under
load is not here: `policy.decide` cold-starts an instance when every instance has
target_concurrency requests.

Stopping an instance leaves its checkpoint in the node's DRAM and disk tiers, so the next cold
start of the function is fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
        key=lambda inst: (inst.idle_since, inst.instance_id),
    )
    stops = expired[: max(0, len(mine) - fn.min_instances)]
    actions: list[ScaleAction] = [
        StopInstance(
            inst.instance_id,
            fn.name,
            f"idle {_idle_for(inst, cluster.now):.0f}s, past keep_alive {fn.keep_alive_s:g}s",
        )
        for inst in stops
    ]
    if not stops:
        actions.extend(_scale_in(cluster, fn, mine))
    missing = fn.min_instances - len(mine)
    reason = f"min_instances is {fn.min_instances}, {len(mine)} running"
    actions.extend(StartInstance(fn.name, reason) for _ in range(missing))
    return actions


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
    return inst.idle and inst.idle_since is not None and inst.idle_since + fn.keep_alive_s <= now


def _idle_for(inst: InstanceView, now: float) -> float:
    return now - inst.idle_since if inst.idle_since is not None else 0.0
