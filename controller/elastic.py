"""The node autoscaler, carried out (`stoke controller --autoscale cluster.yaml`): every tick it
observes the nodes its providers launched, computes the instance slots the load needs, calls
`autoscaler.decide.decide` and does what it says. A launch asks the pool's provider for a node
with an id chosen here (it registers under it); a retirement drains the node by live migration,
waits until it runs nothing, then terminates it. A preempted spot node marks its zone short
(`Preemptions` calls `replace`), so the next launches go elsewhere or on-demand.

Facts are persisted in `<home>/autoscaler.json` (written atomically every tick): the nodes
launched (pool, zone, provider handle, when), those being retired, the decision state and the
cost ledger. Status is derived: after a restart the providers' `list_nodes` says which launched
nodes still exist; a node launched but never registered within `launch_timeout` is terminated
(and counts as a failed launch); nothing a provider launched is forgotten while it runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoscaler.cost import BilledNode, Ledger
from autoscaler.decide import (
    Decision,
    Demand,
    Launch,
    NodePhase,
    ObservedNode,
    PolicyState,
    Retire,
    decide,
    mark_short,
    record_launch_failure,
    record_launch_success,
)
from autoscaler.demand import FunctionLoad, slots_needed
from autoscaler.policy import Market, PricedPolicy
from autoscaler.providers import make_provider
from autoscaler.providers.base import (
    LaunchError,
    LaunchRequest,
    NodeStatus,
    Provider,
    ProviderNode,
)
from controller.draining import Draining
from controller.metrics import Metrics
from controller.migrations import Migrator
from controller.registry import FunctionRecord, Registry
from controller.state import ClusterState
from migration.live import Reason

log = logging.getLogger(__name__)

RECONCILE_S = 15.0
"""How often the providers are asked which nodes still exist."""
RETIRE_TIMEOUT_S = 300.0
"""A retiring node still running requests after this long is terminated anyway (they resume
elsewhere from their recorded tokens, as after a node failure)."""
HISTORY = 200
MOVE_RETRY_S = 1.0
"""How often a retiring node's requests that could not move yet are tried again."""


@dataclass
class LaunchedNode:
    node_id: str
    pool: str
    zone: str
    provider_id: str
    launched_unix: float
    retiring: bool = False
    registered: bool = False


@dataclass(frozen=True, slots=True)
class Event:
    unix: float
    action: str
    target: str
    reason: str


