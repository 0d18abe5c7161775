"""The node autoscaler's decisions, as one pure function:

    decide(now, nodes, demand, policy, state) -> Decision(actions, state, ...)

`nodes` is the cluster as observed (what each provider launched and whether it registered),
`demand` the instance slots the load needs now, `policy` the priced cluster policy and `state`
what the previous call left. The controller carries out the actions (`Launch`, `Retire`) and
calls again every tick; the simulator calls the same function in virtual time.

The node count follows demand through these stages, in this order, each a small function of its
own: upscale and downscale **delays** (the need must persist), **smoothing** (an exponential
average of the need), **cooldowns** (no change against the last one too soon), **bounds**
(every pool's min_nodes and max_nodes) and the **budget** (no launch past `max_per_hour`).
Pools are chosen SpotHedge-style (SkyServe, EuroSys'25): the cheapest slot first, spot spread
over zones with `over_provision` extra nodes, on-demand while spot is short (a launch refused
for capacity, or a preemption, marks the zone short for `return_to_spot_after`), and back to
spot once it returns: the on-demand fallbacks retire when spot capacity is ready again.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from autoscaler.policy import Market, Pool, PricedPolicy

BACKOFF_BASE_S = 10.0
BACKOFF_MAX_S = 300.0
MAX_LAUNCH_FAILURES = 3
"""Failed launches (not for capacity) in a row before a pool is set aside like a short one."""


class NodePhase(enum.StrEnum):
    LAUNCHING = "launching"
    """Launched by a provider; not registered yet."""
    READY = "ready"
    """Registered and taking work."""
    RETIRING = "retiring"
    """Being drained to be terminated: no capacity any more."""
    PREEMPTED = "preempted"
    """Got a preemption notice: going, no capacity any more."""


@dataclass(frozen=True, slots=True)
class ObservedNode:
    node_id: str
    pool: str
    zone: str
    phase: NodePhase
    launched_at: float
    """Controller time of the launch (or of its adoption after a restart)."""
    running: int = 0
    """Requests in flight on it (retirement prefers the idlest)."""


@dataclass(frozen=True, slots=True)
class Demand:
    slots: int
    """Instance slots the load needs now (per function: min_instances, or in-flight plus queued
    requests over target_concurrency, raised by one where its TTFT p99 misses the SLO)."""
    why: str = ""


@dataclass(frozen=True, slots=True)
class Launch:
    pool: str
    zone: str
    reason: str


@dataclass(frozen=True, slots=True)
class Retire:
    node_id: str
    reason: str


Action = Launch | Retire


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What `decide` remembers between calls (plain data: persisted as JSON)."""

    smoothed: float | None = None
    above_since: float | None = None
    below_since: float | None = None
    last_launch: float | None = None
    last_retire: float | None = None
    short_until: Mapping[str, float] = field(default_factory=dict)
    """`pool/zone` -> controller time until which spot there is taken for short."""
    failures: Mapping[str, int] = field(default_factory=dict)
    """Pool -> launch failures in a row (not for capacity)."""
    retry_at: Mapping[str, float] = field(default_factory=dict)
    """Pool -> no launch there before this time (backoff)."""


@dataclass(frozen=True, slots=True)
class Decision:
    actions: tuple[Action, ...]
    state: PolicyState
    need_slots: int
    """The need after delays and smoothing."""
    notes: tuple[str, ...] = ()
    """Why something due was not done (cooldown, bounds, budget, short spot)."""


def slots_of(pool: Pool) -> int:
    return pool.offers.slots


def hourly_cost(nodes: Sequence[ObservedNode], policy: PricedPolicy) -> float:
    """USD per hour of the nodes that are still running (every phase costs until terminated)."""
    return sum(policy.price(n.pool) for n in nodes if n.pool in policy.prices)


def record_launch_failure(
    state: PolicyState, policy: PricedPolicy, pool: str, zone: str, *, capacity: bool, now: float
) -> PolicyState:
    """A launch in `pool`/`zone` failed. For capacity: the zone is short until
    `return_to_spot_after`. Otherwise: backoff, and after MAX_LAUNCH_FAILURES the pool is set
    aside for `return_to_spot_after` as well (the fallback takes over; nothing loops forever)."""
    wait = policy.policy.spot.return_to_spot_after
    if capacity:
        return mark_short(state, pool, zone, now + wait)
    count = state.failures.get(pool, 0) + 1
    backoff = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (count - 1))
    if count >= MAX_LAUNCH_FAILURES:
        backoff = max(backoff, wait)
    return dataclasses.replace(
        state,
        failures={**state.failures, pool: count},
        retry_at={**state.retry_at, pool: now + backoff},
    )


