"""Where a request goes: a pure function from a cluster snapshot and a function to a decision.

`decide` is called by the router for every request that needs an instance, and again for queued
requests whenever the cluster changes. It changes nothing; the router carries the decision out:

1. a ready instance with spare capacity (in_flight < target_concurrency) → `Route`, least busy;
2. else a loading instance with spare capacity → `Route` (the request waits for it to load);
3. else, at `max_instances` → `Wait`;
4. else a node with a free slot and enough free memory → `ColdStart` there, picked by the policy
   (`locality`: the soonest ready, `random`, or `least-loaded`);
5. else a node where stopping idle instances of other functions (oldest idle first, as few as
   possible) makes room → `ColdStart` with those instances to `evict` first;
6. else `Wait` when the function has an instance that will free up, `Refuse` when it has none.

Instances on dead or draining nodes take no new requests (they still count toward max_instances).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controller.cluster import (
    ClusterView,
    FunctionView,
    InstanceStatus,
    InstanceView,
    NodeView,
)
from node_agent.facts.tiers import LOAD_PLACES_FASTEST_FIRST, Origin
from node_agent.facts.units import format_size

POLICIES = ("locality", "random", "least-loaded")
REFUSE_RETRY_AFTER_S = 5.0


@dataclass(frozen=True, slots=True)
class Route:
    """Send the request to this instance (ready, or loading with capacity)."""

    instance_id: str


@dataclass(frozen=True, slots=True)
class ColdStart:
    """Start an instance on `node_id`, loading from `tier`, expected ready in `estimate_s`; stop
    the instances in `evict` first."""

    node_id: str
    tier: str
    estimate_s: float
    evict: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Wait:
    """Queue the request in the router and decide again when something changes."""

    reason: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """Reject the request now (429/503); the client may retry after `retry_after_s`."""

    reason: str
    retry_after_s: float


Decision = Route | ColdStart | Wait | Refuse


def startup_estimate(node: NodeView, fn: FunctionView) -> tuple[Origin, float]:
    """(tier, seconds) for starting `fn` on `node`: the node's loading queue plus the checkpoint
    bytes over the bandwidth of the fastest tier there holding `fn.source` (`remote` if none)."""
    tier = next(
        t
        for t in LOAD_PLACES_FASTEST_FIRST
        if t is Origin.REMOTE or fn.source in node.holdings.get(t, {})
    )
    return tier, max(0.0, node.loading_queue_s) + fn.checkpoint_bytes / node.bandwidth(tier)


def decide(
    cluster: ClusterView,
    fn: FunctionView,
    policy: str = "locality",
    rng: random.Random | None = None,
) -> Decision:
    """The decision for one request to `fn` (see the module docstring for the order of rules).
    `rng` is used by the `random` policy only; a fresh one is made when None. Raises ValueError
    for a policy not in POLICIES."""
    if policy not in POLICIES:
        raise ValueError(
            f"unknown scheduling policy {policy!r}; choose one of {', '.join(POLICIES)}"
        )
    mine = cluster.instances_of(fn.name)
    route = _route(cluster, fn, mine)
    if route is not None:
        return route
    if len(mine) >= fn.max_instances:
        return Wait(f"all {len(mine)} instances busy")
    candidates = [node for node in cluster.nodes if node.has_room(fn.memory_bytes)]
    if candidates:
        node = _choose(candidates, policy, fn, rng)
        return ColdStart(node.node_id, *startup_estimate(node, fn))
    plans = _evictions(cluster, fn)
    if plans:
        evictable = [node for node in cluster.nodes if node.node_id in plans]
        node = _choose(evictable, policy, fn, rng, plans)
        return ColdStart(node.node_id, *startup_estimate(node, fn), evict=plans[node.node_id])
    if mine:
        return Wait(f"all {len(mine)} instances busy and no node has room for another")
    return Refuse(_no_room(cluster, fn), REFUSE_RETRY_AFTER_S)


def _route(cluster: ClusterView, fn: FunctionView, mine: Sequence[InstanceView]) -> Route | None:
    """The least busy ready instance with spare capacity, else such a loading one."""
    for state in (InstanceStatus.READY, InstanceStatus.LOADING):
        open_ = [
            inst
            for inst in mine
            if inst.state == state
            and inst.in_flight < fn.target_concurrency
            and _takes_requests(cluster, inst)
        ]
        if open_:
            best = min(open_, key=lambda inst: (inst.in_flight, inst.instance_id))
            return Route(best.instance_id)
    return None


def _takes_requests(cluster: ClusterView, inst: InstanceView) -> bool:
    node = cluster.find_node(inst.node_id)
    return node is None or node.schedulable


def _choose(
    nodes: Sequence[NodeView],
    policy: str,
    fn: FunctionView,
    rng: random.Random | None,
    evictions: Mapping[str, tuple[str, ...]] | None = None,
) -> NodeView:
    """One of `nodes` by `policy`; ties go to fewer evictions, then the smaller node_id."""
    plans = evictions or {}

    def tie(node: NodeView) -> tuple[int, str]:
        return len(plans.get(node.node_id, ())), node.node_id

    if policy == "locality":
        return min(nodes, key=lambda n: (startup_estimate(n, fn)[1], *tie(n)))
    if policy == "least-loaded":
        return min(nodes, key=lambda n: (_load(n), n.slots_used, *tie(n)))
    return (rng if rng is not None else random.Random()).choice(sorted(nodes, key=tie))


def _load(node: NodeView) -> float:
    return node.memory_reserved / node.memory_total if node.memory_total > 0 else float("inf")


def _evictions(cluster: ClusterView, fn: FunctionView) -> dict[str, tuple[str, ...]]:
    """For each schedulable node where it works, the fewest idle instances of other functions,
    oldest idle first, whose stopping frees a slot and `fn.memory_bytes`."""
    plans: dict[str, tuple[str, ...]] = {}
    for node in cluster.nodes:
        if not node.schedulable:
            continue
        plan = _eviction_plan(node, cluster, fn)
        if plan is not None:
            plans[node.node_id] = plan
    return plans


def _eviction_plan(
    node: NodeView, cluster: ClusterView, fn: FunctionView
) -> tuple[str, ...] | None:
    idle = sorted(
        (
            inst
            for inst in cluster.instances_on(node.node_id)
            if inst.idle and inst.function != fn.name
        ),
        key=lambda inst: (_idle_since(inst, cluster.now), inst.instance_id),
    )
    free_memory, used_slots = node.memory_free, node.slots_used
    for count, inst in enumerate(idle, start=1):
        free_memory += inst.reserved_bytes
        used_slots -= 1
        if free_memory >= fn.memory_bytes and used_slots < node.slots_total:
            return tuple(victim.instance_id for victim in idle[:count])
    return None


def _idle_since(inst: InstanceView, now: float) -> float:
    return inst.idle_since if inst.idle_since is not None else now


def _no_room(cluster: ClusterView, fn: FunctionView) -> str:
    usable = [node for node in cluster.nodes if node.schedulable]
    need = f"{fn.name} needs {format_size(fn.memory_bytes, 1)} of memory and a free slot"
    if not usable:
        return f"no node is available to start {fn.name}; {need}"
    roomiest = max(usable, key=lambda n: (n.memory_free, n.node_id))
    largest = format_size(max(0, roomiest.memory_free), 1)
    return (
        f"no node has room to start {fn.name}: it needs {format_size(fn.memory_bytes, 1)} of "
        f"memory and a free slot; the largest free memory is {largest} "
        f"(node {roomiest.node_id}) and idle instances of other functions cannot free enough"
    )
