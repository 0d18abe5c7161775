"""The simulated fleet: nodes launched, registered, retired and preempted, and what they cost.

Every tick the node autoscaler's own function decides (`autoscaler.decide.decide` on the
observed nodes and the demand `autoscaler.demand.slots_needed` gives, exactly as
`controller.elastic` computes them), and the fleet carries the actions out: a launch registers
`boot_s` later unless the spot traces refuse it for capacity (`record_launch_failure`, the zone
goes short); a retirement moves the node's requests away (live migration) and terminates it. A
trace drop preempts nodes with a notice: the zone is marked short (`mark_short`, as
`Elastic.replace` does), `spot.plan.plan_drain` says which requests move now and which may
finish there, and whatever is still there at the deadline resumes elsewhere from its tokens.
Every node is billed from launch to termination by the autoscaler's `Ledger`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import autoscaler.decide as nodes_policy
import autoscaler.demand as demand
import spot.plan as drain
from autoscaler.cost import BilledNode, Ledger
from autoscaler.decide import Launch, NodePhase, ObservedNode, PolicyState, Retire
from autoscaler.policy import Market, Pool, PricedPolicy
from stoke.errors import StokeError
from stoke.simulate.cluster import SimNode, Tier
from stoke.simulate.config import SimConfig
from stoke.simulate.events import Kind
from stoke.simulate.metrics import Sample
from stoke.simulate.spot_market import SpotMarket

if TYPE_CHECKING:
    from stoke.simulate.engine import Simulation

PREEMPTION_MARGIN_S = 10.0
"""The controller's default `preemption_margin_s`."""
PREEMPTION_MAX_CONCURRENT = 4
"""The controller's default `preemption_max_concurrent`."""


def node_memory(pool: Pool) -> int:
    """Bytes instances may reserve on one of the pool's nodes: its GPUs', else its CPU memory."""
    offers = pool.offers
    memory = offers.gpus * offers.gpu_memory if offers.gpus else offers.cpu_memory
    if memory <= 0:
        raise StokeError(
            f"pools.{pool.name}.offers: give gpus and gpu_memory (or cpu_memory) so the "
            f"simulator knows what fits on a node"
        )
    return memory