def record_launch_success(state: PolicyState, pool: str) -> PolicyState:
    failures = {k: v for k, v in state.failures.items() if k != pool}
    retry_at = {k: v for k, v in state.retry_at.items() if k != pool}
    return dataclasses.replace(state, failures=failures, retry_at=retry_at)


def mark_short(state: PolicyState, pool: str, zone: str, until: float) -> PolicyState:
    """Spot in `pool`/`zone` is short until `until` (a refused launch, or a preemption)."""
    return dataclasses.replace(state, short_until={**state.short_until, f"{pool}/{zone}": until})


def decide(
    now: float,
    nodes: Sequence[ObservedNode],
    demand: Demand,
    policy: PricedPolicy,
    state: PolicyState,
) -> Decision:
    """The launches and retirements due now, and the state for the next call."""
    state = _expire(state, now)
    capacity = _capacity(nodes, policy, (NodePhase.LAUNCHING, NodePhase.READY))
    ready = _capacity(nodes, policy, (NodePhase.READY,))
    notes: list[str] = []

    # The spares go with the demand through every stage: added after the delays, they would
    # keep the need above capacity while a downscale waits, and launch a spare every tick.
    raw = demand.slots + _over_provision(nodes, policy, state, now)
    need, state = delays(now, raw, capacity, state, policy)
    need, state = smooth(need, state, policy)
    want = need

    actions: list[Action] = []
    grow = want > capacity
    shrink_ok = cooldown_allows(now, state, policy, shrinking=True)
    grow_ok = cooldown_allows(now, state, policy, shrinking=False)
    if grow and not grow_ok:
        notes.append(f"need {want} slots, have {capacity}: in cooldown after a retirement")
    launches = _plan_launches(now, nodes, want - capacity if grow and grow_ok else 0, policy, state)
    launches += _min_nodes(nodes, policy, state, now, launches)
    launches += _return_to_spot(now, nodes, want, policy, state, launches)
    launches, budget_notes = within_budget(nodes, launches, policy)
    notes += budget_notes
    actions.extend(launches)

    if not launches and shrink_ok:
        actions.extend(_plan_retirements(now, nodes, need, want, ready, policy, state))
    elif not launches and want < ready:
        notes.append(f"need {want} slots, have {ready}: in cooldown after a launch")
    if any(isinstance(a, Launch) for a in actions):
        state = dataclasses.replace(state, last_launch=now)
    if any(isinstance(a, Retire) for a in actions):
        state = dataclasses.replace(state, last_retire=now)
    return Decision(tuple(actions), state, need, tuple(notes))


# --- stages ---------------------------------------------------------------------------------


def delays(
    now: float, raw: int, capacity: int, state: PolicyState, policy: PricedPolicy
) -> tuple[int, PolicyState]:
    """The need to act on: `raw` once it has stayed above `capacity` for upscale_delay (or below
    it for downscale_delay); `capacity` until then."""
    s = policy.policy.scaling
    above = state.above_since if raw > capacity else None
    below = state.below_since if raw < capacity else None
    if raw > capacity and above is None:
        above = now
    if raw < capacity and below is None:
        below = now
    state = dataclasses.replace(state, above_since=above, below_since=below)
    if above is not None and now - above >= s.upscale_delay:
        return raw, state
    if below is not None and now - below >= s.downscale_delay:
        return raw, state
    return capacity, state


def smooth(need: int, state: PolicyState, policy: PricedPolicy) -> tuple[int, PolicyState]:
    """An exponential average of the need (`smoothing` is the newest sample's weight: 1 keeps
    the need as it is), rounded up."""
    alpha = policy.policy.scaling.smoothing
    prev = state.smoothed if state.smoothed is not None else float(need)
    value = prev + alpha * (need - prev)
    return math.ceil(value - 1e-9), dataclasses.replace(state, smoothed=value)


def cooldown_allows(
    now: float, state: PolicyState, policy: PricedPolicy, *, shrinking: bool
) -> bool:
    """No change against the direction of the last one within `cooldown` seconds of it."""
    last = state.last_launch if shrinking else state.last_retire
    return last is None or now - last >= policy.policy.scaling.cooldown


