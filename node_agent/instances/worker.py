"""The instance process: serves the internal `Instance` service on a unix-domain socket.

    python -m node_agent.instances.worker --socket PATH

It imports torch and the engine first, then listens and prints `READY_LINE` on stdout, then
waits for one `Load`. It exits when its stdin closes (the agent went away) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator

import grpc

from node_agent.convert import event_to_pb, request_from_pb
from node_agent.engine import load_engine
from node_agent.engine.async_engine import AsyncEngine, GenerationError
from node_agent.engine.engine import EngineConfig
from node_agent.engine.errors import EngineError, RequestError
from node_agent.instances.pool import READY_LINE
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
    """One model, loaded once; generation through `AsyncEngine`."""

    def __init__(self) -> None:
        self.engine: AsyncEngine | None = None
        self.running = 0
        self._load_lock = asyncio.Lock()

    async def Load(
        self, request: pb.LoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadReply:
        async with self._load_lock:
            if self.engine is not None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a model is loaded")
            start = time.perf_counter()
            try:
                engine = await asyncio.to_thread(
                    load_engine, request.path, "cpu", engine_config(request.engine)
                )
            except EngineError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            self.engine = AsyncEngine(engine)
            return pb.LoadReply(read_build_s=time.perf_counter() - start)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TokenEvent]:
        if self.engine is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no model loaded; Load first")
        assert self.engine is not None
        self.running += 1
        try:
            async for event in self.engine.generate(request_from_pb(request)):
                yield event_to_pb(event)
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except GenerationError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        except EngineError as exc:  # e.g. a request id already in flight
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        finally:
            self.running -= 1

    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelReply:
        if self.engine is not None:
            self.engine.cancel(request.request_id)
        return pb.CancelReply()

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthReply:
        return pb.HealthReply(
            loaded=self.engine is not None, running_requests=self.running, pid=os.getpid()
        )


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Stop when the agent's end of our stdin closes (the agent exited, even by SIGKILL)."""
    while os.read(0, 4096):  # unbuffered: no buffer lock held at interpreter shutdown
        pass
    loop.call_soon_threadsafe(stop.set)


async def serve(socket_path: str) -> None:
    """Listen on `socket_path` until stdin closes or SIGTERM/SIGINT arrives."""
    server = grpc.aio.server()
    servicer = InstanceServicer()
    pb_grpc.add_InstanceServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    print(READY_LINE, flush=True)  # the pool waits for this line: the socket is listening
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    threading.Thread(target=_watch_stdin, args=(loop, stop), daemon=True).start()
    await stop.wait()
    await server.stop(grace=1.0)
    if servicer.engine is not None:
        servicer.engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="stoke model-instance worker process")
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s instance %(message)s")
    asyncio.run(serve(args.socket))
    return 0


if __name__ == "__main__":
    sys.exit(main())
