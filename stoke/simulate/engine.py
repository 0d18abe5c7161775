"""The discrete-event loop: requests arrive, are placed, load, decode and finish in virtual time.

Every decision is the controller's own function, called on frozen views built the way the
controller builds them: placement `controller.policy.decide` (per request, on the function's
routing view first and the whole cluster when that does not route, as the router does),
keep-alive `controller.autoscale.autoscale` every tick, the node autoscaler
`autoscaler.decide.decide` every tick (its demand from `autoscaler.demand.slots_needed`), and a
preempted node's drain `spot.plan.plan_drain` (the fleet, `stoke.simulate.fleet`). The modules
are called through their module objects, so a test that swaps one function sees the outcome
change.

The serving model: a request waits for its instance to load, is prefilled at the model's prefill
rate and decodes at its decode rate; up to target_concurrency requests batch on an instance
without slowing each other (continuous batching on a GPU, below its compute bound). A request
moved off a node (migration or a resume after a preemption) pays a prefill of everything it had
so far on its new instance (`spot.plan.move_estimate_s`) and loses no token.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import controller.autoscale as keepalive
import controller.policy as placement
from autoscaler.policy import PricedPolicy
from controller.autoscale import StartInstance, StopInstance
from controller.cluster import ClusterView, FunctionView
from controller.idle_times import IdleTimes
from spot.plan import move_estimate_s
from stoke.simulate.cluster import SimInstance, instance_view, node_view
from stoke.simulate.config import FunctionSpec, SimConfig
from stoke.simulate.events import Kind
from stoke.simulate.fleet import Fleet
from stoke.simulate.metrics import Counters, RunResult, Sample
from stoke.simulate.spot_market import SpotMarket
from stoke.simulate.workload import Arrival

RECENT_TTFTS = 100
"""First tokens per function the SLO check of the node demand looks at."""
DRAIN_LIMIT_S = 4 * 3600.0
"""After the last arrival, how long the run may go on finishing requests before the rest count
as lost."""


@dataclass(eq=False)
class Req:
    arrival: Arrival
    instance: str | None = None
    epoch: int = 0
    first_token_at: float | None = None
    produced: float = 0.0
    """Tokens generated before the current decode leg."""
    leg_start: float = 0.0
    rate: float = 1.0
    refused: bool = False

    def produced_by(self, now: float) -> float:
        extra = max(0.0, now - self.leg_start) * self.rate if self.first_token_at else 0.0
        return min(float(self.arrival.generated_tokens), self.produced + extra)


class Simulation:
    """One run: a policy, the functions and their arrivals, optional spot traces."""

    def __init__(
        self,
        label: str,
        policy: PricedPolicy,
        specs: Sequence[FunctionSpec],
        arrivals: Sequence[Arrival],
        market: SpotMarket,
        config: SimConfig,
    ) -> None:
        self.label, self.config = label, config
        self.specs = {s.name: s for s in specs}
        self.arrivals = arrivals
        self.rng = random.Random(config.seed)
        self.now = 0.0
        self.events: list[tuple[float, Kind, int, object]] = []
        self._seq = itertools.count()
        self.reqs: dict[int, Req] = {}
        self.queues: dict[str, collections.deque[int]] = {
            s.name: collections.deque() for s in specs
        }
        self.in_flight: dict[str, int] = {s.name: 0 for s in specs}
        self.recent: dict[str, collections.deque[float]] = {
            s.name: collections.deque(maxlen=RECENT_TTFTS) for s in specs
        }
        self.idle_times = IdleTimes()
        self.instances: dict[str, SimInstance] = {}
        self.by_function: dict[str, set[str]] = {s.name: set() for s in specs}
        self._version = 0
        self._cached: tuple[int, float, ClusterView] | None = None
        self._serial = itertools.count(1)
        self.counters = Counters()
        self.ttfts: list[float] = []
        self.timeline: list[Sample] = []
        self.fleet = Fleet(self, policy, market, config)
        self.warmup = config.warmup_s
        self.measuring = self.warmup <= 0

    # ---- the loop ----------------------------------------------------------------------------

    def push(self, at: float, kind: Kind, payload: object) -> None:
        heapq.heappush(self.events, (at, kind, next(self._seq), payload))

    def run(self) -> RunResult:
        """Replay every arrival, then let the work finish; returns what was measured."""
        horizon = self.warmup + self.config.hours * 3600.0
        for t in self.fleet.market.tick_times(horizon):
            self.push(t, Kind.SPOT, None)
        self.fleet.tick(0.0)
        self.push(self.config.tick_s, Kind.TICK, None)
        nxt = 0
        last_arrival = self.arrivals[-1].at if self.arrivals else 0.0
        while True:
            take_arrival = nxt < len(self.arrivals) and (
                not self.events or self.arrivals[nxt].at <= self.events[0][0]
            )
            if take_arrival:
                self.now = self.arrivals[nxt].at
                self.arrive(self.arrivals[nxt])
                nxt += 1
                continue
            if not self.events:
                break
            at, kind, _, payload = heapq.heappop(self.events)
            self.now = at
            if kind == Kind.TICK:
                if nxt >= len(self.arrivals) and (
                    self._settled() or at > last_arrival + DRAIN_LIMIT_S
                ):
                    break
                self.tick()
                self.push(at + self.config.tick_s, Kind.TICK, None)
            else:
                self.handle(kind, payload)
        end = max(horizon, self.now)
        self.fleet.bill(end)
        return self._result(end)

    def handle(self, kind: Kind, payload: object) -> None:
        if kind == Kind.NODE_READY:
            self.fleet.node_ready(str(payload))
            self.dispatch_all()
        elif kind == Kind.INSTANCE_READY:
            self._instance_ready(str(payload))
        elif kind in (Kind.FIRST_TOKEN, Kind.DONE):
            assert isinstance(payload, tuple)
            rid, epoch = payload
            req = self.reqs.get(rid)
            if req is not None and req.epoch == epoch:
                (self._first_token if kind == Kind.FIRST_TOKEN else self._done)(req)
        elif kind == Kind.SPOT:
            self.fleet.spot_tick(self.now)
        elif kind == Kind.DEADLINE:
            self.fleet.deadline(str(payload))

    def tick(self) -> None:
        """What the controller's loops do every interval: keep-alive, then the nodes."""
        if not self.measuring and self.now >= self.warmup:
            self.measuring = True
            self.fleet.restart_bill(self.now)
        self.keep_alive()
        self.fleet.tick(self.now)
        self.dispatch_all()
        if self.measuring and (not self.timeline or self.now - self.timeline[-1].t >= 60.0):
            self.timeline.append(self.fleet.sample(self.now))

    def _settled(self) -> bool:
        return not self.reqs

    # ---- requests ----------------------------------------------------------------------------

    def arrive(self, arrival: Arrival) -> None:
        self.counters.arrived += 1
        if arrival.at >= self.warmup:
            self.counters.measured += 1
        self.reqs[arrival.request_id] = Req(arrival)
        self.queues[arrival.function].append(arrival.request_id)
        self.dispatch(arrival.function)

    def dispatch_all(self) -> None:
        for name in self.queues:
            if self.queues[name]:
                self.dispatch(name)

    def dispatch(self, function: str) -> None:
        """Place the function's queued requests, oldest first, while the policy says where."""
        queue = self.queues[function]
        while queue:
            decision = self.place(function)
            if isinstance(decision, placement.Route):
                inst = self.instances[decision.instance_id]
            elif isinstance(decision, placement.ColdStart):
                inst = self.start_instance(function, decision)
            else:
                if isinstance(decision, placement.Refuse) and not self.reqs[queue[0]].refused:
                    self.reqs[queue[0]].refused = True
                    self.count("refused")
                return
            self.assign(self.reqs[queue.popleft()], inst)

    def place(self, function: str) -> placement.Decision:
        """The router's order: the function's own instances first, the whole cluster after."""
        fv = self.function_view(function)
        routing = self.view(function)
        decision = placement.decide(routing, fv, self.config.placement, self.rng)
        if isinstance(decision, placement.Route):
            return decision
        return placement.decide(self.view(), fv, self.config.placement, self.rng)

    def assign(self, req: Req, inst: SimInstance) -> None:
        """`req` takes a slot on `inst`: schedule its first token (or resumption) and its end."""
        spec = self.specs[inst.function]
        model = spec.model
        if not inst.requests:
            self._account_idle(inst)
        self.changed()
        inst.requests.add(req.arrival.request_id)
        inst.idle_since = None
        if self.in_flight[inst.function] == 0:
            self.idle_times.arrived(inst.function, self.now)
        self.in_flight[inst.function] += 1
        req.instance, req.rate = inst.instance_id, model.decode_tokens_per_s
        start = max(self.now, inst.ready_at)
        if req.first_token_at is None:
            prefill = req.arrival.context_tokens / model.prefill_tokens_per_s
            req.leg_start = start + self.config.first_token_overhead_s + prefill
            self.push(req.leg_start, Kind.FIRST_TOKEN, (req.arrival.request_id, req.epoch))
        else:
            context = req.arrival.context_tokens + int(req.produced)
            req.leg_start = start + move_estimate_s(context, model.prefill_tokens_per_s)
        left = req.arrival.generated_tokens - req.produced
        self.push(req.leg_start + left / req.rate, Kind.DONE, (req.arrival.request_id, req.epoch))

    def detach(self, req: Req) -> SimInstance:
        """Take `req` off its instance (it finished, or moves); its events go stale."""
        inst = self.instances[str(req.instance)]
        self.changed()
        req.produced = req.produced_by(self.now)
        req.epoch += 1
        req.instance = None
        inst.requests.discard(req.arrival.request_id)
        if not inst.requests:
            inst.idle_since = self.now
            inst.idle_from = max(self.now, inst.ready_at)
        self.in_flight[inst.function] -= 1
        if self.in_flight[inst.function] == 0:
            self.idle_times.went_idle(inst.function, self.now)
        return inst

    def move(self, rid: int, *, resumed: bool) -> None:
        """Take a request off its instance to the front of its function's queue; the caller
        stops what must stop and then dispatches, so it cannot land where it was."""
        req = self.reqs[rid]
        inst = self.detach(req)
        self.count("resumed" if resumed else "migrations")
        self.queues[inst.function].appendleft(rid)

    def _first_token(self, req: Req) -> None:
        req.first_token_at = self.now
        ttft = self.now - req.arrival.at
        self.recent[req.arrival.function].append(ttft)
        if req.arrival.at < self.warmup:
            return
        self.ttfts.append(ttft)
        if ttft <= self.specs[req.arrival.function].slo_ttft_s:
            self.counters.slo_met += 1

    def _done(self, req: Req) -> None:
        inst = self.detach(req)
        self.counters.completed += 1
        del self.reqs[req.arrival.request_id]
        self.dispatch(inst.function)

    # ---- instances ---------------------------------------------------------------------------

    def start_instance(self, function: str, cs: placement.ColdStart) -> SimInstance:
        for victim in cs.evict:
            self.stop_instance(victim)
        spec = self.specs[function]
        iid = f"{function}-i{next(self._serial)}"
        ready = self.now + cs.estimate_s + self.config.start_overhead_s
        inst = SimInstance(
            iid, function, cs.node_id, self.now, ready, spec.model.memory_bytes, cs.tier
        )
        self.instances[iid] = inst
        self.by_function[function].add(iid)
        self.changed()
        self.fleet.nodes[cs.node_id].instances.add(iid)
        if self.measuring:
            self.counters.cold_starts[cs.tier] = self.counters.cold_starts.get(cs.tier, 0) + 1
        self.push(ready, Kind.INSTANCE_READY, iid)
        return inst

    def _instance_ready(self, iid: str) -> None:
        inst = self.instances.get(iid)
        if inst is None:
            return
        self.changed()
        node = self.fleet.nodes.get(inst.node_id)
        if node is not None:
            node.loaded(
                inst.function, self.specs[inst.function].model.checkpoint_bytes, inst.origin
            )
        if not inst.requests:
            inst.idle_since = inst.idle_from = self.now

    def stop_instance(self, iid: str) -> None:
        """Unload `iid` (its requests, if any, must have moved)."""
        inst = self.instances.pop(iid)
        self.by_function[inst.function].discard(iid)
        self.changed()
        assert not inst.requests, f"stopping {iid} with requests on it"
        self._account_idle(inst)
        self.counters.instance_s += max(0.0, self.now - max(inst.placed_at, self.warmup))
        node = self.fleet.nodes.get(inst.node_id)
        if node is not None:
            node.instances.discard(iid)

    def _account_idle(self, inst: SimInstance) -> None:
        if inst.idle_from is not None:
            self.counters.idle_instance_s += max(0.0, self.now - max(inst.idle_from, self.warmup))
        inst.idle_from = None

    def count(self, counter: str) -> None:
        """One more of `counter` (a `Counters` field), once the warm-up is over."""
        if self.measuring:
            setattr(self.counters, counter, getattr(self.counters, counter) + 1)

    def keep_alive(self) -> None:
        """`controller.autoscale.autoscale` on this moment's view, carried out."""
        views = [self.function_view(name, scaling=True) for name in self.specs]
        for action in keepalive.autoscale(self.view(), views):
            if isinstance(action, StopInstance) and action.instance_id in self.instances:
                inst = self.instances[action.instance_id]
                for rid in sorted(inst.requests):
                    self.move(rid, resumed=False)
                self.stop_instance(action.instance_id)
                self.dispatch(inst.function)
            elif isinstance(action, StartInstance):
                fv = self.function_view(action.function)
                decision = placement.decide(self.view(), fv, self.config.placement, self.rng)
                if isinstance(decision, placement.ColdStart):
                    self.start_instance(action.function, decision)

    # ---- views -------------------------------------------------------------------------------

    def function_view(self, name: str, *, scaling: bool = False) -> FunctionView:
        spec = self.specs[name]
        windows = None
        if scaling and spec.adaptive:
            windows = self.idle_times.windows(name, spec.keep_alive_s)
        return FunctionView(
            name=name,
            source=name,
            checkpoint_bytes=spec.model.checkpoint_bytes,
            memory_bytes=spec.model.memory_bytes,
            min_instances=spec.min_instances,
            max_instances=spec.max_instances,
            target_concurrency=spec.target_concurrency,
            keep_alive_s=spec.keep_alive_s,
            queued=len(self.queues[name]),
            windows=windows,
            idle_since=self.idle_times.idle_since(name) if scaling else None,
            slo_ttft_p99_s=spec.slo_ttft_s,
        )

    def changed(self) -> None:
        """Something a view shows changed: the next `view()` is built afresh."""
        self._version += 1

    def view(self, function: str | None = None) -> ClusterView:
        """The whole registered cluster, or (routing view) `function`'s instances and the
        nodes they are on, as `controller.state` builds them."""
        if function is None and self._cached is not None:
            version, at, cached = self._cached
            if version == self._version and at == self.now:
                return cached
        if function is None:
            insts = list(self.instances.values())
            nodes = self.fleet.registered()
        else:
            insts = [self.instances[i] for i in sorted(self.by_function[function])]
            on = sorted({i.node_id for i in insts})
            nodes = [n for nid in on if (n := self.fleet.nodes.get(nid)) and n.registered]
        view = ClusterView(
            tuple(
                node_view(n, [self.instances[i] for i in sorted(n.instances)], self.now)
                for n in nodes
            ),
            tuple(instance_view(i, self.now) for i in insts),
            self.now,
        )
        if function is None:
            self._cached = (self._version, self.now, view)
        return view

    # ---- the result --------------------------------------------------------------------------

    def _result(self, end: float) -> RunResult:
        for iid in list(self.instances):
            inst = self.instances[iid]
            self._account_idle(inst)
            self.counters.instance_s += max(0.0, end - max(inst.placed_at, self.warmup))
        return RunResult(
            label=self.label,
            hours=(end - self.warmup) / 3600.0,
            ttfts=self.ttfts,
            counters=self.counters,
            cost_total=self.fleet.ledger.total,
            node_hours=dict(self.fleet.ledger.node_hours),
            cost_by_pool=dict(self.fleet.ledger.by_pool),
            timeline=self.timeline,
            notes=self.fleet.notes(),
        )
