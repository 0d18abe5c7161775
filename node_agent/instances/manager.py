"""`InstanceManager`: model instances on pooled worker processes, within the node's budget.

Load = take a slot -> `store.ensure(source, tier, pin=True)` (fetch) -> check the KV cache
holds one sequence (`placement.check_kv_cache`) -> reserve its memory (`placement.reserve`:
host, or one GPU on a GPU node) -> take a pre-started worker for that device (queue) -> worker
`Load` (read + build). Every step that fails undoes the earlier ones. A watcher per instance
notices its process exiting (crash, OOM kill) and frees its slot, bytes and pin at once.

Unload = mark the instance stopping (Status lists it as STOPPING; it takes no new requests) ->
stop its process -> in one step with no await between: unpin its checkpoint, drop it from the
table, free its bytes and slot. So whoever sees an instance gone from Status may evict its
checkpoint at once, and the checkpoint is never unpinned while the process still maps it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc

from checkpoint_format import read_manifest
from node_agent.instances import placement
from node_agent.instances.budget import Budget
from node_agent.instances.errors import (
    DrainingError,
    InstanceExistsError,
    InstanceGoneError,
    LoadRejectedError,
    UnknownInstanceError,
    WorkerStartError,
)
from node_agent.instances.gpus import GpuLedger
from node_agent.instances.placement import Reservation
from node_agent.instances.pool import Worker, WorkerPool
from node_agent.proto import node_agent_pb2 as pb
from node_agent.store import CheckpointStore, Ensured, Origin, TierName
from node_agent.store.config import parse_tier

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_BYTES = 256 << 20


@dataclass
class Instance:
    """A loaded model instance: its process, what it holds, and what it costs the node."""

    instance_id: str
    source: str
    key: str
    tier: TierName
    worker: Worker
    held: Reservation
    timings: pb.LoadTimings
    loaded_from: Origin
    running: int = 0
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    releasing: asyncio.Task[None] | None = field(default=None, repr=False)
    """Set when the unload starts; the instance leaves the table when it is done."""

    def info(self) -> pb.InstanceInfo:
        """This instance as reported in Status and heartbeats."""
        return pb.InstanceInfo(
            instance_id=self.instance_id,
            source=self.source,
            checkpoint_key=self.key,
            state=pb.INSTANCE_STATE_STOPPING if self.releasing else pb.INSTANCE_STATE_READY,
            pid=self.worker.pid,
            running_requests=self.running,
            reserved_bytes=self.held.total_bytes,
            timings=self.timings,
            loaded_from=self.loaded_from.value,
        )


class InstanceManager:
    """Loads, serves and unloads instances. All methods run on the agent's event loop.

    `pools` has one worker pool per device an instance can be placed on: key None on a CPU
    node (`gpus` None), each GPU's index on a GPU node (`gpus` its ledger)."""

    def __init__(
        self,
        store: CheckpointStore,
        pools: Mapping[int | None, WorkerPool],
        budget: Budget,
        gpus: GpuLedger | None = None,
    ) -> None:
        devices = [None] if gpus is None else gpus.indexes
        assert set(pools) == set(devices), f"pools for {sorted(map(str, pools))}, not {devices}"
        self.store = store
        self.pools = pools
        self.budget = budget
        self.gpus = gpus
        self.instances: dict[str, Instance] = {}
        self._loading: set[str] = set()
        self._releasing: set[asyncio.Task[None]] = set()  # strong refs to shielded releases
        self.draining = False

    async def load(self, request: pb.LoadInstanceRequest) -> Instance:
        """Start an instance of `request.source`; raises `NoRoomError`, `DrainingError`,
        `InstanceExistsError`, `WorkerStartError` or the store's `StoreError`s."""
        if self.draining:
            raise DrainingError("the node is draining; load the instance on another node")
        iid = request.instance_id or f"inst-{uuid.uuid4().hex[:12]}"
        if iid in self.instances or iid in self._loading:
            raise InstanceExistsError(f"instance {iid!r} already exists; unload it or pick an id")
        self.budget.take_slot()
        self._loading.add(iid)
        try:
            return await self._load(iid, request)
        except BaseException:
            self.budget.free_slot()
            raise
        finally:
            self._loading.discard(iid)

    async def _load(self, iid: str, request: pb.LoadInstanceRequest) -> Instance:
        start = time.perf_counter()
        tier = parse_tier(request.tier or TierName.DRAM)
        ensured = await self._fetch_pinned(request.source, tier)
        path = ensured.path
        fetched = time.perf_counter()
        try:
            kv = request.engine.kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
            manifest = read_manifest(path)
            on_gpu = self.gpus is not None
            placement.check_kv_cache(path, manifest, kv, request.engine.max_model_len, on_gpu)
            what = f"instance {iid!r} ({request.source})"
            held = placement.reserve(self.budget, self.gpus, manifest, kv, what)
            try:
                return await self._start(iid, request, ensured, held, (start, fetched))
            except BaseException:
                placement.release(self.budget, self.gpus, held)
                raise
        except BaseException:
            self.store.unpin(path.name, tier)
            raise

    async def _fetch_pinned(self, source: str, tier: TierName) -> Ensured:
        """`store.ensure_with_origin(pin=True)` in a thread; if we are cancelled meanwhile, the
        fill goes on (other loads may share it) and its pin is dropped when it completes."""
        fill = asyncio.ensure_future(
            asyncio.to_thread(self.store.ensure_with_origin, source, tier, pin=True)
        )
        try:
            return await asyncio.shield(fill)
        except asyncio.CancelledError:
            fill.add_done_callback(lambda done: self._unpin_result(done, tier))
            raise

    def _unpin_result(self, done: asyncio.Future[Ensured], tier: TierName) -> None:
        if not done.cancelled() and done.exception() is None:
            self.store.unpin(done.result().path.name, tier)

    async def _start(
        self,
        iid: str,
        request: pb.LoadInstanceRequest,
        ensured: Ensured,
        held: Reservation,
        clock: tuple[float, float],
    ) -> Instance:
        """Take a worker for `held`'s device and load `ensured.path` in it. `clock`:
        perf_counter at the start and when the fetch finished."""
        start, fetched = clock
        path = ensured.path
        worker = await self.pools[held.gpu].acquire()
        acquired = time.perf_counter()
        engine = pb.EngineOptions()
        engine.CopyFrom(request.engine)
        engine.kv_cache_bytes = engine.kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
        try:
            reply = await worker.stub.Load(pb.LoadRequest(path=str(path), engine=engine))
        except BaseException as exc:
            await worker.stop()
            if not isinstance(exc, grpc.aio.AioRpcError):
                raise
            if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:  # the engine refused the model
                raise LoadRejectedError(f"loading {request.source}: {exc.details()}") from None
            raise WorkerStartError(f"loading {request.source}: {exc.details()}") from None
        timings = pb.LoadTimings(
            fetch_s=fetched - start,
            queue_s=acquired - fetched,
            read_build_s=reply.read_build_s,
            total_s=time.perf_counter() - start,
        )
        tier = parse_tier(request.tier or TierName.DRAM)
        inst = Instance(iid, request.source, path.name, tier, worker, held, timings, ensured.origin)
        inst.watcher = asyncio.get_running_loop().create_task(self._watch(inst))
        self.instances[iid] = inst
        where = "CPU" if held.gpu is None else f"GPU {held.gpu}"
        log.info(
            "instance %s ready on %s (pid %d) in %.2f s", iid, where, worker.pid, timings.total_s
        )
        return inst

    async def _watch(self, inst: Instance) -> None:
        code = await inst.worker.proc.wait()
        if self.instances.get(inst.instance_id) is inst:
            if inst.releasing is None:
                log.warning(
                    "instance %s (pid %d) exited with %s", inst.instance_id, inst.worker.pid, code
                )
            await self._release(inst)

    async def _release(self, inst: Instance) -> None:
        """Stop `inst` and return everything it held; returns when that is done (a second call
        for the same instance waits for the first).

        The stop and the bookkeeping run as one shielded task: a caller cancelled mid-way (a
        client's deadline passing during the SIGTERM grace) must not leak the pin, the bytes,
        the slot or the process. Until it is done the instance stays listed, as STOPPING.
        """
        if self.instances.get(inst.instance_id) is not inst:
            return
        if inst.releasing is None:
            inst.releasing = asyncio.ensure_future(self._stop_and_free(inst))
            self._releasing.add(inst.releasing)
            inst.releasing.add_done_callback(self._releasing.discard)
        await asyncio.shield(inst.releasing)

    async def _stop_and_free(self, inst: Instance) -> None:
        try:
            await inst.worker.stop()
        finally:
            # No await from here on: Status (served on this loop) sees the instance with its
            # pin, or neither, so an Evict after the instance is gone never finds it pinned.
            try:
                self.store.unpin(inst.key, inst.tier)
            finally:
                del self.instances[inst.instance_id]
                placement.release(self.budget, self.gpus, inst.held)
                self.budget.free_slot()

    def get(self, instance_id: str) -> Instance:
        """The serving instance with that id; `UnknownInstanceError` if there is none (or it is
        being unloaded)."""
        inst = self.instances.get(instance_id)
        if inst is None or inst.releasing is not None:
            raise _unknown(instance_id)
        return inst

    async def unload(self, instance_id: str) -> None:
        """Terminate the instance's process and free its slot, memory and pin; returns when
        all of that is done (also when an unload of it is already under way)."""
        inst = self.instances.get(instance_id)
        if inst is None:
            raise _unknown(instance_id)
        await self._release(inst)

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.TokenEvent]:
        """Relay one request's events from its instance. Raises `InstanceGoneError` if the
        process exits mid-stream; other instance errors pass through as `AioRpcError`."""
        if self.draining:
            raise DrainingError("the node is draining; send the request to another node")
        inst = self.get(request.instance_id)
        inst.running += 1
        try:
            async for event in inst.worker.stub.Generate(request):
                yield event
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNAVAILABLE or not inst.worker.alive:
                raise _gone(inst, exc.details() or exc.code().name) from None
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # our caller cancelled us: propagate
                raise
            # Not ours: the watcher closed the dead worker's channel under the call.
            raise _gone(inst, "its process exited") from None
        finally:
            inst.running -= 1

    async def cancel(self, instance_id: str, request_id: str) -> None:
        """Stop one request; its stream ends with an ABORT event."""
        await self.get(instance_id).worker.stub.Cancel(pb.CancelRequest(request_id=request_id))

    def in_flight(self) -> int:
        """Requests being generated on this node."""
        return sum(inst.running for inst in self.instances.values())

    def infos(self) -> list[pb.InstanceInfo]:
        """Every live instance, stopping ones included (loading ones are not listed)."""
        return [inst.info() for inst in self.instances.values()]

    def idle_workers(self) -> int:
        """Pre-started workers waiting for a `Load`, over every device's pool."""
        return sum(pool.idle for pool in self.pools.values())

    def report_gpus(self, probed: list[pb.GpuDevice]) -> list[pb.GpuDevice]:
        """`probed` as Status reports it: free memory net of this node's reservations."""
        return probed if self.gpus is None else self.gpus.report(probed)

    async def close(self) -> None:
        """Unload every instance (terminating its process), and finish pending releases."""
        for inst in list(self.instances.values()):
            await self._release(inst)
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)


def _unknown(instance_id: str) -> UnknownInstanceError:
    return UnknownInstanceError(
        f"no instance {instance_id!r} on this node (not loaded, unloaded, or it died); "
        "see Status for the instances this node runs"
    )


def _gone(inst: Instance, why: str) -> InstanceGoneError:
    return InstanceGoneError(
        f"instance {inst.instance_id!r} (pid {inst.worker.pid}) went away mid-generation ({why}); "
        "resume the request elsewhere from its prompt and emitted tokens"
    )
