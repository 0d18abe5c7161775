"""Instance lifecycle: start an instance on a node (`LoadInstance`), stop it (`UnloadInstance`),
and keep `ClusterState` true about it meanwhile.

`start_instance` records the instance as loading at once (it counts against its node's memory
and slots from that moment) and loads it in the background; requests routed to it wait on its
`ready` future. `stop_instance` takes it out of routing; it unloads when its last request ends.
An unloading instance still counts against its node until the node confirms it is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc

from controller.cluster import InstanceStatus
from controller.errors import LoadRejected, NoRoom
from controller.nodes import NodeClients
from controller.registry import FunctionRecord
from controller.state import ClusterState, InstanceState
from controller.tasks import BackgroundTasks
from node_agent.facts.tiers import TierName
from node_agent.proto import node_agent_pb2 as pb

log = logging.getLogger(__name__)

UNLOAD_TIMEOUT_S = 60.0


class InstanceLifecycle:
    def __init__(
        self,
        state: ClusterState,
        clients: NodeClients,
        tasks: BackgroundTasks,
        load_timeout_s: float,
        on_cold_start: Callable[[InstanceState], None] | None = None,
    ) -> None:
        self.state, self.clients, self.tasks = state, clients, tasks
        self.load_timeout_s = load_timeout_s
        self.on_cold_start = on_cold_start
        """Called once per instance this controller loaded, when it is ready."""

    def start_instance(
        self,
        fn: FunctionRecord,
        node_id: str,
        tier: str,
        estimate_s: float,
        after: Sequence[Awaitable[None]] = (),
    ) -> InstanceState:
        """Record a loading instance and load it on `node_id` in the background, once the
        unloads in `after` (evictions, or instances emptied by migration, making room for it)
        are done."""
        inst = self.state.new_instance(fn, node_id, tier, estimate_s)
        self.tasks.spawn(self._load(inst, fn, list(after)))
        return inst

    def stop_instance(self, instance_id: str, reason: str) -> asyncio.Task[None] | None:
        """Stop routing to it; unload it now if idle, else when its last request ends.
        Returns the unload task when it starts now."""
        inst = self.state.instances.get(instance_id)
        if inst is None or inst.stopping:
            return None
        inst.stopping = True
        log.info("stopping %s on %s: %s", instance_id, inst.node_id, reason)
        self.state.notify()
        if inst.in_flight == 0 and inst.state == InstanceStatus.READY:
            return self.tasks.spawn(self.unload(inst))
        return None

    async def unload(self, inst: InstanceState) -> None:
        """Unload on the node; until it is done the instance (marked stopping, so it takes no
        requests) still counts against the node's memory and slots."""
        inst.stopping = True
        node = self.state.nodes.get(inst.node_id)
        try:
            if node is not None and node.alive:
                await self.clients.stub(node.address).UnloadInstance(
                    pb.UnloadInstanceRequest(instance_id=inst.instance_id),
                    timeout=UNLOAD_TIMEOUT_S,
                )
                self.state.unloaded[inst.instance_id] = inst.node_id
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                self.state.unloaded[inst.instance_id] = inst.node_id
            else:
                log.warning("unload %s on %s: %s", inst.instance_id, inst.node_id, exc.details())
        finally:
            self.state.drop_instance(inst.instance_id)

    async def _load(
        self, inst: InstanceState, fn: FunctionRecord, after: list[Awaitable[None]]
    ) -> None:
        if after:
            results = await asyncio.gather(*after, return_exceptions=True)
            failed = [r for r in results if isinstance(r, NoRoom)]
            if failed:  # the room it waited for was not made: place the request elsewhere
                self.state.drop_instance(inst.instance_id, failed[0])
                return
        node = self.state.nodes.get(inst.node_id)
        if node is None:
            self.state.drop_instance(
                inst.instance_id, ConnectionError(f"node {inst.node_id} unknown")
            )
            return
        try:
            reply = await self.clients.stub(node.address).LoadInstance(
                _load_request(inst, fn, node.status), timeout=self.load_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            self.state.drop_instance(inst.instance_id, _load_error(exc))
            return
        self._loaded(inst, reply)
        if inst.instance_id not in self.state.instances or (inst.stopping and inst.in_flight == 0):
            await self.unload(inst)

    def _loaded(self, inst: InstanceState, reply: pb.LoadInstanceReply) -> None:
        """Mark `inst` ready as its node reported it, and wake the requests waiting for it."""
        inst.state = InstanceStatus.READY
        inst.loaded_from = reply.loaded_from
        inst.reserved_bytes = reply.reserved_bytes or inst.reserved_bytes
        inst.load_ms = reply.timings.total_s * 1000
        if inst.in_flight == 0:
            inst.idle_since = time.monotonic()
        if not inst.ready.done():
            inst.ready.set_result(None)
        if self.on_cold_start is not None:
            self.on_cold_start(inst)
        self.state.notify()


def _load_request(
    inst: InstanceState, fn: FunctionRecord, status: pb.NodeStatus
) -> pb.LoadInstanceRequest:
    engine = fn.spec.engine
    return pb.LoadInstanceRequest(
        instance_id=inst.instance_id,
        source=fn.model.source,
        tier=_load_tier(status, fn.model.checkpoint_bytes),
        engine=pb.EngineOptions(
            kv_cache_bytes=engine.kv_cache_bytes or 0,
            max_batch_size=engine.max_batch_size or 0,
            max_model_len=fn.context_length,
        ),
    )


def _load_error(exc: grpc.aio.AioRpcError) -> Exception:
    """What a failed `LoadInstance` means for placement: no room there (try another node), a
    refusal of the function as deployed (no node will take it), or a node that failed."""
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return NoRoom(exc.details() or "no room")
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return LoadRejected(exc.details() or "the node refused to load it")
    return ConnectionError(f"{exc.code().name}: {exc.details()}")


def _load_tier(status: pb.NodeStatus, nbytes: int) -> TierName:
    """DRAM when the checkpoint fits the node's DRAM tier, else disk."""
    for tier in status.tiers:
        if tier.tier == TierName.DRAM:
            return TierName.DRAM if nbytes <= tier.budget_bytes else TierName.DISK
    return TierName.DRAM
