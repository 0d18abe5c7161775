"""The controller's side of the node protocol: Register/Heartbeat from agents, liveness, and
client stubs to call each agent's NodeAgent service.

A node that has not heartbeated for `node_timeout_s` is marked gone, and its instances with it
(requests on them fail over at the router). An instance this controller ran that a node stops
reporting in two heartbeats running (its process died) is dropped too. Instances a node reports
that the controller does not know (it restarted) are adopted when their source matches a
deployed function.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import grpc

from controller.cluster import InstanceStatus
from controller.registry import FunctionRecord, Registry
from controller.state import ClusterState, InstanceState, NodeState
from node_agent.auth import open_channel
from node_agent.proto import controller_pb2 as cpb
from node_agent.proto import controller_pb2_grpc as cpb_grpc
from node_agent.proto import node_agent_pb2 as pb
from node_agent.proto import node_agent_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class PreemptionHandler(Protocol):
    """Who acts on a node's preemption notice (`controller.preemption.Preemptions`)."""

    def notice(self, node_id: str, notice: pb.Preemption) -> tuple[float, int]: ...

    def back(self, node: NodeState) -> None: ...


class ControllerServicer(cpb_grpc.ControllerServicer):
    """Register, Heartbeat and Preempting: keeps `ClusterState.nodes` current, and passes
    preemption notices (from the RPC, or carried by a heartbeat) to `preemptions`."""

    def __init__(
        self,
        state: ClusterState,
        registry: Registry,
        functions: Callable[[], list[FunctionRecord]],
        heartbeat_interval_s: float,
        preemptions: PreemptionHandler | None = None,
    ) -> None:
        self.state = state
        self.registry = registry
        self.functions = functions
        self.heartbeat_interval_s = heartbeat_interval_s
        self.preemptions = preemptions
        self._missing: dict[str, int] = {}

    async def Register(self, request: cpb.RegisterRequest, context: Any) -> cpb.RegisterReply:
        if not request.node_id or not request.address:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "node_id and address are required"
            )
        self._update(request.node_id, request.address, request.status, registering=True)
        log.info("node %s registered at %s", request.node_id, request.address)
        return cpb.RegisterReply(heartbeat_interval_s=self.heartbeat_interval_s)

    async def Preempting(self, request: cpb.PreemptingRequest, context: Any) -> cpb.PreemptingReply:
        if self.state.nodes.get(request.node_id) is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"node {request.node_id!r} is not registered"
            )
        if self.preemptions is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this controller has no drains")
        assert self.preemptions is not None
        drain_by, running = self.preemptions.notice(request.node_id, request.preemption)
        return cpb.PreemptingReply(drain_by_unix=drain_by, requests_to_move=running)

    async def Heartbeat(self, request: cpb.HeartbeatRequest, context: Any) -> cpb.HeartbeatReply:
        node = self.state.nodes.get(request.node_id)
        if node is None:
            return cpb.HeartbeatReply(reregister=True)
        self._update(request.node_id, node.address, request.status)
        return cpb.HeartbeatReply()

    def _update(
        self, node_id: str, address: str, status: pb.NodeStatus, registering: bool = False
    ) -> None:
        now = time.monotonic()
        node = self.state.nodes.get(node_id)
        if node is None or node.address != address:
            drain = node.drain_requested if node else False
            preemption = node.preemption if node else None
            node = NodeState(node_id, address, status, now, drain_requested=drain)
            node.preemption = preemption
            self.state.nodes[node_id] = node
        else:
            if not node.alive:
                log.info("node %s is back", node_id)
            node.status, node.last_seen, node.alive = status, now, True
        if self.preemptions is not None:
            if status.HasField("preemption"):
                self.preemptions.notice(node_id, status.preemption)  # no-op if known
            elif registering and node.preemption is not None:
                self.preemptions.back(node)  # a new agent there, with no notice
        self._reconcile(node)
        self.registry.put_node(node_id, address, status.SerializeToString(), time.time())
        self.state.notify()

    def _reconcile(self, node: NodeState) -> None:
        reported = {i.instance_id: i for i in node.status.instances}
        for inst in list(self.state.instances.values()):
            if inst.node_id != node.node_id or inst.state != InstanceStatus.READY:
                continue
            if inst.instance_id in reported:
                self._missing.pop(inst.instance_id, None)
                continue
            misses = self._missing.get(inst.instance_id, 0) + 1
            self._missing[inst.instance_id] = misses
            if misses >= 2:
                log.warning("instance %s on %s is gone", inst.instance_id, node.node_id)
                self._missing.pop(inst.instance_id, None)
                self.state.drop_instance(inst.instance_id)
        for gone, where in list(self.state.unloaded.items()):
            if where == node.node_id and gone not in reported:
                del self.state.unloaded[gone]  # the node's reports have caught up
        by_source = {fn.model.source: fn.name for fn in self.functions()}
        for info in reported.values():
            if info.instance_id in self.state.instances or info.instance_id in self.state.unloaded:
                continue
            if info.state != pb.INSTANCE_STATE_READY or info.source not in by_source:
                continue
            inst = InstanceState(
                instance_id=info.instance_id,
                function=by_source[info.source],
                node_id=node.node_id,
                source=info.source,
                state=InstanceStatus.READY,
                reserved_bytes=info.reserved_bytes,
                idle_since=time.monotonic(),
                load_ms=info.timings.total_s * 1000,
                loaded_from=info.loaded_from,
            )
            inst.ready.set_result(None)
            self.state.instances[inst.instance_id] = inst
            log.info(
                "adopted instance %s of %s on %s", inst.instance_id, inst.function, node.node_id
            )


class NodeClients:
    """One authenticated channel per node address."""

    def __init__(self, secret: str, ca_file: Path | None = None) -> None:
        self.secret = secret
        self.ca_file = ca_file
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> pb_grpc.NodeAgentStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(address, secret=self.secret, ca_file=self.ca_file)
            self._channels[address] = channel
        return pb_grpc.NodeAgentStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


async def watch_liveness(state: ClusterState, timeout_s: float) -> None:
    """Forever: mark nodes silent for `timeout_s` gone and drop their instances."""
    while True:
        await asyncio.sleep(min(1.0, timeout_s / 4))
        now = time.monotonic()
        for node in state.nodes.values():
            if node.alive and now - node.last_seen > timeout_s:
                node.alive = False
                log.warning("node %s missed heartbeats for %.1f s: gone", node.node_id, timeout_s)
                for inst in [i for i in state.instances.values() if i.node_id == node.node_id]:
                    state.drop_instance(
                        inst.instance_id, ConnectionError(f"node {node.node_id} is gone")
                    )
                state.notify()


def restore_nodes(state: ClusterState, registry: Registry) -> None:
    """Nodes known before a restart, as not alive until they heartbeat."""
    for record in registry.nodes():
        status = pb.NodeStatus()
        if record.status:
            status.ParseFromString(record.status)
        status.ClearField("instances")
        state.nodes[record.node_id] = NodeState(
            record.node_id, record.address, status, last_seen=0.0, alive=False
        )