def within_budget(
    nodes: Sequence[ObservedNode], launches: list[Launch], policy: PricedPolicy
) -> tuple[list[Launch], list[str]]:
    """The launches that keep the hourly cost within `budget.max_per_hour`, in order."""
    cap = policy.policy.budget.max_per_hour
    if cap is None:
        return launches, []
    spend = hourly_cost(nodes, policy)
    kept: list[Launch] = []
    notes = []
    for launch in launches:
        price = policy.price(launch.pool)
        if spend + price > cap + 1e-9:
            notes.append(
                f"budget: launching in {launch.pool} (${price:.4g}/h) would cost "
                f"${spend + price:.4g}/h, over max_per_hour ${cap:.4g}"
            )
            continue
        spend += price
        kept.append(launch)
    return kept, notes


# --- pools ----------------------------------------------------------------------------------


def _expire(state: PolicyState, now: float) -> PolicyState:
    short = {k: v for k, v in state.short_until.items() if v > now}
    retry = {k: v for k, v in state.retry_at.items() if v > now}
    if len(short) == len(state.short_until) and len(retry) == len(state.retry_at):
        return state
    return dataclasses.replace(state, short_until=short, retry_at=retry)


def _capacity(
    nodes: Sequence[ObservedNode], policy: PricedPolicy, phases: tuple[NodePhase, ...]
) -> int:
    pools = {p.name: p for p in policy.policy.pools}
    return sum(slots_of(pools[n.pool]) for n in nodes if n.phase in phases and n.pool in pools)


def _active(nodes: Sequence[ObservedNode], pool: str) -> list[ObservedNode]:
    return [
        n for n in nodes if n.pool == pool and n.phase in (NodePhase.LAUNCHING, NodePhase.READY)
    ]


def _usable_zones(pool: Pool, state: PolicyState, now: float) -> list[str]:
    if now < state.retry_at.get(pool.name, -math.inf):
        return []
    if pool.market is not Market.SPOT:
        return list(pool.zones)
    return [z for z in pool.zones if state.short_until.get(f"{pool.name}/{z}", -math.inf) <= now]


def _zone_for(
    pool: Pool,
    zones: list[str],
    nodes: Sequence[ObservedNode],
    planned: Sequence[Launch],
    policy: PricedPolicy,
) -> str:
    """The usable zone with the fewest of the pool's nodes (spot: unless `spread_zones` is off,
    then the first usable zone)."""
    if pool.market is Market.SPOT and not policy.policy.spot.spread_zones:
        return zones[0]
    count = dict.fromkeys(zones, 0)
    for zone in [n.zone for n in _active(nodes, pool.name)] + [
        launch.zone for launch in planned if launch.pool == pool.name
    ]:
        if zone in count:
            count[zone] += 1
    return min(zones, key=lambda z: (count[z], zones.index(z)))


def _price_per_slot(pool: Pool, policy: PricedPolicy) -> float:
    return policy.price(pool.name) / slots_of(pool)


def _candidates(
    policy: PricedPolicy, state: PolicyState, now: float, *, spot_only: bool = False
) -> list[Pool]:
    """Pools to launch in, cheapest slot first; on-demand only as spot's fallback when the
    policy has spot pools (`spot.fallback`), and always when it has none."""
    pools = sorted(policy.policy.pools, key=lambda p: (_price_per_slot(p, policy), p.name))
    has_spot = any(p.market is Market.SPOT for p in pools)
    out = []
    for pool in pools:
        if pool.market is Market.ON_DEMAND and spot_only:
            continue
        if not _usable_zones(pool, state, now):
            continue
        out.append(pool)
    if has_spot and policy.policy.spot.fallback == "none":
        out = [p for p in out if p.market is Market.SPOT]
    return out


def _plan_launches(
    now: float,
    nodes: Sequence[ObservedNode],
    missing_slots: int,
    policy: PricedPolicy,
    state: PolicyState,
) -> list[Launch]:
    """Nodes for `missing_slots` more slots: spot first (cheapest), on-demand when spot has no
    room or is short, each within max_nodes."""
    has_spot = any(p.market is Market.SPOT for p in policy.policy.pools)

    def why(pool: Pool) -> str:
        if pool.market is Market.ON_DEMAND and has_spot:
            return (
                f"need {missing_slots} more slot(s): spot short or full, falling back to on-demand"
            )
        return f"need {missing_slots} more slot(s)"

    return _fill(_candidates(policy, state, now), missing_slots, nodes, policy, state, now, why)


