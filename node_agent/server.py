"""Running a node agent: store + worker pool + instances + gRPC server + heartbeats.

`serve(config, stop)` runs until `stop` is set, then shuts down in order: stop taking calls,
unload instances (terminating their processes), stop idle workers, close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from node_agent.agent import AgentServicer, node_status
from node_agent.auth import BearerAuthInterceptor, TlsFiles, add_port, open_channel
from node_agent.devices import GpuProbe
from node_agent.heartbeat import HeartbeatConfig, HeartbeatLoop
from node_agent.instances import Budget, InstanceManager, WorkerPool
from node_agent.instances.gpus import GpuLedger
from node_agent.instances.spawn import WorkerSpec, default_threads
from node_agent.metrics import NodeMetrics, start_http
from node_agent.preemption import PreemptionConfig, PreemptionWatch
from node_agent.proto import controller_pb2 as cpb
from node_agent.proto import controller_pb2_grpc as cpb_grpc
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
    preemption: PreemptionConfig | None = None
    """Watch for preemption notices (None: `--preemption off`)."""
    metrics_listen: str | None = None
    """host:port to serve Prometheus `/metrics` on over plain HTTP (None: not served)."""


async def serve(
    config: NodeConfig, stop: asyncio.Event, on_listening: Callable[[str], None] | None = None
) -> None:
    """Run the agent until `stop` is set. `on_listening(host:port)` is called once serving."""
    gpus = GpuProbe()
    found = await gpus.refresh()  # before any load: a GPU node must never place one on the CPU
    store = CheckpointStore(config.store).open()
    pools = _worker_pools(config, found, store.arena_path)
    ledger = GpuLedger(found) if found else None
    manager = InstanceManager(store, pools, Budget(config.cpu_memory, config.slots), ledger)
    metrics = NodeMetrics()
    server = grpc.aio.server(
        interceptors=[BearerAuthInterceptor(config.secret)],
        options=[("grpc.so_reuseport", 0)],  # a second agent on our port must fail, not share it
    )
    loop = asyncio.get_running_loop()
    probing = loop.create_task(gpus.refresh_forever(config.heartbeat_s))
    heartbeat: asyncio.Task[None] | None = None
    watching: asyncio.Task[None] | None = None
    watch: PreemptionWatch | None = None
    exporting: asyncio.Task[None] | None = None
    try:
        for pool in pools.values():
            pool.start()
        pb_grpc.add_NodeAgentServicer_to_server(
            AgentServicer(config.store.node_id, store, manager, gpus, metrics), server
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
        if config.preemption is not None:
            watch = _preemption_watch(config, manager, stop)
            watching = loop.create_task(watch.run())
        if config.metrics_listen:
            exporting = await _export_metrics(metrics, config.metrics_listen)
        if on_listening is not None:
            on_listening(address)

        def status() -> pb.NodeStatus:
            now = node_status(config.store.node_id, store, manager, gpus.latest)
            if watch is not None and watch.notice is not None:
                now.preemption.CopyFrom(watch.notice)
            return now

        metrics.watch(status)
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
                    status,
                ).run()
            )
        await stop.wait()
    finally:
        await _shutdown(config, server, [exporting, watching, heartbeat, probing], manager, store)


async def _export_metrics(metrics: NodeMetrics, listen: str) -> asyncio.Task[None]:
    """Serve `/metrics` on `listen` until the task is cancelled (which closes the server)."""
    try:
        http, address = await start_http(metrics, listen)
    except (OSError, ValueError) as exc:
        raise NodeStartError(
            f"cannot serve metrics on {listen} ({exc}); pick a free --metrics-listen HOST:PORT"
        ) from None
    log.info("metrics on http://%s/metrics", address)
    return asyncio.get_running_loop().create_task(http.serve_forever())


def _preemption_watch(
    config: NodeConfig, manager: InstanceManager, stop: asyncio.Event
) -> PreemptionWatch:
    """The notice source `config.preemption` names (`auto`: whichever cloud's metadata
    answers, else SIGTERM), with the node's drain and the controller's `Preempting` RPC."""
    from spot.notices import make_source

    assert config.preemption is not None
    choice = config.preemption
    source = make_source(  # "auto" detects the cloud when it starts watching
        choice.source,
        endpoint=choice.endpoint,
        poll_interval_s=choice.poll_interval_s,
        grace_s=choice.grace_s,
    )

    async def report(notice: pb.Preemption) -> None:
        assert config.controller is not None
        async with open_channel(
            config.controller, secret=config.secret, ca_file=config.controller_ca
        ) as channel:
            reply = await cpb_grpc.ControllerStub(channel).Preempting(
                cpb.PreemptingRequest(node_id=config.store.node_id, preemption=notice),
                timeout=5.0,
            )
        log.info(
            "the controller took the notice: %d request(s) to move, empty by %.0f s from now",
            reply.requests_to_move,
            reply.drain_by_unix - time.time() if reply.drain_by_unix else 0.0,
        )

    def drain() -> None:
        manager.draining = True

    return PreemptionWatch(
        source,
        choice,
        drain=drain,
        running=lambda: len(manager.instances),
        report=report if config.controller else None,
        stop=stop,
    )


def _worker_pools(
    config: NodeConfig, gpus: list[pb.GpuDevice], arena: Path | None
) -> dict[int | None, WorkerPool]:
    """One pool per device an instance can be placed on: each GPU, or the CPU on a node
    without GPUs. Every worker gets the same share of the cores, and the DRAM `arena` to map
    (CPU) or page-lock (GPU) once as it starts."""
    threads = config.threads or default_threads(config.slots)
    if not gpus:
        return {None: WorkerPool(config.prestart, WorkerSpec(threads, arena=arena))}
    return {
        g.index: WorkerPool(config.prestart, WorkerSpec(threads, gpu=g.index, arena=arena))
        for g in gpus
    }


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
