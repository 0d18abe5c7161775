"""Running a node agent: store + worker pool + instances + gRPC server + heartbeats.

`serve(config, stop)` runs until `stop` is set, then shuts down in order: stop taking calls,
unload instances (terminating their processes), stop idle workers, close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from node_agent.agent import AgentServicer, node_status
from node_agent.auth import BearerAuthInterceptor, TlsFiles, add_port
from node_agent.devices import GpuProbe
from node_agent.heartbeat import HeartbeatConfig, HeartbeatLoop
from node_agent.instances import Budget, InstanceManager, WorkerPool
from node_agent.instances.gpus import GpuLedger
from node_agent.instances.spawn import WorkerSpec, default_threads
from node_agent.proto import node_agent_pb2 as pb
from node_agent.proto import node_agent_pb2_grpc as pb_grpc
from node_agent.store import CheckpointStore, StoreConfig

log = logging.getLogger(__name__)


class NodeStartError(Exception):
    """The agent could not start (address in use, unusable directories); the message says why."""


@dataclass(frozen=True)
class NodeConfig:
    """Everything `stoke node` configures."""

    store: StoreConfig
    secret: str
    listen: str = "127.0.0.1:0"
    """host:port to listen on; port 0 picks a free one (printed on start)."""
    advertise: str | None = None
    """host:port the controller should dial (default: the listen address)."""
    controller: str | None = None
    """host:port of the controller (None: run standalone, no heartbeats)."""
    cpu_memory: int = 8 << 30
    slots: int = 4
    prestart: int = 1
    """Idle pre-started worker processes to keep (per GPU on a GPU node)."""
    threads: int | None = None
    """Torch intra-op threads per instance (None: `default_threads(slots)`)."""
    heartbeat_s: float = 5.0
    tls: TlsFiles | None = None
    controller_ca: Path | None = None
    grace_s: float = 5.0


async def serve(
    config: NodeConfig, stop: asyncio.Event, on_listening: Callable[[str], None] | None = None
) -> None:
    """Run the agent until `stop` is set. `on_listening(host:port)` is called once serving."""
    gpus = GpuProbe()
    found = await gpus.refresh()  # before any load: a GPU node must never place one on the CPU
    store = CheckpointStore(config.store).open()
    pools = _worker_pools(config, found)
    ledger = GpuLedger(found) if found else None
    manager = InstanceManager(store, pools, Budget(config.cpu_memory, config.slots), ledger)
    server = grpc.aio.server(
        interceptors=[BearerAuthInterceptor(config.secret)],
        options=[("grpc.so_reuseport", 0)],  # a second agent on our port must fail, not share it
    )
    loop = asyncio.get_running_loop()
    probing = loop.create_task(gpus.refresh_forever(config.heartbeat_s))
    heartbeat: asyncio.Task[None] | None = None
    try:
        for pool in pools.values():
            pool.start()
        pb_grpc.add_NodeAgentServicer_to_server(
            AgentServicer(config.store.node_id, store, manager, gpus), server
        )
        try:
            port = add_port(server, config.listen, config.tls)
        except RuntimeError as exc:  # grpc's way of saying the address is taken or invalid
            raise NodeStartError(
                f"cannot listen on {config.listen} ({exc}); pick a free --listen HOST:PORT"
            ) from None
        await server.start()
        address = f"{config.listen.rsplit(':', 1)[0]}:{port}"
        log.info("node %s listening on %s", config.store.node_id, address)
        if on_listening is not None:
            on_listening(address)
        if config.controller:
            heartbeat = loop.create_task(
                HeartbeatLoop(
                    HeartbeatConfig(
                        config.controller,
                        config.store.node_id,
                        config.advertise or address,
                        config.secret,
                        config.heartbeat_s,
                        config.controller_ca,
                    ),
                    lambda: node_status(config.store.node_id, store, manager, gpus.latest),
                ).run()
            )
        await stop.wait()
    finally:
        await _shutdown(config, server, [heartbeat, probing], manager, store)


def _worker_pools(config: NodeConfig, gpus: list[pb.GpuDevice]) -> dict[int | None, WorkerPool]:
    """One pool per device an instance can be placed on: each GPU, or the CPU on a node
    without GPUs. Every worker gets the same share of the cores."""
    threads = config.threads or default_threads(config.slots)
    if not gpus:
        return {None: WorkerPool(config.prestart, WorkerSpec(threads))}
    return {g.index: WorkerPool(config.prestart, WorkerSpec(threads, gpu=g.index)) for g in gpus}


async def _shutdown(
    config: NodeConfig,
    server: grpc.aio.Server,
    tasks: list[asyncio.Task[None] | None],
    manager: InstanceManager,
    store: CheckpointStore,
) -> None:
    log.info("node %s stopping", config.store.node_id)
    for task in tasks:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await server.stop(config.grace_s)
    await manager.close()
    for pool in manager.pools.values():
        await pool.close()
    store.close()
    log.info("node %s stopped", config.store.node_id)
