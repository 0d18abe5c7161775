"""What the scheduling and autoscaling policies see: a frozen snapshot of nodes, instances and the
function being decided for. The registry builds one per decision; policies never change it.

Times are the controller's monotonic clock in seconds (`ClusterView.now`, `idle_since`); sizes are
bytes; bandwidths are bytes per second as measured and reported by each node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from autoscaler.keepalive import Windows
from node_agent.facts.tiers import Origin

DEFAULT_BANDWIDTH: dict[str, float] = {Origin.DRAM: 4e9, Origin.DISK: 1e9, Origin.REMOTE: 2e8}
"""Bytes/s per place a load can come from (`facts.tiers.LOAD_PLACES_FASTEST_FIRST`), used when
a node has not reported a (positive) bandwidth."""


class InstanceStatus(StrEnum):
    """Where a controller's instance is in its life (its `stopping` flag is apart: an instance of
    either status may be told to stop). The values are the `state` of the admin API's JSON and
    of the `stoke_instances` metric."""

    LOADING = "loading"
    """Placed and loading on its node; requests routed to it wait for it."""
    READY = "ready"
    """Loaded: serving requests."""


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One model instance on a node."""

    instance_id: str
    function: str
    node_id: str
    state: InstanceStatus
    in_flight: int  # routed here and not finished, including those waiting for it to load
    idle_since: float | None  # when in_flight last became 0; None while busy
    reserved_bytes: int

    @property
    def idle(self) -> bool:
        """Ready and serving nothing: the kind of instance keep-alive stops and eviction takes."""
        return self.state == InstanceStatus.READY and self.in_flight == 0


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node agent as last reported."""

    node_id: str
    memory_total: int  # bytes instances may reserve on this node
    memory_reserved: int
    slots_total: int
    slots_used: int
    holdings: Mapping[str, Mapping[str, int]]  # TierName -> {source: bytes}
    bandwidths: Mapping[str, float]  # Origin (dram, disk, remote) -> bytes/s
    loading_queue_s: float = 0.0  # seconds until loads already started here finish
    draining: bool = False
    alive: bool = True

    @property
    def memory_free(self) -> int:
        return self.memory_total - self.memory_reserved

    @property
    def schedulable(self) -> bool:
        """Whether new instances may start here."""
        return self.alive and not self.draining

    def has_room(self, memory_bytes: int) -> bool:
        """A free slot and `memory_bytes` of unreserved memory, on a schedulable node."""
        return (
            self.schedulable
            and self.slots_used < self.slots_total
            and self.memory_free >= memory_bytes
        )

    def bandwidth(self, tier: str) -> float:
        """Measured bytes/s for `tier`, or DEFAULT_BANDWIDTH when missing or not positive."""
        measured = self.bandwidths.get(tier)
        return measured if measured is not None and measured > 0 else DEFAULT_BANDWIDTH[tier]


@dataclass(frozen=True, slots=True)
class FunctionView:
    """A deployed function, as the policies need it."""

    name: str
    source: str  # the model source as deployed; holdings are keyed by it
    checkpoint_bytes: int
    memory_bytes: int  # what one instance reserves on a node
    min_instances: int
    max_instances: int
    target_concurrency: int
    keep_alive_s: float  # the fixed keep-alive (for `adaptive`, its fallback)
    queued: int = 0  # requests waiting in the router for this function
    windows: Windows | None = None
    """`keep_alive: adaptive`: the pre-warm and keep-alive windows from its idle times, which
    replace keep_alive_s; None: fixed keep-alive."""
    idle_since: float | None = None
    """When the function's last in-flight request finished (none in flight on any instance since);
    None while it serves, or when unknown (none finished since the controller started)."""
    slo_ttft_p99_s: float | None = None
    """`slo.ttft_p99`: the time to first token 99% of requests must beat; None: no target."""


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Every node and instance at controller time `now`."""

    nodes: tuple[NodeView, ...]
    instances: tuple[InstanceView, ...]
    now: float

    def instances_of(self, function: str) -> tuple[InstanceView, ...]:
        """The instances of `function`, in the order of `instances`."""
        return tuple(inst for inst in self.instances if inst.function == function)

    def instances_on(self, node_id: str) -> tuple[InstanceView, ...]:
        """The instances placed on `node_id`, in the order of `instances`."""
        return tuple(inst for inst in self.instances if inst.node_id == node_id)

    def find_node(self, node_id: str) -> NodeView | None:
        """The node named `node_id`, or None when the view has none."""
        return next((node for node in self.nodes if node.node_id == node_id), None)

    def node(self, node_id: str) -> NodeView:
        """The node named `node_id`; KeyError when the view has none."""
        found = self.find_node(node_id)
        if found is None:
            raise KeyError(f"no node {node_id!r} in the cluster view")
        return found
