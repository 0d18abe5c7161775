"""The simulated cluster's nodes and instances, and the frozen views the real policies read.

A node has the slots and memory its pool `offers`, DRAM and disk tiers (LRU by bytes) that keep
the checkpoints loaded there, and the GPU-node bandwidths; an instance holds one slot and its
function's memory from placement until stopped, loading until `ready_at`. `node_view` and
`instance_view` build exactly what `controller.state` builds from live nodes, so the
policies cannot tell a simulated cluster from a real one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from autoscaler.decide import NodePhase
from controller.cluster import InstanceStatus, InstanceView, NodeView
from node_agent.facts.tiers import Origin


class Tier:
    """Checkpoints held in one tier of a node, least recently used first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held: OrderedDict[str, int] = OrderedDict()

    def admit(self, source: str, nbytes: int) -> None:
        """Keep `source` (most recently used), evicting the least recently used to fit it."""
        if nbytes > self.capacity:
            return
        self.held.pop(source, None)
        while self.held and sum(self.held.values()) + nbytes > self.capacity:
            self.held.popitem(last=False)
        self.held[source] = nbytes


@dataclass(eq=False)
class SimNode:
    node_id: str
    pool: str
    zone: str
    slots: int
    memory_total: int
    launched_at: float
    dram: Tier
    disk: Tier
    bandwidth: Mapping[str, float]
    phase: NodePhase = NodePhase.LAUNCHING
    deadline: float | None = None
    """Preempted: when the node is gone."""
    instances: set[str] = field(default_factory=set)
    _holdings: dict[str, dict[str, int]] | None = None
    _view: tuple[object, NodeView] | None = None

    @property
    def draining(self) -> bool:
        return self.phase in (NodePhase.RETIRING, NodePhase.PREEMPTED)

    @property
    def registered(self) -> bool:
        return self.phase is not NodePhase.LAUNCHING

    def holdings(self) -> dict[str, dict[str, int]]:
        if self._holdings is None:
            self._holdings = {Origin.DRAM: dict(self.dram.held), Origin.DISK: dict(self.disk.held)}
        return self._holdings

    def loaded(self, source: str, nbytes: int, origin: str) -> None:
        """A load from `origin` finished: the store keeps the bytes on disk and in DRAM."""
        self._holdings = None
        if origin != Origin.DRAM:
            self.disk.admit(source, nbytes)
        elif source in self.disk.held:
            self.disk.held.move_to_end(source)
        self.dram.admit(source, nbytes)


@dataclass(eq=False)
class SimInstance:
    instance_id: str
    function: str
    node_id: str
    placed_at: float
    ready_at: float
    reserved_bytes: int
    origin: str
    requests: set[int] = field(default_factory=set)
    idle_since: float | None = None
    """When its last request finished (the controller's meaning; None before any)."""
    idle_from: float | None = None
    """For accounting: since when it has been loaded and serving nothing."""
    _view: tuple[object, InstanceView] | None = None

    def state(self, now: float) -> InstanceStatus:
        return InstanceStatus.LOADING if now < self.ready_at else InstanceStatus.READY


def instance_view(inst: SimInstance, now: float) -> InstanceView:
    """The controller's view of `inst` (reused while nothing it shows has changed: the
    simulator builds views for every request)."""
    key = (len(inst.requests), inst.idle_since, now >= inst.ready_at)
    if inst._view is not None and inst._view[0] == key:
        return inst._view[1]
    view = InstanceView(
        instance_id=inst.instance_id,
        function=inst.function,
        node_id=inst.node_id,
        state=inst.state(now),
        in_flight=len(inst.requests),
        idle_since=inst.idle_since if not inst.requests else None,
        reserved_bytes=inst.reserved_bytes,
    )
    inst._view = (key, view)
    return view


def node_view(node: SimNode, instances: Iterable[SimInstance], now: float) -> NodeView:
    """The controller's view of `node` (reused while nothing it shows has changed)."""
    mine = list(instances)
    loading = any(now < i.ready_at for i in mine)
    key = (frozenset(node.instances), node.phase, id(node.holdings()), now if loading else None)
    if node._view is not None and node._view[0] == key:
        return node._view[1]
    queue = sum(max(0.0, i.ready_at - now) for i in mine if i.state(now) is InstanceStatus.LOADING)
    view = NodeView(
        node_id=node.node_id,
        memory_total=node.memory_total,
        memory_reserved=sum(i.reserved_bytes for i in mine),
        slots_total=node.slots,
        slots_used=len(mine),
        holdings=node.holdings(),
        bandwidths=node.bandwidth,
        loading_queue_s=queue,
        draining=node.draining,
    )
    node._view = (key, view)
    return view