class Elastic:
    def __init__(
        self,
        policy: PricedPolicy,
        state: ClusterState,
        registry: Registry,
        functions: Callable[[], list[FunctionRecord]],
        draining: Draining,
        migrator: Migrator,
        metrics: Metrics,
        home: Path,
        secret: str,
        interval_s: float,
        cluster: str = "stoke",
    ) -> None:
        self.policy, self.state, self.registry = policy, state, registry
        self.functions, self.draining, self.migrator = functions, draining, migrator
        self.metrics, self.home, self.secret = metrics, home, secret
        self.interval_s, self.cluster = interval_s, cluster
        self.controller_address = ""
        """host:port of the gRPC server new nodes dial (set once it listens)."""
        self.providers: dict[str, Provider] = {}
        self.nodes: dict[str, LaunchedNode] = {}
        self.policy_state = PolicyState()
        self.ledger = Ledger()
        self.serials: dict[str, int] = {}
        """Pool -> the last node number it launched (node ids are `<pool>-<n>`)."""
        self.events: collections.deque[Event] = collections.deque(maxlen=HISTORY)
        self.last: Decision | None = None
        self.demand = Demand(0)
        self._tasks: set[asyncio.Task[None]] = set()
        self._launching: set[str] = set()
        self._retiring: set[str] = set()
        self._last_reconcile = -math.inf
        self._closing = False
        self._alive_unix: dict[str, float] = {}
        """Node -> when it was last seen alive (from this controller's start)."""
        self._load()

    # ---- the loop --------------------------------------------------------------------------

    async def run_forever(self) -> None:
        await self.reconcile()
        for node in list(self.nodes.values()):  # a previous controller stopped mid-retirement
            if node.retiring:
                self._spawn(self._retire(Retire(node.node_id, "resuming its retirement")))
        while True:
            try:
                await self.tick()
            except Exception:  # a bug here must not stop autoscaling for good
                log.exception("node autoscaler tick failed")
            await self.state.changed(self.interval_s)
            await asyncio.sleep(0.05)

    async def tick(self) -> None:
        now = time.monotonic()
        if now - self._last_reconcile >= RECONCILE_S:
            await self.reconcile()
        self._note_registrations()
        self._launch_timeouts()
        observed = self.observe()
        self.demand = self.need()
        decision = decide(now, observed, self.demand, self.policy, self.policy_state)
        self.policy_state, self.last = decision.state, decision
        for note in decision.notes:
            if not any(e.reason == note for e in list(self.events)[-5:]):
                log.info("autoscaler: %s", note)
                self._event("held", "", note)
        for action in decision.actions:
            if isinstance(action, Launch):
                self._spawn(self._launch(action))
            elif isinstance(action, Retire) and action.node_id not in self._retiring:
                self._spawn(self._retire(action))
        self._bill(observed)  # the actions are tasks not yet run: the nodes are as observed
        self._save()

    async def close(self, stop_nodes: bool) -> None:
        """Stop the loop's tasks; with `stop_nodes`, terminate what the local provider runs
        (cloud nodes stay: a restarted controller adopts them)."""
        self._closing = True  # no launch starts from now on
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._save()
        for name, provider in self.providers.items():
            if stop_nodes and name == "local":
                await asyncio.to_thread(provider.close)

    # ---- what is observed ------------------------------------------------------------------

    def observe(self) -> list[ObservedNode]:
        out = []
        for node in self.nodes.values():
            known = self.state.nodes.get(node.node_id)
            if node.retiring:
                phase = NodePhase.RETIRING
            elif known is not None and known.alive and known.preempting:
                phase = NodePhase.PREEMPTED
            elif known is not None and known.alive:
                phase = NodePhase.READY
            else:  # coming up, or registered once and silent (a controller restart): until
                phase = NodePhase.LAUNCHING  # it heartbeats, or its provider says it is gone
            running = sum(
                i.in_flight for i in self.state.instances.values() if i.node_id == node.node_id
            )
            launched_at = time.monotonic() - max(0.0, time.time() - node.launched_unix)
            out.append(
                ObservedNode(node.node_id, node.pool, node.zone, phase, launched_at, running)
            )
        return out

    def need(self) -> Demand:
        """Instance slots the load needs (`autoscaler.demand.slots_needed` per function), less
        what the nodes the autoscaler did not launch offer."""
        total, parts = 0, []
        running: dict[str, int] = {}
        for stream in self.migrator.router.streams.values():  # once each, even mid-migration
            running[stream.request.function] = running.get(stream.request.function, 0) + 1
        for fn in self.functions():
            scale = fn.spec.autoscaling
            slo = fn.spec.slo.ttft_p99_s
            count, why = slots_needed(
                FunctionLoad(
                    fn.name, running.get(fn.name, 0), self.state.queued.get(fn.name, 0),
                    scale.min_instances, scale.max_instances, scale.target_concurrency,
                    slo, self.metrics.recent_ttfts(fn.name) if slo is not None else (),
                    sum(not i.stopping for i in self.state.of_function(fn.name)),
                )
            )  # fmt: skip
            if count:
                parts.append(f"{fn.name}: {count} ({why})" if why else f"{fn.name}: {count}")
            total += count
        view = self.state.view()
        others = sum(
            n.slots_total for n in view.nodes if n.schedulable and n.node_id not in self.nodes
        )
        why = "; ".join(parts) or "no load"
        if others:
            why += f"; {others} slot(s) on nodes started by hand"
        return Demand(max(0, total - others), why)

    def _note_registrations(self) -> None:
        for node in self.nodes.values():
            known = self.state.nodes.get(node.node_id)
            if known is not None and known.alive and not node.registered:
                node.registered = True
                log.info("autoscaler: node %s (%s) registered", node.node_id, node.pool)

    def _launch_timeouts(self) -> None:
        """A node that never registered within launch_timeout, or has been silent that long
        since it last heartbeat, is terminated (a failed launch; the need launches again)."""
        limit = self.policy.policy.scaling.launch_timeout
        now = time.time()
        for node in list(self.nodes.values()):
            if node.retiring or node.node_id in self._launching | self._retiring:
                continue
            known = self.state.nodes.get(node.node_id)
            if known is not None and known.alive:
                self._alive_unix[node.node_id] = now
                continue
            since = self._alive_unix.setdefault(node.node_id, now)
            if not node.registered and now - node.launched_unix > limit:
                why = f"launched {limit:.0f} s ago and never registered"
            elif node.registered and now - since > limit:
                why = f"silent for {limit:.0f} s"
            else:
                continue
            self.policy_state = record_launch_failure(
                self.policy_state, self.policy, node.pool, node.zone,
                capacity=False, now=time.monotonic(),
            )  # fmt: skip
            self._spawn(self._retire(Retire(node.node_id, why)))

    async def reconcile(self) -> None:
        """Ask each provider which of its nodes exist: adopt those this state lost, drop those
        gone (a preempted or crashed node; a retirement finished by a previous controller)."""
        self._last_reconcile = time.monotonic()
        seen: dict[str, ProviderNode] = {}
        asked: set[str] = set()
        for name in self._provider_names():
            try:
                found = await asyncio.to_thread(self._provider(name).list_nodes)
            except Exception as exc:
                log.warning("autoscaler: listing %s nodes failed: %s", name, exc)
                continue
            asked.add(name)
            seen.update({n.node_id: n for n in found})
        pools = {p.name: p for p in self.policy.policy.pools}
        for node_id, pn in list(seen.items()):
            if pn.status is NodeStatus.GONE and pn.pool in pools:  # stopped: still costs its
                log.info("autoscaler: node %s is stopped; terminating it", node_id)  # disks
                stopped = self._provider(pools[pn.pool].provider)
                await asyncio.to_thread(stopped.terminate, pn)
                del seen[node_id]
                continue
            if node_id not in self.nodes and pn.pool in pools:
                log.info("autoscaler: adopting node %s of pool %s", node_id, pn.pool)
                self.nodes[node_id] = LaunchedNode(
                    node_id, pn.pool, pn.zone, pn.provider_id, pn.launched_unix
                )
        for node_id, node in list(self.nodes.items()):
            provider = pools[node.pool].provider if node.pool in pools else None
            if provider in asked and node_id not in seen and node_id not in self._launching:
                log.info("autoscaler: node %s is gone (its provider no longer lists it)", node_id)
                self._forget(node_id)

    # ---- carrying out ----------------------------------------------------------------------

    async def _launch(self, action: Launch) -> None:
        if self._closing:
            return
        pool = self.policy.policy.pool(action.pool)
        self.serials[pool.name] = self.serials.get(pool.name, 0) + 1
        node_id = f"{pool.name}-{self.serials[pool.name]}"
        request = LaunchRequest(node_id, pool, action.zone, self.controller_address, self.secret)
        self._launching.add(node_id)
        self.nodes[node_id] = LaunchedNode(node_id, pool.name, action.zone, "", time.time())
        self._save()
        log.info("autoscaler: launching %s in %s/%s: %s", node_id, pool.name, action.zone,
                 action.reason)  # fmt: skip
        self._event("launch", node_id, action.reason)
        try:
            launched = await asyncio.to_thread(self._provider(pool.provider).launch, request)
        except LaunchError as exc:
            self.nodes.pop(node_id, None)
            kind = "capacity" if exc.capacity else "error"
            log.warning("autoscaler: launching %s failed (%s): %s", node_id, kind, exc)
            self._event("launch_failed", node_id, f"{kind}: {exc}")
            self.metrics.autoscaler_actions.labels("launch_failed", pool.name).inc()
            self.policy_state = record_launch_failure(
                self.policy_state, self.policy, pool.name, action.zone,
                capacity=exc.capacity, now=time.monotonic(),
            )  # fmt: skip
            return
        finally:
            self._launching.discard(node_id)
            self.state.notify()
        self.nodes[node_id] = dataclasses.replace(
            self.nodes[node_id], provider_id=launched.provider_id
        )
        self.metrics.autoscaler_actions.labels("launch", pool.name).inc()
        self.policy_state = record_launch_success(self.policy_state, pool.name)
        self._save()

    async def _retire(self, action: Retire) -> None:
        node = self.nodes.get(action.node_id)
        if node is None or node.node_id in self._retiring:
            return
        self._retiring.add(node.node_id)
        node.retiring = True
        self._save()
        log.info("autoscaler: retiring %s: %s", node.node_id, action.reason)
        self._event("retire", node.node_id, action.reason)
        self.metrics.autoscaler_actions.labels("retire", node.pool).inc()
        try:
            known = self.state.nodes.get(node.node_id)
            if known is not None and known.alive:
                try:
                    await self.draining.drain(node.node_id, migrate=True)
                except Exception as exc:  # unreachable now: it is terminated all the same
                    log.warning("autoscaler: draining %s: %s", node.node_id, exc)
                await self._until_empty(node.node_id)
            pool = self.policy.policy.pool(node.pool)
            handle = ProviderNode(
                node.node_id, node.pool, node.zone, node.provider_id, NodeStatus.RUNNING, 0.0
            )
            await asyncio.to_thread(self._provider(pool.provider).terminate, handle)
            log.info("autoscaler: %s terminated", node.node_id)
            self._event("terminated", node.node_id, action.reason)
            self._forget(node.node_id)
        finally:
            self._retiring.discard(node.node_id)
            self.state.notify()
            self._save()

    async def _until_empty(self, node_id: str) -> None:
        """Until the node runs nothing. Requests the drain could not move (no room anywhere
        yet: an instance elsewhere still unloading, a node still starting) are tried again
        every MOVE_RETRY_S, so a retirement does not wait for them to finish."""
        deadline = time.monotonic() + RETIRE_TIMEOUT_S
        next_move = time.monotonic() + MOVE_RETRY_S
        while time.monotonic() < deadline:
            instances = [i for i in self.state.instances.values() if i.node_id == node_id]
            running = self.migrator.streams_on(node_id=node_id)
            if not instances and not running:
                return
            if running and time.monotonic() >= next_move:
                await self.migrator.migrate_many(running, Reason.DRAIN)
                next_move = time.monotonic() + MOVE_RETRY_S
            await self.state.changed(MOVE_RETRY_S)
        log.warning("autoscaler: %s still busy after %.0f s; terminating it", node_id,
                    RETIRE_TIMEOUT_S)  # fmt: skip

    async def replace(self, node_id: str, why: str) -> None:
        """A node got a preemption notice (`Preemptions`' capacity seam): spot in its zone is
        taken for short, so replacements go to other zones, or on-demand; the node itself stops
        counting as capacity at once."""
        node = self.nodes.get(node_id)
        if node is None:
            log.info("autoscaler: %s is preempted but was not launched by it: no replacement",
                     node_id)  # fmt: skip
            return
        pool = self.policy.policy.pool(node.pool)
        if pool.market is Market.SPOT:
            until = time.monotonic() + self.policy.policy.spot.return_to_spot_after
            self.policy_state = mark_short(self.policy_state, node.pool, node.zone, until)
        self._event("preempted", node_id, why)
        self.state.notify()

    def _forget(self, node_id: str) -> None:
        self.nodes.pop(node_id, None)
        known = self.state.nodes.pop(node_id, None)
        if known is not None:
            self.registry.delete_node(node_id)
        self.state.notify()

    # ---- cost --------------------------------------------------------------------------------

    def _bill(self, observed: list[ObservedNode]) -> None:
        pools = {p.name: p for p in self.policy.policy.pools}
        billed = []
        for node in self.nodes.values():
            if node.pool not in pools or (not node.provider_id and node.node_id in self._launching):
                continue
            functions: dict[str, int] = {}
            for inst in self.state.instances.values():
                if inst.node_id == node.node_id:
                    functions[inst.function] = functions.get(inst.function, 0) + 1
            billed.append(
                BilledNode(node.node_id, node.pool, self.policy.price(node.pool),
                           pools[node.pool].offers.slots, functions)
            )  # fmt: skip
        self.ledger.advance(time.time(), billed)
        self.metrics.spend_per_hour.set(self.ledger.per_hour)
        self.metrics.spend_total.set(self.ledger.total)
        for function, spent in self.ledger.by_function.items():
            self.metrics.function_spend.labels(function).set(spent)
        self.metrics.autoscaler_nodes.clear()
        for obs in observed:
            market = pools[obs.pool].market.value if obs.pool in pools else "?"
            self.metrics.autoscaler_nodes.labels(obs.pool, market, obs.phase.value).inc()

    # ---- reporting ---------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """`GET /admin/autoscaler` and `stoke autoscaler`."""
        observed = {n.node_id: n for n in self.observe()}
        cap = self.policy.policy.budget.max_per_hour
        pools = []
        for pool in self.policy.policy.pools:
            mine = [n for n in observed.values() if n.pool == pool.name]
            short = {
                key.split("/", 1)[1]: round(until - time.monotonic(), 1)
                for key, until in self.policy_state.short_until.items()
                if key.startswith(pool.name + "/")
            }
            pools.append({
                "name": pool.name, "provider": pool.provider, "market": pool.market.value,
                "instance_type": pool.instance_type, "price_per_hour": self.policy.price(pool.name),
                "price_source": self.policy.sources[pool.name], "slots_per_node": pool.offers.slots,
                "min_nodes": pool.min_nodes, "max_nodes": pool.max_nodes,
                "nodes": [
                    {"node_id": n.node_id, "zone": n.zone, "phase": n.phase.value,
                     "running": n.running}
                    for n in sorted(mine, key=lambda n: n.node_id)
                ],
                "short_zones_s": short,
                "launch_failures": self.policy_state.failures.get(pool.name, 0),
            })  # fmt: skip
        last = self.last
        return {
            "pools": pools,
            "demand": {"slots": self.demand.slots, "why": self.demand.why},
            "need_slots": last.need_slots if last else None,
            "held": list(last.notes) if last else [],
            "budget": {"max_per_hour": cap, "spend_per_hour": round(self.ledger.per_hour, 6)},
            "cost": self.cost(),
            "events": [dataclasses.asdict(e) for e in list(self.events)[-50:]],
        }

    def cost(self) -> dict[str, Any]:
        """`stoke cost`: spend per hour now and so far, by pool and by function."""
        return {
            "per_hour": round(self.ledger.per_hour, 6),
            "total": round(self.ledger.total, 6),
            "budget_per_hour": self.policy.policy.budget.max_per_hour,
            "by_pool": {k: round(v, 6) for k, v in sorted(self.ledger.by_pool.items())},
            "node_hours": {k: round(v, 6) for k, v in sorted(self.ledger.node_hours.items())},
            "by_function": {k: round(v, 6) for k, v in sorted(self.ledger.by_function.items())},
        }

    def _event(self, action: str, target: str, reason: str) -> None:
        self.events.append(Event(round(time.time(), 3), action, target, reason))

    # ---- plumbing ----------------------------------------------------------------------------

    def _provider_names(self) -> list[str]:
        return sorted({p.provider for p in self.policy.policy.pools})

    def _provider(self, name: str) -> Provider:
        if name not in self.providers:
            self.providers[name] = make_provider(
                name, home=self.home, cluster=self.cluster, pools=self.policy.policy.pools
            )
        return self.providers[name]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def _path(self) -> Path:
        return self.home / "autoscaler.json"

    def _save(self) -> None:
        data = {
            "serials": self.serials,
            "nodes": [dataclasses.asdict(n) for n in self.nodes.values()],
            "ledger": self.ledger.to_json(),
            "failures": dict(self.policy_state.failures),
        }
        fd, tmp = tempfile.mkstemp(dir=self.home, prefix=".autoscaler-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self._path)

    def _load(self) -> None:
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("autoscaler: %s unreadable (%s): starting afresh", self._path, exc)
            return
        self.serials = {str(k): int(v) for k, v in (data.get("serials") or {}).items()}
        for raw in data.get("nodes", []):
            with contextlib.suppress(TypeError, KeyError):
                node = LaunchedNode(**raw)
                self.nodes[node.node_id] = node
        self.ledger = Ledger.from_json(data.get("ledger") or {})
        failures = {str(k): int(v) for k, v in (data.get("failures") or {}).items()}
        self.policy_state = PolicyState(failures=failures)