class Fleet:
    def __init__(
        self, sim: Simulation, policy: PricedPolicy, market: SpotMarket, config: SimConfig
    ) -> None:
        self.sim, self.policy, self.market, self.config = sim, policy, market, config
        self.pools = {p.name: p for p in policy.policy.pools}
        self.memory = {p.name: node_memory(p) for p in policy.policy.pools}
        self.nodes: dict[str, SimNode] = {}
        self.state = PolicyState()
        self.ledger = Ledger()
        self.serials: dict[str, int] = {}
        self.held: set[str] = set()

    def registered(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.registered]

    # ---- the autoscaler ----------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self.bill(now)
        observed = [
            ObservedNode(n.node_id, n.pool, n.zone, n.phase, n.launched_at, self._running(n))
            for n in self.nodes.values()
        ]
        decision = nodes_policy.decide(now, observed, self.demand(), self.policy, self.state)
        self.state = decision.state
        self.held.update(decision.notes)
        for action in decision.actions:
            if isinstance(action, Launch):
                self.launch(action, now)
            elif isinstance(action, Retire):
                self.retire(action.node_id)

    def demand(self) -> nodes_policy.Demand:
        """`controller.elastic.Elastic.need`, on the simulated functions."""
        total = 0
        sim = self.sim
        instances: dict[str, int] = {}
        for inst in sim.instances.values():
            instances[inst.function] = instances.get(inst.function, 0) + 1
        for name, spec in sim.specs.items():
            count, _ = demand.slots_needed(
                demand.FunctionLoad(
                    name, sim.in_flight[name], len(sim.queues[name]), spec.min_instances,
                    spec.max_instances, spec.target_concurrency, spec.slo_ttft_s,
                    tuple(sim.recent[name]), instances.get(name, 0),
                )
            )  # fmt: skip
            total += count
        return nodes_policy.Demand(total)

    def launch(self, action: Launch, now: float) -> None:
        pool = self.pools[action.pool]
        if pool.market is Market.SPOT:
            ours = sum(
                1 for n in self.nodes.values() if n.pool == pool.name and n.zone == action.zone
            )
            if not self.market.has_room(pool.name, action.zone, ours, now):
                self.sim.count("launch_refusals")
                self.state = nodes_policy.record_launch_failure(
                    self.state, self.policy, pool.name, action.zone, capacity=True, now=now
                )
                return
        serial = self.serials[pool.name] = self.serials.get(pool.name, 0) + 1
        shape = self.config.node
        node = SimNode(
            node_id=f"{pool.name}-{serial}", pool=pool.name, zone=action.zone,
            slots=pool.offers.slots, memory_total=self.memory[pool.name], launched_at=now,
            dram=Tier(shape.dram_bytes), disk=Tier(shape.disk_bytes), bandwidth=shape.bandwidth,
        )  # fmt: skip
        self.nodes[node.node_id] = node
        if self.sim.measuring:
            launches = self.sim.counters.launches
            launches[pool.name] = launches.get(pool.name, 0) + 1
        self.state = nodes_policy.record_launch_success(self.state, pool.name)
        self.sim.push(now + self.config.boot_s, Kind.NODE_READY, node.node_id)

    def node_ready(self, node_id: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.phase is NodePhase.LAUNCHING:
            node.phase = NodePhase.READY
            self.sim.changed()

    def retire(self, node_id: str) -> None:
        """Drain by live migration, then terminate."""
        node = self.nodes.get(node_id)
        if node is None or node.phase is not NodePhase.READY:
            return
        node.phase = NodePhase.RETIRING
        self.sim.changed()
        self._empty(node, resumed=False)

    # ---- spot --------------------------------------------------------------------------------

    def spot_tick(self, now: float) -> None:
        for pool, zone in list(self.market.zones):
            ours = sorted(
                (
                    n
                    for n in self.nodes.values()
                    if n.pool == pool
                    and n.zone == zone
                    and n.phase in (NodePhase.LAUNCHING, NodePhase.READY)
                ),
                key=lambda n: (n.launched_at, n.node_id),
            )
            for node_id in self.market.takes(pool, zone, [n.node_id for n in ours], now):
                self.preempt(self.nodes[node_id], now)

    def preempt(self, node: SimNode, now: float) -> None:
        """A notice: the zone goes short, the drain plan moves what cannot finish in time."""
        self.sim.count("preemptions")
        until = now + self.policy.policy.spot.return_to_spot_after
        self.state = nodes_policy.mark_short(self.state, node.pool, node.zone, until)
        if node.phase is NodePhase.LAUNCHING:
            self.bill(now)
            del self.nodes[node.node_id]  # never registered: nothing on it
            return
        node.phase, node.deadline = NodePhase.PREEMPTED, now + self.config.notice_s
        self.sim.changed()
        self.sim.push(node.deadline, Kind.DEADLINE, node.node_id)
        sim = self.sim
        moved = set()
        for iid in sorted(node.instances):
            inst = sim.instances[iid]
            model = sim.specs[inst.function].model
            running = [
                drain.Running(
                    str(rid),
                    sim.reqs[rid].arrival.context_tokens + int(sim.reqs[rid].produced_by(now)),
                    sim.reqs[rid].arrival.generated_tokens - int(sim.reqs[rid].produced_by(now)),
                    model.decode_tokens_per_s,
                )
                for rid in sorted(inst.requests)
                if sim.reqs[rid].first_token_at is not None
            ]
            plan = drain.plan_drain(
                running, self.config.notice_s, margin_s=PREEMPTION_MARGIN_S,
                prefill_tokens_per_s=model.prefill_tokens_per_s,
                max_concurrent=PREEMPTION_MAX_CONCURRENT,
            )  # fmt: skip
            staying = set(plan.finish)
            for _ in inst.requests:
                sim.count("preempted_requests")
            for rid in sorted(inst.requests):
                if str(rid) not in staying:
                    sim.move(rid, resumed=False)
                    moved.add(inst.function)
        self._stop_idle(node)
        for function in sorted(moved):
            sim.dispatch(function)

    def deadline(self, node_id: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None:
            self._empty(node, resumed=True)

    # ---- helpers -----------------------------------------------------------------------------

    def _empty(self, node: SimNode, *, resumed: bool) -> None:
        """Move every request off `node`, stop its instances, terminate it."""
        sim = self.sim
        functions = set()
        for iid in sorted(node.instances):
            inst = sim.instances[iid]
            for rid in sorted(inst.requests):
                sim.move(rid, resumed=resumed)
            functions.add(inst.function)
            sim.stop_instance(iid)
        self.bill(sim.now)
        del self.nodes[node.node_id]
        sim.changed()
        for function in sorted(functions):
            sim.dispatch(function)

    def _stop_idle(self, node: SimNode) -> None:
        for iid in sorted(node.instances):
            if not self.sim.instances[iid].requests:
                self.sim.stop_instance(iid)

    def _running(self, node: SimNode) -> int:
        return sum(len(self.sim.instances[i].requests) for i in node.instances)

    def restart_bill(self, now: float) -> None:
        """The warm-up is over: spend is counted from `now`."""
        self.ledger = Ledger()
        self.bill(now)

    def bill(self, now: float) -> None:
        billed = []
        for node in self.nodes.values():
            functions: dict[str, int] = {}
            for iid in node.instances:
                fn = self.sim.instances[iid].function
                functions[fn] = functions.get(fn, 0) + 1
            pool = self.pools[node.pool]
            billed.append(
                BilledNode(
                    node.node_id, node.pool, self.policy.price(node.pool), pool.offers.slots,
                    functions,
                )
            )  # fmt: skip
        self.ledger.advance(now, billed)

    def sample(self, now: float) -> Sample:
        counts: dict[str, int] = {}
        for node in self.nodes.values():
            counts[node.pool] = counts.get(node.pool, 0) + 1
        return Sample(now, counts, self.ledger.per_hour, self.ledger.total)

    def notes(self) -> list[str]:
        out = []
        if self.market.zones:
            out.append("spot zones: " + ", ".join(self.market.describe()))
        return out
