"""`AgentServicer`: the `NodeAgent` gRPC service over the checkpoint store and instances.

Typed errors become gRPC status codes here and nowhere else (`_CODES`); their messages say
what to do. Store calls (which do disk and network I/O) run in threads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from checkpoint_format.errors import CheckpointError
from node_agent.devices import GpuProbe
from node_agent.facts.tiers import TierName
from node_agent.instances import (
    Budget,
    DrainingError,
    InstanceError,
    InstanceExistsError,
    InstanceGoneError,
    InstanceManager,
    LoadRejectedError,
    NoRoomError,
    UnknownInstanceError,
    WorkerStartError,
)
from node_agent.metrics import NodeMetrics
from node_agent.proto import node_agent_pb2 as pb
from node_agent.proto import node_agent_pb2_grpc as pb_grpc
from node_agent.store import CheckpointStore, InvalidSourceError, StoreError, TooLargeError
from node_agent.store import NoRoomError as StoreNoRoomError

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (NoRoomError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreNoRoomError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnknownInstanceError, grpc.StatusCode.NOT_FOUND),
    (InstanceExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (InstanceGoneError, grpc.StatusCode.UNAVAILABLE),
    (DrainingError, grpc.StatusCode.UNAVAILABLE),
    (WorkerStartError, grpc.StatusCode.INTERNAL),
    (LoadRejectedError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidSourceError, grpc.StatusCode.INVALID_ARGUMENT),
    (StoreError, grpc.StatusCode.FAILED_PRECONDITION),
    (CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
    (InstanceError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_code(exc: Exception) -> grpc.StatusCode | None:
    """The gRPC code for a typed error (None: not one of ours, a bug)."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return None


def node_status(
    node_id: str,
    store: CheckpointStore,
    manager: InstanceManager,
    gpus: list[pb.GpuDevice] | None = None,
) -> pb.NodeStatus:
    """A snapshot of the node for Status replies and heartbeats. `gpus` is the latest probe;
    their free memory is reported net of what this node's instances reserved."""
    budget: Budget = manager.budget
    cpu = pb.CpuBudget(
        memory_budget_bytes=budget.memory_bytes,
        memory_reserved_bytes=budget.reserved_bytes,
        slots_total=budget.slots,
        slots_used=budget.used_slots,
    )
    arenas = {
        name: pb.Arena(
            path=str(a.path),
            size_bytes=a.size,
            free_bytes=a.free,
            largest_free_bytes=a.largest_free,
            startup_s=a.startup_s,
        )
        for name, a in store.arenas().items()
    }
    tiers = [
        pb.TierHoldings(
            tier=name.value,
            budget_bytes=store.config.budget_of(name),
            holdings=[
                pb.Holding(
                    key=h.key,
                    source=h.source,
                    sources=h.sources,
                    bytes=h.nbytes,
                    pinned=h.pinned > 0,
                )
                for h in held
            ],
            arena=arenas.get(name),
        )
        for name, held in store.holdings().items()
    ]
    return pb.NodeStatus(
        node_id=node_id,
        devices=pb.Devices(gpus=manager.report_gpus(gpus or []), cpu=cpu),
        tiers=tiers,
        bandwidths=[pb.Bandwidth(tier=t, bytes_per_s=b) for t, b in store.bandwidths().items()],
        instances=manager.infos(),
        draining=manager.draining,
        idle_workers=manager.idle_workers(),
    )


class AgentServicer(pb_grpc.NodeAgentServicer):
    """Implements `NodeAgent` (see node_agent.proto for each call's contract)."""

    def __init__(
        self,
        node_id: str,
        store: CheckpointStore,
        manager: InstanceManager,
        gpus: GpuProbe | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.manager = manager
        self.gpus = gpus or GpuProbe()
        self.metrics = metrics or NodeMetrics()

    async def _run(self, context: grpc.aio.ServicerContext, call: Callable[[], Any]) -> Any:
        try:
            return await call()
        except Exception as exc:
            code = status_code(exc)
            if code is None:
                raise
            await context.abort(code, str(exc))

    async def LoadInstance(self, request: pb.LoadInstanceRequest, context: Any) -> Any:
        async def load() -> pb.LoadInstanceReply:
            inst = await self.manager.load(request)
            reply = pb.LoadInstanceReply(
                instance_id=inst.instance_id,
                checkpoint_key=inst.key,
                weight_bytes=inst.held.weight_bytes,
                reserved_bytes=inst.held.total_bytes,
                pid=inst.worker.pid,
                timings=inst.timings,
                loaded_from=inst.loaded_from.value,
            )
            self.metrics.observe_load(reply)
            return reply

        return await self._run(context, load)

    async def UnloadInstance(self, request: pb.UnloadInstanceRequest, context: Any) -> Any:
        async def unload() -> pb.UnloadInstanceReply:
            await self.manager.unload(request.instance_id)
            return pb.UnloadInstanceReply()

        return await self._run(context, unload)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TokenEvent]:
        try:
            async for event in self.manager.generate(request):
                yield event
        except grpc.aio.AioRpcError as exc:  # the instance refused it: pass its status on
            await context.abort(exc.code(), exc.details() or "instance error")
        except InstanceError as exc:
            await context.abort(status_code(exc), str(exc))

    async def Migrate(
        self, feed: AsyncIterator[pb.MigrateFeed], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.MigrateEvent]:
        first = await anext(aiter(feed), None)
        if first is None or first.WhichOneof("kind") != "begin":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message is `begin`")
        assert first is not None
        try:
            async for event in self.manager.migrate(first, feed):
                yield event
        except grpc.aio.AioRpcError as exc:  # the instance refused it: pass its status on
            await context.abort(exc.code(), exc.details() or "instance error")
        except InstanceError as exc:
            await context.abort(status_code(exc), str(exc))

    async def Cancel(self, request: pb.CancelRequest, context: Any) -> Any:
        async def cancel() -> pb.CancelReply:
            await self.manager.cancel(
                request.instance_id, request.request_id, request.after_outputs
            )
            return pb.CancelReply()

        return await self._run(context, cancel)

    async def Prefetch(self, request: pb.PrefetchRequest, context: Any) -> Any:
        async def prefetch() -> pb.PrefetchReply:
            start = time.perf_counter()
            path = await asyncio.to_thread(
                self.store.ensure, request.source, request.tier or TierName.DRAM
            )
            held = self.store.locate(path.name)
            return pb.PrefetchReply(
                checkpoint_key=path.name,
                path=str(path),
                bytes=held.nbytes if held else 0,
                seconds=time.perf_counter() - start,
            )

        return await self._run(context, prefetch)

    async def Evict(self, request: pb.EvictRequest, context: Any) -> Any:
        async def evict() -> pb.EvictReply:
            freed = await asyncio.to_thread(
                self.store.evict, request.checkpoint_key, request.tier or TierName.DRAM
            )
            return pb.EvictReply(freed_bytes=freed)

        return await self._run(context, evict)

    async def Drain(self, request: pb.DrainRequest, context: Any) -> pb.DrainReply:
        self.manager.draining = True
        return pb.DrainReply(in_flight=self.manager.in_flight())

    async def Undrain(self, request: pb.UndrainRequest, context: Any) -> pb.UndrainReply:
        self.manager.draining = False
        return pb.UndrainReply()

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.NodeStatus:
        return node_status(self.node_id, self.store, self.manager, self.gpus.latest)
