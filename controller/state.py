"""The controller's live view of the cluster: nodes (from heartbeats), the instances it runs,
and every in-flight request's token-level state.

All of it lives on the event loop's thread and is changed without awaiting in between, so a
decision taken on a snapshot (`view()`) and the bookkeeping that follows it are atomic.
`changed()` wakes whoever waits for capacity (queued requests, the autoscaler).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from controller.cluster import ClusterView, FunctionView, InstanceStatus, InstanceView, NodeView
from controller.idle_times import IdleTimes
from controller.registry import FunctionRecord
from migration.request import RequestState
from node_agent.proto import node_agent_pb2 as pb


@dataclass
class NodeState:
    node_id: str
    address: str
    status: pb.NodeStatus
    last_seen: float
    """Controller clock (monotonic) of the last heartbeat."""
    alive: bool = True
    drain_requested: bool = False
    preemption: pb.Preemption | None = None
    """The node's preemption notice, once the controller has taken it."""

    @property
    def draining(self) -> bool:
        return self.drain_requested or self.status.draining or self.preempting

    @property
    def preempting(self) -> bool:
        """It will be taken back (an advisory notice does not count)."""
        return self.preemption is not None and self.preemption.deadline_unix > 0


@dataclass
class InstanceState:
    """An instance this controller started (or adopted from a node's heartbeat)."""

    instance_id: str
    function: str
    node_id: str
    source: str
    state: InstanceStatus = InstanceStatus.LOADING
    tier: str = ""
    """The tier the placement policy expected to load from (from the last heartbeat)."""
    loaded_from: str = ""
    """Where the node actually found the checkpoint (`LoadInstanceReply.loaded_from`: "dram",
    "disk", "remote", "local", "converted"); empty until loaded, or from an older node."""
    estimate_s: float = 0.0
    reserved_bytes: int = 0
    in_flight: int = 0
    idle_since: float | None = None
    started_at: float = field(default_factory=time.monotonic)
    load_ms: float = 0.0
    ready: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    stopping: bool = False
    gone: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    """Resolved when the instance is dropped (unloaded, or lost with its node)."""

    @property
    def source_tier(self) -> str:
        """Where it was loaded from: the node's answer once it has one, else the expectation."""
        return self.loaded_from or self.tier

    def view(self) -> InstanceView:
        return InstanceView(
            instance_id=self.instance_id,
            function=self.function,
            node_id=self.node_id,
            state=self.state,
            in_flight=self.in_flight,
            idle_since=self.idle_since,
            reserved_bytes=self.reserved_bytes,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "node": self.node_id,
            "state": self.state,
            "tier": self.source_tier or None,
            "in_flight": self.in_flight,
            "load_ms": round(self.load_ms, 1) if self.state == InstanceStatus.READY else None,
            "reserved_bytes": self.reserved_bytes,
        }


