"""Locality-driven placement by migration (ServerlessLLM §5): a pure policy.

When the node where a function would start soonest (its checkpoint already in that node's
DRAM) has no room only because of other functions' busy instances, moving those instances'
requests to other instances of their own functions, then stopping them, can start the function
there sooner than anywhere else. `plan_make_room` finds the best such plan, or None when none
beats the alternative the ordinary policy offers. It reads nothing but its arguments; the
router carries the plan out (migrate, stop, then cold start).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from controller.cluster import ClusterView, FunctionView, InstanceStatus, InstanceView, NodeView
from controller.policy import startup_estimate
from node_agent.facts.tiers import Origin, TierName


@dataclass(frozen=True, slots=True)
class MakeRoom:
    """Start `function` on `node_id` from `tier` once `evict` (idle) are stopped and the
    requests of each instance in `migrate` have moved to `migrate[instance]`, then it too."""

    node_id: str
    tier: Origin
    estimate_s: float
    """Migration time + the load from `tier`: when the new instance should be ready."""
    migrate: Mapping[str, str]
    """Busy instance to empty -> the instance of the same function that takes its requests."""
    evict: tuple[str, ...] = ()


def plan_make_room(
    cluster: ClusterView,
    fn: FunctionView,
    functions: Mapping[str, FunctionView],
    alternative_s: float,
    migration_s: float,
) -> MakeRoom | None:
    """The plan that starts `fn` soonest by migrating requests off a node that holds it in
    DRAM, if it beats `alternative_s` (the ordinary policy's estimate; `inf` when it can only
    wait or refuse). `functions` describes the other functions (their target concurrency);
    `migration_s` is the expected time to move a node's requests."""
    if len(cluster.instances_of(fn.name)) >= fn.max_instances:
        return None
    best: MakeRoom | None = None
    for node in cluster.nodes:
        if not node.schedulable or node.has_room(fn.memory_bytes):
            continue
        if fn.source not in node.holdings.get(TierName.DRAM, {}):
            continue
        plan = _free_by_migration(node, cluster, fn, functions)
        if plan is None:
            continue
        migrate, evict = plan
        tier, load_s = startup_estimate(node, fn)
        estimate = (migration_s if migrate else 0.0) + load_s
        if estimate < alternative_s and (best is None or estimate < best.estimate_s):
            best = MakeRoom(node.node_id, tier, estimate, migrate, evict)
    return best


def _free_by_migration(
    node: NodeView,
    cluster: ClusterView,
    fn: FunctionView,
    functions: Mapping[str, FunctionView],
) -> tuple[dict[str, str], tuple[str, ...]] | None:
    """Idle instances first (oldest idle first), then busy ones (least busy first) whose
    requests fit on another instance of their function: the fewest that free a slot and
    `fn.memory_bytes` on `node`, or None."""
    others = [i for i in cluster.instances_on(node.node_id) if i.function != fn.name]
    idle = sorted((i for i in others if i.idle), key=lambda i: (i.idle_since or 0.0, i.instance_id))
    busy = sorted(
        (i for i in others if i.state == InstanceStatus.READY and i.in_flight > 0),
        key=lambda i: (i.in_flight, i.instance_id),
    )
    taken: dict[str, int] = {}  # destination instance -> requests it is to receive
    migrate: dict[str, str] = {}
    evict: list[str] = []
    free_memory, used_slots = node.memory_free, node.slots_used
    for inst in [*idle, *busy]:
        if free_memory >= fn.memory_bytes and used_slots < node.slots_total:
            break
        if inst.in_flight:
            dest = _destination(inst, cluster, functions, taken)
            if dest is None:
                continue
            taken[dest] = taken.get(dest, 0) + inst.in_flight
            migrate[inst.instance_id] = dest
        else:
            evict.append(inst.instance_id)
        free_memory += inst.reserved_bytes
        used_slots -= 1
    if free_memory < fn.memory_bytes or used_slots >= node.slots_total or not migrate:
        return None  # no room, or room without migrating (the ordinary policy's eviction)
    return migrate, tuple(evict)


def _destination(
    victim: InstanceView,
    cluster: ClusterView,
    functions: Mapping[str, FunctionView],
    taken: Mapping[str, int],
) -> str | None:
    """A ready instance of the victim's function on another schedulable node with room for
    all of its requests (after what earlier victims send there), least busy first."""
    spec = functions.get(victim.function)
    if spec is None:
        return None
    fits = []
    for inst in cluster.instances_of(victim.function):
        node = cluster.find_node(inst.node_id)
        if inst.node_id == victim.node_id or inst.state != InstanceStatus.READY:
            continue
        if node is None or not node.schedulable:
            continue
        load = inst.in_flight + taken.get(inst.instance_id, 0) + victim.in_flight
        if load <= spec.target_concurrency:
            fits.append((load, inst.instance_id))
    return min(fits)[1] if fits else None
