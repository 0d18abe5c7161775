"""The instance process: serves the internal `Instance` service on a unix-domain socket.

    STOKE_WORKER_TOKEN=... python -m node_agent.instances.worker --socket PATH \
        --threads N --device cpu|cuda [--arena PATH]

It imports torch and the engine first, limits torch to `--threads` threads, then listens and
prints its ready line on stdout, then waits for one `Load` onto `--device` (a GPU worker sees
only the GPU the agent chose for it). Every call must carry the token the agent put in its
environment (`spawn.TOKEN_ENV`). It exits when its stdin closes (the agent went away) or on
SIGTERM. With `--arena` (the node's DRAM arena) it maps the whole arena read-only before its
ready line, page tables populated, so a load from the DRAM tier binds tensors at offsets into
memory it already has: nothing is mapped or faulted on the cold-start path. A GPU worker
instead reserves its pinned staging ring and page-locks the arena before its ready line
(`loader.cuda`), so no load allocates pinned memory and DRAM-tier loads copy straight from
the arena to the device.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator

import grpc
import torch

from checkpoint_format import Manifest
from checkpoint_format.errors import CheckpointError
from loader.arena import ArenaMap
from loader.cuda import pin_arena, reserve_ring
from loader.errors import DeviceError
from node_agent.auth import BearerAuthInterceptor
from node_agent.convert import event_to_pb, request_from_pb
from node_agent.engine import load_engine
from node_agent.engine.async_engine import AsyncEngine, GenerationError
from node_agent.engine.engine import EngineConfig
from node_agent.engine.streamed import StreamedLoad
from node_agent.facts.errors import EngineError, RequestError
from node_agent.instances.spawn import TOKEN_ENV, ready_line
from node_agent.proto import node_agent_pb2 as pb
from node_agent.proto import node_agent_pb2_grpc as pb_grpc

log = logging.getLogger("stoke.instance")


def engine_config(options: pb.EngineOptions) -> EngineConfig:
    """Wire engine options -> `EngineConfig` (0 means the engine's default)."""
    default = EngineConfig()
    return EngineConfig(
        max_batch_size=options.max_batch_size or default.max_batch_size,
        kv_cache_bytes=options.kv_cache_bytes or default.kv_cache_bytes,
        max_model_len=options.max_model_len or None,
    )


class InstanceServicer(pb_grpc.InstanceServicer):
    """One model, loaded once onto `device`; generation through `AsyncEngine`. `arena`: the
    node's DRAM arena, mapped once when the worker started."""

    def __init__(self, device: str = "cpu", arena: ArenaMap | None = None) -> None:
        self.device = device
        self.arena = arena
        self.engine: AsyncEngine | None = None
        self.streamed: StreamedLoad | None = None  # a LoadStreamed whose weights are arriving
        self.running = 0
        self._load_lock = asyncio.Lock()

    async def Load(
        self, request: pb.LoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadReply:
        async with self._load_lock:
            if self.engine is not None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a model is loaded")
            if self.device == "cuda" and not torch.cuda.is_available():
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "this worker was given a GPU but torch sees no CUDA device (a CPU-only torch "
                    "build, or a driver problem); install a CUDA build of torch on this node",
                )
            start = time.perf_counter()
            try:
                config = engine_config(request.engine)
                engine = await asyncio.to_thread(
                    load_engine, request.path, self.device, config, self.arena
                )
            except EngineError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            self.engine = AsyncEngine(engine)
            return pb.LoadReply(read_build_s=time.perf_counter() - start)

    async def LoadStreamed(
        self, feed: AsyncIterator[pb.LoadFeed], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LoadStatus]:
        first = await anext(aiter(feed), None)
        if first is None or first.WhichOneof("kind") != "start":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message is `start`")
        assert first is not None
        if self.device != "cpu":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "streamed loads are for CPU workers only"
            )
        async with self._load_lock:
            if self.engine is not None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a model is loaded")
            start = time.perf_counter()
            config = engine_config(first.start.engine)
            try:
                manifest = Manifest.from_json(first.start.manifest, source="the LoadStreamed start")
                dirs = (first.start.path, first.start.committed_path)
                load = await asyncio.to_thread(StreamedLoad, dirs, manifest, config, self.arena)
            except (EngineError, CheckpointError) as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except OSError as exc:  # the staging files are gone: the copy failed meanwhile
                await context.abort(grpc.StatusCode.ABORTED, f"the checkpoint's files: {exc}")
            self.engine, self.streamed = AsyncEngine(load.engine), load
        try:
            device, inode = load.directory
            built = time.perf_counter() - start
            yield pb.LoadStatus(
                serving=True, read_build_s=built, directory_device=device, directory_inode=inode
            )
            async for msg in feed:
                kind = msg.WhichOneof("kind")
                if kind == "landed":
                    spans = [(r.partition, r.start, r.end) for r in msg.landed.ranges]
                    await asyncio.to_thread(load.land, spans)
                elif kind == "complete":
                    load.finish()
                    yield pb.LoadStatus(complete=True)
                    return
                elif kind == "failed":
                    load.fail(msg.failed)
                    await context.abort(grpc.StatusCode.ABORTED, msg.failed)
            load.fail("the node agent stopped feeding the load before it was complete")
        except BaseException:
            load.fail("the node agent's load stream ended before the copy was complete")
            raise

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TokenEvent]:
        if self.engine is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no model loaded; Load first")
        assert self.engine is not None
        async with self._serving(context):
            async for event in self.engine.generate(request_from_pb(request)):
                yield event_to_pb(event)

    async def Migrate(
        self, feed: AsyncIterator[pb.MigrateFeed], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.MigrateEvent]:
        first = await anext(aiter(feed), None)
        if first is None or first.WhichOneof("kind") != "begin":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message is `begin`")
        if self.engine is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no model loaded; Load first")
        assert first is not None and self.engine is not None
        engine, request_id = self.engine, first.begin.request_id
        reader: asyncio.Task[None] | None = None
        try:
            async with self._serving(context):
                events = engine.generate(request_from_pb(first.begin), held=True)
                async for event in events:
                    if reader is None:  # accepted: from now on the feed's rounds apply to it
                        reader = asyncio.create_task(_apply_rounds(feed, engine, request_id))
                    if event.prefilled is not None:
                        yield pb.MigrateEvent(prefilled=event.prefilled)
                    else:
                        yield pb.MigrateEvent(token=event_to_pb(event))
        finally:
            if reader is not None:
                reader.cancel()

    @contextlib.asynccontextmanager
    async def _serving(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Around one request's generation (Generate, or a migration into this instance):
        count it as running, and turn the engine's errors into the call's status."""
        self.running += 1
        try:
            yield
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except GenerationError as exc:
            if self.streamed is not None and self.streamed.landed.failed is not None:
                # Its weights never arrived: the request can resume on another instance.
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        except EngineError as exc:  # e.g. a request id already in flight
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        finally:
            self.running -= 1

    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelReply:
        if self.engine is not None:
            self.engine.cancel(request.request_id, request.after_outputs)
        return pb.CancelReply()

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthReply:
        return pb.HealthReply(
            loaded=self.engine is not None, running_requests=self.running, pid=os.getpid()
        )


async def _apply_rounds(
    feed: AsyncIterator[pb.MigrateFeed], engine: AsyncEngine, request_id: str
) -> None:
    """Pass a migration's catch-up rounds and its commit to the engine; a feed that ends (or
    breaks) before the commit aborts the held request, freeing its slot and KV."""
    committed = False
    try:
        async for msg in feed:
            kind = msg.WhichOneof("kind")
            if kind in ("catch_up", "commit"):
                ids = list(getattr(msg, kind).ids)
                committed = kind == "commit"
                engine.extend(request_id, ids, release=committed)
                if committed:
                    return
    except (grpc.aio.AioRpcError, EngineError):
        pass  # the feed broke, or the request already ended here: abort below (if not done)
    finally:
        if not committed:
            engine.cancel(request_id)


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Stop when the agent's end of our stdin closes (the agent exited, even by SIGKILL)."""
    while os.read(0, 4096):  # unbuffered: no buffer lock held at interpreter shutdown
        pass
    loop.call_soon_threadsafe(stop.set)