def _fill(
    pools: Sequence[Pool],
    slots: int,
    nodes: Sequence[ObservedNode],
    policy: PricedPolicy,
    state: PolicyState,
    now: float,
    why: Callable[[Pool], str],
) -> list[Launch]:
    """Launches for `slots` more slots, from `pools` in order, each pool up to its max_nodes,
    each node in the pool's least-used usable zone."""
    planned: list[Launch] = []
    left = slots
    for pool in pools:
        while (
            left > 0
            and len(_active(nodes, pool.name)) + _count(planned, pool.name) < pool.max_nodes
        ):
            zone = _zone_for(pool, _usable_zones(pool, state, now), nodes, planned, policy)
            planned.append(Launch(pool.name, zone, why(pool)))
            left -= slots_of(pool)
    return planned


def _count(planned: Sequence[Launch], pool: str) -> int:
    return sum(1 for launch in planned if launch.pool == pool)


def _min_nodes(
    nodes: Sequence[ObservedNode],
    policy: PricedPolicy,
    state: PolicyState,
    now: float,
    planned: list[Launch],
) -> list[Launch]:
    """Launches that bring each pool up to its min_nodes (bounds)."""
    out: list[Launch] = []
    for pool in policy.policy.pools:
        zones = _usable_zones(pool, state, now)
        have = len(_active(nodes, pool.name)) + _count(planned, pool.name)
        for _ in range(pool.min_nodes - have):
            if not zones:
                break
            zone = _zone_for(pool, zones, nodes, planned + out, policy)
            out.append(Launch(pool.name, zone, f"min_nodes is {pool.min_nodes}, {have} running"))
    return out


def _over_provision(
    nodes: Sequence[ObservedNode], policy: PricedPolicy, state: PolicyState, now: float
) -> int:
    """Extra slots for `spot.over_provision` spare spot nodes, while spot can be had."""
    extra = policy.policy.spot.over_provision
    spot = _candidates(policy, state, now, spot_only=True)
    if not extra or not spot:
        return 0
    return extra * min(slots_of(p) for p in spot)


def _return_to_spot(
    now: float,
    nodes: Sequence[ObservedNode],
    want: int,
    policy: PricedPolicy,
    state: PolicyState,
    planned: list[Launch],
) -> list[Launch]:
    """Once spot can be had again, spot nodes for the slots that on-demand nodes beyond their
    pools' min_nodes (the fallbacks) now carry; those retire when the spot ones are ready."""
    if planned or not any(p.market is Market.SPOT for p in policy.policy.pools):
        return []
    spot = _candidates(policy, state, now, spot_only=True)
    fallback = 0
    for pool in policy.policy.pools:
        if pool.market is Market.ON_DEMAND:
            fallback += max(0, len(_active(nodes, pool.name)) - pool.min_nodes) * slots_of(pool)
    others = _capacity(nodes, policy, (NodePhase.LAUNCHING, NodePhase.READY)) - fallback
    if not spot or fallback == 0 or others >= want:
        return []
    return _fill(
        spot, want - others, nodes, policy, state, now,
        lambda _: "spot is back: replacing on-demand fallback nodes",
    )  # fmt: skip


def _plan_retirements(
    now: float,
    nodes: Sequence[ObservedNode],
    need: int,
    want: int,
    ready: int,
    policy: PricedPolicy,
    state: PolicyState,
) -> list[Retire]:
    """Ready nodes to retire while the rest still cover `want`: the most expensive slot first,
    then the idlest, never below a pool's min_nodes; one node per call (a drain takes time)."""
    pools = {p.name: p for p in policy.policy.pools}
    spare = ready - want
    if spare <= 0:
        return []
    counts = {name: len(_active(nodes, name)) for name in pools}
    candidates = sorted(
        (n for n in nodes if n.phase is NodePhase.READY and n.pool in pools),
        key=lambda n: (
            -_price_per_slot(pools[n.pool], policy),
            n.running,
            -n.launched_at,
            n.node_id,
        ),
    )
    for node in candidates:
        pool = pools[node.pool]
        if counts[node.pool] <= pool.min_nodes or slots_of(pool) > spare:
            continue
        price = policy.price(pool.name)
        why = f"need {want} slot(s), {ready} ready: {pool.name} costs ${price:.4g}/h"
        if pool.market is Market.ON_DEMAND and any(p.market is Market.SPOT for p in pools.values()):
            why += " (on-demand, spot covers the load)"
        return [Retire(node.node_id, why)]
    return []
