"""Draining a node by hand (`stoke drain` / `stoke undrain`): a drained node takes no new
instances or requests; its running requests move off by live migration (or, with
`migrate=False`, finish where they are), and its instances stop once they have none."""

from __future__ import annotations

from typing import Any

from controller.errors import AdminError
from controller.lifecycle import InstanceLifecycle
from controller.migrations import Migrator
from controller.nodes import NodeClients
from controller.state import ClusterState, NodeState
from migration.live import Reason
from node_agent.proto import node_agent_pb2 as pb

NODE_RPC_TIMEOUT_S = 10.0


class Draining:
    def __init__(
        self,
        state: ClusterState,
        clients: NodeClients,
        lifecycle: InstanceLifecycle,
        migrator: Migrator,
    ) -> None:
        self.state, self.clients, self.lifecycle = state, clients, lifecycle
        self.migrator = migrator

    async def drain(self, node_id: str, migrate: bool = True) -> dict[str, Any]:
        """Tell the node (if alive) to drain, stop the controller's instances there, and
        (with `migrate`) move its running requests elsewhere now. Returns the admin API's
        answer: the node, the requests still running on it, and each migration's result."""
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
        self.migrator.abort_into(node_id=node_id, why=f"{node_id} is draining")
        moved: list[dict[str, Any]] = []
        if migrate:
            running = self.migrator.streams_on(node_id=node_id)
            moved = await self.migrator.migrate_many(running, Reason.DRAIN)
        left = len(self.migrator.streams_on(node_id=node_id))
        return {
            "node_id": node_id,
            "draining": True,
            "in_flight": left if migrate else in_flight,
            "migrations": moved,
        }

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