async def serve(socket_path: str, token: str, servicer: InstanceServicer) -> None:
    """Serve `servicer` on `socket_path` to callers holding `token`, until stdin closes or
    SIGTERM/SIGINT arrives."""
    auth = BearerAuthInterceptor(token, source=f"the worker's token, ${TOKEN_ENV} at its start")
    server = grpc.aio.server(interceptors=[auth])
    pb_grpc.add_InstanceServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    # The pool waits for this line (the socket is listening) and logs the thread count.
    print(ready_line(torch.get_num_threads()), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    threading.Thread(target=_watch_stdin, args=(loop, stop), daemon=True).start()
    await stop.wait()
    await server.stop(grace=1.0)
    if servicer.engine is not None:
        servicer.engine.stop()


def main(argv: list[str] | None = None, servicer: type[InstanceServicer] = InstanceServicer) -> int:
    """Run a worker; `servicer` is the service class (tests run a chattier one)."""
    parser = argparse.ArgumentParser(description="stoke model-instance worker process")
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    parser.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="load onto")
    parser.add_argument("--arena", help="the node's DRAM arena file, mapped once at start")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s instance %(message)s")
    # Out of the environment at once: nothing this process starts inherits the token.
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        log.error("no token in $%s: workers are started by the node agent", TOKEN_ENV)
        return 2
    torch.set_num_threads(args.threads)  # before any torch work (the pools are sized once)
    arena = _prepare_gpu(args.arena) if args.device == "cuda" else _map_arena(args.arena)
    asyncio.run(serve(args.socket, token, servicer(args.device, arena)))
    return 0


