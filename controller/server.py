"""Run a controller: the HTTP API (uvicorn on uvloop) and the gRPC Controller service in one
event loop, plus the liveness watcher and the autoscaler, until `stop` is set."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
import uvicorn
from starlette.types import ASGIApp

from controller.api import create_app
from controller.capacity import LocalProvider
from controller.config import ControllerConfig
from controller.nodes import ControllerServicer, restore_nodes, watch_liveness
from controller.service import Controller
from node_agent.auth import BearerAuthInterceptor, add_port
from node_agent.proto import controller_pb2_grpc as cpb_grpc

log = logging.getLogger(__name__)


class ControllerStartError(RuntimeError):
    """A listener could not start (port in use, bad address)."""


def _split(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ControllerStartError(f"{what} {address!r}: write HOST:PORT, e.g. 127.0.0.1:8080.")
    return host.strip("[]") or "0.0.0.0", int(port)


async def serve(
    config: ControllerConfig, stop: asyncio.Event, announce: Callable[[str, str], None]
) -> None:
    """Serve until `stop`; `announce(kind, "host:port")` is called for "http" and "grpc"."""
    config.check_ready()
    host, port = _split(config.http_listen, "--listen")
    controller = Controller(config)
    restore_nodes(controller.state, controller.registry)
    grpc_server = await _start_grpc(controller, announce)
    http = uvicorn.Server(_uvicorn_config(create_app(controller), host, port))
    # uvicorn catches SIGINT/SIGTERM itself while serving (ending `http_task`, which ends the
    # wait below) and re-raises them afterwards, which sets `stop`: one clean shutdown path.
    http_task = asyncio.create_task(http.serve())
    tasks = [
        asyncio.create_task(watch_liveness(controller.state, config.node_timeout_s)),
        asyncio.create_task(controller.scaling.run_forever()),
    ]
    if controller.elastic is not None:
        tasks.append(asyncio.create_task(controller.elastic.run_forever()))
    try:
        await _announce_http(http, http_task, config.http_listen, host, announce)
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait({stop_wait, http_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
    finally:
        log.info("controller stopping")
        http.should_exit = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await http_task
        await grpc_server.stop(2)
        if isinstance(controller.preemptions.capacity, LocalProvider):
            await controller.preemptions.capacity.close()
        if controller.elastic is not None:
            await controller.elastic.close(stop_nodes=True)
        await controller.close()
        log.info("controller stopped")


async def _start_grpc(
    controller: Controller, announce: Callable[[str, str], None]
) -> grpc.aio.Server:
    """The Controller gRPC service (node registration and heartbeats), started."""
    config = controller.config
    server = grpc.aio.server(interceptors=[BearerAuthInterceptor(config.secret)])
    cpb_grpc.add_ControllerServicer_to_server(
        ControllerServicer(
            controller.state,
            controller.registry,
            controller.functions,
            config.heartbeat_interval_s,
            controller.preemptions,
        ),
        server,
    )
    try:
        grpc_port = add_port(server, config.grpc_listen, None)
    except RuntimeError as exc:
        raise ControllerStartError(f"cannot listen on {config.grpc_listen}: {exc}") from None
    await server.start()
    grpc_host = config.grpc_listen.rpartition(":")[0]
    announce("grpc", f"{grpc_host}:{grpc_port}")
    if controller.elastic is not None:
        controller.elastic.controller_address = f"{grpc_host or '127.0.0.1'}:{grpc_port}"
    if config.replacement == "local" and controller.elastic is None:
        controller.preemptions.capacity = LocalProvider(
            f"{grpc_host}:{grpc_port}",
            config.secret,
            config.home.expanduser() / "replacements",
            config.replacement_node_args,
            config.replacement_max_nodes,
        )
    return server


def _uvicorn_config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",
        http="httptools",  # C parser: h11's pure-Python one costs ~1 ms a request here
        proxy_headers=False,  # one ASGI layer less per request; no client address is used
        server_header=False,
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


async def _announce_http(
    http: uvicorn.Server,
    http_task: asyncio.Task[None],
    listen: str,
    host: str,
    announce: Callable[[str, str], None],
) -> None:
    """Wait for uvicorn to listen, then announce the port it bound."""
    while not http.started:
        if http_task.done():
            http_task.result()
            raise ControllerStartError(f"cannot listen on {listen}")
        await asyncio.sleep(0.01)
    bound = http.servers[0].sockets[0].getsockname()
    announce("http", f"{host}:{bound[1]}")
