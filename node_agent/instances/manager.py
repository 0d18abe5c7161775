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
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from checkpoint_format import Manifest, read_manifest
from node_agent.facts.sizing import DEFAULT_KV_CACHE_BYTES
from node_agent.facts.tiers import Origin, TierName, parse_tier
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
from node_agent.instances.streaming import LoadTap, streamable
from node_agent.landing import open_either
from node_agent.proto import node_agent_pb2 as pb
from node_agent.store import CheckpointStore, Ensured

log = logging.getLogger(__name__)

CLOSE_FILLS_WAIT_S = 10.0
REPLACE_AFTER_S = 5.0
"""A worker taken for an instance is replaced (its pool starts a new one) when the instance
sends its first event, or this long after the load at the latest: a replacement's start-up
(importing torch, mapping the DRAM arena: seconds of CPU) would otherwise compete with the very
cold start that took its predecessor, on a node with few cores."""


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
    pinned: bool = True
    """Holds a pin on its checkpoint (a streamed load gets it when the copy is committed)."""
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    feeder: asyncio.Task[None] | None = field(default=None, repr=False)
    """A streamed load: tells the worker which bytes have landed, until the copy is done."""
    releasing: asyncio.Task[None] | None = field(default=None, repr=False)
    """Set when the unload starts; the instance leaves the table when it is done."""
    replace: Callable[[], None] | None = field(default=None, repr=False)
    """Starts its worker's replacement now; None once started (see `REPLACE_AFTER_S`)."""

    def served(self) -> None:
        """Its cold start is over (it sent an event, or it is going): replace its worker."""
        if self.replace is not None:
            replace, self.replace = self.replace, None
            replace()

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
        self._fills: set[asyncio.Future[Ensured]] = set()  # store fills in flight
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
        # On a CPU node, a promotion into DRAM is streamed into the worker as it runs.
        tap = LoadTap() if tier is TierName.DRAM and self.gpus is None else None
        fill = self._fill_pinned(request.source, tier, tap)
        if tap is not None:
            first: list[asyncio.Future[Any]] = [fill, tap.started]
            try:
                await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                fill.add_done_callback(lambda done: self._unpin_result(done, tier))
                raise
            if not fill.done() and tap.started.done():
                staging, _, data = tap.started.result()
                manifest = Manifest.from_json(data, source=f"{staging} (being copied)")
                if streamable(manifest):
                    return await self._load_streamed(iid, request, fill, tap, manifest, start)
        ensured = await self._await_fill(fill, tier)
        path = ensured.path
        fetched = time.perf_counter()
        try:
            held = self._reserve(iid, request, path, read_manifest(path))
            try:
                return await self._start(iid, request, ensured, held, (start, fetched))
            except BaseException:
                placement.release(self.budget, self.gpus, held)
                raise
        except BaseException:
            self.store.unpin(path.name, tier)
            raise

    def _reserve(
        self, iid: str, request: pb.LoadInstanceRequest, where: Path, manifest: Manifest
    ) -> Reservation:
        """Check the KV cache holds one sequence of the model in `where`, then charge the
        instance's memory to the node (`placement`); raises `LoadRejectedError` or
        `NoRoomError`, with nothing charged."""
        kv = request.engine.kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
        on_gpu = self.gpus is not None
        placement.check_kv_cache(where, manifest, kv, request.engine.max_model_len, on_gpu)
        what = f"instance {iid!r} ({request.source})"
        return placement.reserve(self.budget, self.gpus, manifest, kv, what)

    def _fill_pinned(
        self, source: str, tier: TierName, tap: LoadTap | None
    ) -> asyncio.Future[Ensured]:
        """`store.ensure_with_origin(pin=True)` in a thread (`close` waits for it)."""
        ensure = partial(self.store.ensure_with_origin, source, tier, pin=True, tap=tap)
        fill = asyncio.ensure_future(asyncio.to_thread(ensure))
        self._fills.add(fill)
        fill.add_done_callback(self._fills.discard)
        return fill

    async def _await_fill(self, fill: asyncio.Future[Ensured], tier: TierName) -> Ensured:
        """The fill's result; if we are cancelled meanwhile, the fill goes on (other loads
        may share it) and its pin is dropped when it completes."""
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
        path, pool = ensured.path, self.pools[held.gpu]
        worker = await pool.acquire(refill=False)
        acquired = time.perf_counter()
        engine = _engine_options(request)
        try:
            reply = await worker.stub.Load(pb.LoadRequest(path=str(path), engine=engine))
        except BaseException as exc:
            pool.refill()
            await worker.stop()
            if not isinstance(exc, grpc.aio.AioRpcError):
                raise
            raise _load_error(request, exc) from None
        timings = pb.LoadTimings(
            fetch_s=fetched - start,
            queue_s=acquired - fetched,
            read_build_s=reply.read_build_s,
            total_s=time.perf_counter() - start,
        )
        tier = parse_tier(request.tier or TierName.DRAM)
        inst = Instance(iid, request.source, path.name, tier, worker, held, timings, ensured.origin)
        inst.replace = _replacement(pool)
        inst.watcher = asyncio.get_running_loop().create_task(self._watch(inst))
        self.instances[iid] = inst
        where = "CPU" if held.gpu is None else f"GPU {held.gpu}"
        log.info(
            "instance %s ready on %s (pid %d) in %.2f s", iid, where, worker.pid, timings.total_s
        )
        return inst

    async def _load_streamed(
        self,
        iid: str,
        request: pb.LoadInstanceRequest,
        fill: asyncio.Future[Ensured],
        tap: LoadTap,
        manifest: Manifest,
        start: float,
    ) -> Instance:
        """The store is copying the checkpoint from disk into DRAM: load it into a worker as it
        lands. The instance takes requests once the worker has built the engine; a feeder task
        relays the copy's progress to it, and the checkpoint's pin is taken over when the copy
        is committed. If anything fails before the instance exists, the fill's pin is dropped
        whenever the fill ends."""
        tier = TierName.DRAM
        staging, committed, data = tap.started.result()
        began = time.perf_counter()
        try:
            with open_either(staging, committed) as where:  # the copy may commit meanwhile
                held = self._reserve(iid, request, where, manifest)
            try:
                pool = self.pools[None]
                worker = await pool.acquire(refill=False)
                acquired = time.perf_counter()
                try:
                    dirs = (staging, committed)
                    call, built = await self._start_streamed(worker, request, dirs, data, tap)
                    if fill.done() and (exc := fill.exception()) is not None:
                        call.cancel()
                        raise exc  # the copy failed while the worker was building
                    if tap.restarted:
                        call.cancel()
                        raise WorkerStartError(_RESTARTED)
                except BaseException:
                    pool.refill()
                    await worker.stop()
                    raise
            except BaseException:
                placement.release(self.budget, self.gpus, held)
                raise
            timings = pb.LoadTimings(
                fetch_s=began - start,
                queue_s=acquired - began,
                read_build_s=built,
                total_s=time.perf_counter() - start,
            )
            inst = Instance(
                iid, request.source, staging.name, tier, worker, held, timings, tap.origin
            )
            inst.pinned = False
            inst.replace = _replacement(pool)
            fill.add_done_callback(partial(self._adopt_pin, inst))
            inst.watcher = asyncio.get_running_loop().create_task(self._watch(inst))
            inst.feeder = asyncio.get_running_loop().create_task(self._feed(inst, call, fill, tap))
            self.instances[iid] = inst
        except BaseException as exc:
            # The fill's pin, when it comes, is nobody's: drop it then (the copy goes on; other
            # loads may share it).
            fill.add_done_callback(lambda done: self._unpin_result(done, tier))
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, OSError) and not fill.done():
                await asyncio.wait([fill])  # the files went away: the copy must have failed
            if fill.done() and not fill.cancelled() and (cause := fill.exception()) is not None:
                raise cause from None  # the store's own error says what went wrong
            raise
        log.info(
            "instance %s serving on CPU (pid %d) in %.2f s; weights still being copied in",
            iid,
            worker.pid,
            timings.total_s,
        )
        return inst

    async def _start_streamed(
        self,
        worker: Worker,
        request: pb.LoadInstanceRequest,
        dirs: tuple[Path, Path],
        manifest: bytes,
        tap: LoadTap,
    ) -> tuple[grpc.aio.StreamStreamCall, float]:
        """Open the worker's `LoadStreamed` and wait for it to serve; returns the call and the
        worker's build seconds."""
        engine = _engine_options(request)
        call = worker.stub.LoadStreamed()
        try:
            staging, committed = map(str, dirs)
            start = pb.LoadRequest(
                path=staging, engine=engine, manifest=manifest, committed_path=committed
            )
            await call.write(pb.LoadFeed(start=start))
            status = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise _load_error(request, exc) from None
        except asyncio.InvalidStateError:  # the call ended under us (an intercepted call)
            raise WorkerStartError(f"loading {request.source}: the worker ended the load") from None
        if status is grpc.aio.EOF or not status.serving:
            call.cancel()
            raise WorkerStartError(f"loading {request.source}: the worker ended the load early")
        if tap.directory != (status.directory_device, status.directory_inode):
            call.cancel()
            raise WorkerStartError(_RESTARTED)
        return call, status.read_build_s

    async def _feed(
        self,
        inst: Instance,
        call: grpc.aio.StreamStreamCall,
        fill: asyncio.Future[Ensured],
        tap: LoadTap,
    ) -> None:
        """Relay landed byte ranges to the worker until the copy ends; then take over the
        fill's pin (or drop it if the instance is gone) and tell the worker it is complete.
        A failed copy fails the instance: its waiting passes error out and it is unloaded."""
        serving = time.perf_counter()
        why: str | None = None  # set when the load failed: the instance is then unloaded
        try:
            while not fill.done():
                waiting = asyncio.ensure_future(tap.landed_ranges.get())
                try:
                    either: list[asyncio.Future[Any]] = [waiting, fill]
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiting.cancel()
                ranges = [waiting.result()] if waiting.done() and not waiting.cancelled() else []
                if ranges := ranges + tap.drain():
                    await call.write(pb.LoadFeed(landed=_byte_ranges(ranges)))
            if (exc := fill.exception()) is not None:
                why = f"copying its checkpoint failed: {type(exc).__name__}: {exc}"
            elif tap.restarted or not tap.is_ours(fill.result().path):
                why = _RESTARTED
            if why is not None:
                with contextlib.suppress(Exception):  # the worker may be gone already
                    await call.write(pb.LoadFeed(failed=why))
                return
            if ranges := tap.drain():
                await call.write(pb.LoadFeed(landed=_byte_ranges(ranges)))
            await call.write(pb.LoadFeed(complete=True))
            status = await call.read()
            if status is grpc.aio.EOF or not status.complete:
                why = "the worker ended its streamed load before completing it"
                return
            await call.done_writing()
            inst.timings.streamed_s = time.perf_counter() - serving
            log.info(
                "instance %s: every weight landed %.2f s after it started serving",
                inst.instance_id,
                inst.timings.streamed_s,
            )
        except asyncio.CancelledError:
            raise  # the instance is being unloaded
        except Exception as exc:  # AioRpcError, or InvalidStateError from an ended call
            why = f"its streamed load failed: {exc!r}"
        finally:
            if why is not None:
                log.error("instance %s: %s; unloading it", inst.instance_id, why)
                asyncio.get_running_loop().create_task(self._release(inst))

    def _adopt_pin(self, inst: Instance, done: asyncio.Future[Ensured]) -> None:
        """The copy ended: a listed instance (stopping ones too: the release unpins after the
        process is gone) takes over the fill's pin; otherwise it is dropped now."""
        if done.cancelled() or done.exception() is not None:
            return
        if self.instances.get(inst.instance_id) is inst:
            inst.pinned = True
        else:
            self.store.unpin(done.result().path.name, inst.tier)

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
        inst.served()
        try:
            if inst.feeder is not None:
                inst.feeder.cancel()
            await inst.worker.stop()
        finally:
            # No await from here on: Status (served on this loop) sees the instance with its
            # pin, or neither, so an Evict after the instance is gone never finds it pinned.
            try:
                if inst.pinned:
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
        with _relaying(inst):
            async for event in inst.worker.stub.Generate(request):
                inst.served()
                yield event

    async def migrate(
        self, first: pb.MigrateFeed, feed: AsyncIterator[pb.MigrateFeed]
    ) -> AsyncIterator[pb.MigrateEvent]:
        """Relay a live migration into one of our instances (`first.begin` names it), like
        `generate`: the controller's rounds go to the worker, its events come back."""
        if self.draining:
            raise DrainingError("the node is draining; migrate the request to another node")
        inst = self.get(first.begin.instance_id)

        async def rounds() -> AsyncIterator[pb.MigrateFeed]:
            yield first
            async for msg in feed:
                yield msg

        with _relaying(inst):
            async for event in inst.worker.stub.Migrate(rounds()):
                inst.served()
                yield event

    async def cancel(self, instance_id: str, request_id: str, after_outputs: int = 0) -> None:
        """Stop one request; its stream ends with an ABORT event (or, `after_outputs`, with
        that many outputs' last token, HANDED_OVER: see `CancelRequest`)."""
        await self.get(instance_id).worker.stub.Cancel(
            pb.CancelRequest(request_id=request_id, after_outputs=after_outputs)
        )

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
        # Fills that loads no longer wait for (refused or cancelled mid-copy) drop their pins
        # in done callbacks, which run before this wakes. Bounded: a download can take minutes,
        # and pins do not outlive the agent anyway.
        if self._fills:
            await asyncio.wait(self._fills, timeout=CLOSE_FILLS_WAIT_S)