def _map_arena(path: str | None) -> ArenaMap | None:
    """Map the DRAM arena (off the cold-start path: before the ready line). A worker that
    cannot still serves: loads from the DRAM tier then map their extents each time."""
    if not path:
        return None
    start = time.perf_counter()
    try:
        arena = ArenaMap(path)
    except (OSError, CheckpointError) as exc:
        log.warning(
            "cannot map the DRAM arena %s (%s); loads will map their own extents", path, exc
        )
        return None
    log.info(
        "mapped the DRAM arena (%d MiB) in %.2f s", arena.size >> 20, time.perf_counter() - start
    )
    return arena


def _prepare_gpu(path: str | None) -> ArenaMap | None:
    """A GPU worker, before its ready line: allocate the pinned staging ring every load will
    use, and page-lock the DRAM arena so loads from the DRAM tier copy straight from it. Either
    failing only costs speed (a load then allocates its ring, or stages arena bytes through
    it); without CUDA at all, the Load says so."""
    if not torch.cuda.is_available():
        return None
    start = time.perf_counter()
    try:
        ring = reserve_ring()
    except (DeviceError, RuntimeError) as exc:
        log.warning("cannot reserve the pinned staging ring (%s); each load allocates one", exc)
    else:
        log.info(
            "reserved a pinned staging ring of %d MiB in %.2f s",
            ring.nbytes >> 20,
            time.perf_counter() - start,
        )
    if not path:
        return None
    start = time.perf_counter()
    try:
        arena = ArenaMap(path, for_gpu=True)
    except (OSError, CheckpointError) as exc:
        log.warning("cannot map the DRAM arena %s (%s)", path, exc)
        return None
    try:
        pin_arena(arena)
    except (DeviceError, RuntimeError) as exc:
        log.warning("%s", exc)
        arena.mapping.close()
        return None
    log.info(
        "page-locked the DRAM arena (%d MiB) for the GPU in %.2f s",
        arena.size >> 20,
        time.perf_counter() - start,
    )
    return arena


if __name__ == "__main__":
    sys.exit(main())
