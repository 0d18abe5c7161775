"""Draining a node by hand (`stoke drain` / `stoke undrain`): a drained node takes no new
instances or requests, and its instances stop once their requests end."""

from __future__ import annotations

from typing import Any

from controller.errors import AdminError
from controller.lifecycle import InstanceLifecycle
from controller.nodes import NodeClients
from controller.state import ClusterState, NodeState
from node_agent.proto import node_agent_pb2 as pb

NODE_RPC_TIMEOUT_S = 10.0


class Draining:
    def __init__(
        self, state: ClusterState, clients: NodeClients, lifecycle: InstanceLifecycle
    ) -> None:
        self.state, self.clients, self.lifecycle = state, clients, lifecycle

    async def drain(self, node_id: str) -> dict[str, Any]:
        """Tell the node (if alive) to drain, and stop the controller's instances there.
        Returns the admin API's answer: the node and the requests still running on it."""
        node = self._node(node_id)
        node.drain_requested = True
        in_flight = 0
        if node.alive:
            reply = await self.clients.stub(node.address).Drain(
                pb.DrainRequest(), timeout=NODE_RPC_TIMEOUT_S
            )
            in_flight = reply.in_flight
        for inst in [i for i in self.state.instances.values() if i.node_id == node_id]:
            self.lifecycle.stop_instance(inst.instance_id, reason="node draining")
        self.state.notify()
        return {"node_id": node_id, "draining": True, "in_flight": in_flight}

    async def undrain(self, node_id: str) -> dict[str, Any]:
        """Undo `drain`: the node takes new instances and requests again (its instances
        stopped by the drain stay stopped; new ones start as traffic asks)."""
        node = self._node(node_id)
        if not node.alive:
            raise AdminError(
                409, f"node {node_id!r} is not heartbeating; start its agent, then undrain it."
            )
        await self.clients.stub(node.address).Undrain(
            pb.UndrainRequest(), timeout=NODE_RPC_TIMEOUT_S
        )
        node.drain_requested = False
        node.status.draining = False  # until its next heartbeat says so itself
        self.state.notify()
        return {"node_id": node_id, "draining": False}

    def _node(self, node_id: str) -> NodeState:
        node = self.state.nodes.get(node_id)
        if node is None:
            raise AdminError(404, f"no node {node_id!r}; list nodes with GET /admin/nodes.")
        return node