class ClusterState:
    """Nodes, instances and requests, plus a change signal."""

    def __init__(self, idle_times: IdleTimes | None = None) -> None:
        self.nodes: dict[str, NodeState] = {}
        self.instances: dict[str, InstanceState] = {}
        self.requests: dict[str, RequestState] = {}
        self.queued: dict[str, int] = {}
        self.unloaded: dict[str, str] = {}
        """Instance id -> node id of instances the node confirmed unloading, until a heartbeat
        stops listing them: a heartbeat taken before the unload must neither count them against
        the node nor bring them back as adopted instances."""
        self.idle_times = idle_times if idle_times is not None else IdleTimes()
        """Each function's idle periods, for adaptive keep-alive (fed by acquire/release)."""
        self._changed = asyncio.Event()

    # ---- change signal -------------------------------------------------------------------

    def notify(self) -> None:
        """Wake everyone waiting in `changed()`."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout: float) -> None:
        """Return when something changed, or after `timeout` seconds."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    # ---- instances -----------------------------------------------------------------------

    def new_instance(
        self, fn: FunctionRecord, node_id: str, tier: str, estimate_s: float
    ) -> InstanceState:
        inst = InstanceState(
            instance_id=f"{fn.name}-{uuid.uuid4().hex[:8]}",
            function=fn.name,
            node_id=node_id,
            source=fn.model.source,
            tier=tier,
            estimate_s=estimate_s,
            reserved_bytes=fn.memory_bytes,
        )
        self.instances[inst.instance_id] = inst
        self.notify()
        return inst

    def drop_instance(
        self, instance_id: str, error: BaseException | None = None
    ) -> InstanceState | None:
        inst = self.instances.pop(instance_id, None)
        if inst is not None and not inst.ready.done():
            inst.ready.set_exception(error or RuntimeError(f"instance {instance_id} stopped"))
            inst.ready.exception()  # retrieved: nobody may be waiting
        if inst is not None and not inst.gone.done():
            inst.gone.set_result(None)
        self.notify()
        return inst

    def acquire(self, inst: InstanceState) -> None:
        inst.in_flight += 1
        inst.idle_since = None
        self.idle_times.arrived(inst.function, time.monotonic())

    def release(self, inst: InstanceState) -> None:
        inst.in_flight -= 1
        if inst.in_flight == 0:
            inst.idle_since = time.monotonic()
            if not any(i.in_flight for i in self.of_function(inst.function)):
                self.idle_times.went_idle(inst.function, inst.idle_since)
        self.notify()

    def of_function(self, name: str) -> list[InstanceState]:
        return [i for i in self.instances.values() if i.function == name]

    # ---- snapshot for the pure policies --------------------------------------------------

    def scaling_view(self, fn: FunctionRecord) -> FunctionView:
        """`function_view` with what the autoscaler needs besides: the queue, when the function
        went idle and, for `keep_alive: adaptive`, the windows its idle times support."""
        scale = fn.spec.autoscaling
        windows = (
            self.idle_times.windows(fn.name, scale.fixed_keep_alive_s) if scale.adaptive else None
        )
        return dataclasses.replace(
            function_view(fn, self.queued.get(fn.name, 0)),
            windows=windows,
            idle_since=self.idle_times.idle_since(fn.name),
        )

    def view(self, exclude_nodes: frozenset[str] = frozenset()) -> ClusterView:
        now = time.monotonic()
        nodes = tuple(
            self._node_view(node, now)
            for node in self.nodes.values()
            if node.node_id not in exclude_nodes
        )
        instances = tuple(
            i.view()
            for i in self.instances.values()
            if not i.stopping and i.node_id not in exclude_nodes
        )
        return ClusterView(nodes=nodes, instances=instances, now=now)

    def routing_view(self, function: str) -> ClusterView:
        """A snapshot of `function`'s instances and the nodes they are on, no more: what
        `decide` needs to route a request to one of them (the warm path, per request). Any
        other decision needs the whole `view`."""
        now = time.monotonic()
        instances = tuple(
            i.view() for i in self.instances.values() if i.function == function and not i.stopping
        )
        on = {i.node_id for i in instances}
        nodes = tuple(self._node_view(n, now) for n in self.nodes.values() if n.node_id in on)
        return ClusterView(nodes=nodes, instances=instances, now=now)

    def _node_view(self, node: NodeState, now: float) -> NodeView:
        ours = [i for i in self.instances.values() if i.node_id == node.node_id]
        our_ids = {i.instance_id for i in ours}
        foreign = [
            i
            for i in node.status.instances
            if i.instance_id not in our_ids and i.instance_id not in self.unloaded
        ]
        cpu = node.status.devices.cpu
        gpus = node.status.devices.gpus
        memory_total = sum(g.total_bytes for g in gpus) if gpus else cpu.memory_budget_bytes
        reserved = sum(i.reserved_bytes for i in ours) + sum(i.reserved_bytes for i in foreign)
        queue_s = sum(
            max(0.0, i.estimate_s - (now - i.started_at))
            for i in ours
            if i.state == InstanceStatus.LOADING
        )
        holdings: dict[str, dict[str, int]] = {}
        for tier in node.status.tiers:
            held = holdings.setdefault(tier.tier, {})
            for h in tier.holdings:
                # Every source known to hold these bytes finds them (an older node reports
                # only `source`, the last one used).
                for source in (*h.sources, h.source):
                    if source:
                        held[source] = h.bytes
        return NodeView(
            node_id=node.node_id,
            memory_total=memory_total,
            memory_reserved=reserved,
            slots_total=cpu.slots_total or 1,
            slots_used=len(ours) + len(foreign),
            holdings=holdings,
            bandwidths={b.tier: b.bytes_per_s for b in node.status.bandwidths},
            loading_queue_s=queue_s,
            draining=node.draining,
            alive=node.alive,
        )


def function_view(fn: FunctionRecord, queued: int = 0) -> FunctionView:
    scale = fn.spec.autoscaling
    return FunctionView(
        name=fn.name,
        source=fn.model.source,
        checkpoint_bytes=fn.model.checkpoint_bytes,
        memory_bytes=fn.memory_bytes,
        min_instances=scale.min_instances,
        max_instances=scale.max_instances,
        target_concurrency=scale.target_concurrency,
        keep_alive_s=scale.fixed_keep_alive_s,
        queued=queued,
        slo_ttft_p99_s=fn.spec.slo.ttft_p99_s,
    )