_RESTARTED = (
    "the store copied the checkpoint a second time (its DRAM entry was evicted before it could "
    "be pinned), so the files this instance mapped are not the tier's; load it again"
)


def _engine_options(request: pb.LoadInstanceRequest) -> pb.EngineOptions:
    """The request's engine options for the worker, with the node's default KV cache size."""
    engine = pb.EngineOptions()
    engine.CopyFrom(request.engine)
    engine.kv_cache_bytes = engine.kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
    return engine


def _load_error(
    request: pb.LoadInstanceRequest, exc: grpc.aio.AioRpcError
) -> LoadRejectedError | WorkerStartError:
    """A worker's failed load as the agent reports it: refused (INVALID_ARGUMENT: the engine
    cannot take this model, retrying will not help) or failed to start."""
    message = f"loading {request.source}: {exc.details()}"
    if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
        return LoadRejectedError(message)
    return WorkerStartError(message)


def _replacement(pool: WorkerPool) -> Callable[[], None]:
    """Refills `pool` when called, or `REPLACE_AFTER_S` from now if it is not called first."""
    timer = asyncio.get_running_loop().call_later(REPLACE_AFTER_S, pool.refill)

    def now() -> None:
        timer.cancel()
        pool.refill()

    return now


def _byte_ranges(ranges: list[tuple[int, int, int]]) -> pb.ByteRanges:
    return pb.ByteRanges(ranges=[pb.ByteRange(partition=p, start=s, end=e) for p, s, e in ranges])


@contextlib.contextmanager
def _relaying(inst: Instance) -> Iterator[None]:
    """Around a call relayed to `inst`'s worker: count it as running, and turn the worker's
    death under it into `InstanceGoneError` (other instance errors pass as `AioRpcError`)."""
    inst.running += 1
    try:
        yield
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
