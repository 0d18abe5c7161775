"""The agent's side of the controller protocol: Register once, then Heartbeat every interval.

A controller that is down or refuses a call is retried at the next tick (logged, never fatal):
the node keeps serving what it runs. A reply asking to re-register (the controller restarted
and lost the node) triggers a new Register.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from node_agent.auth import open_channel
from node_agent.proto import controller_pb2 as cpb
from node_agent.proto import controller_pb2_grpc as cpb_grpc
from node_agent.proto import node_agent_pb2 as pb

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.1  # the shortest heartbeat period accepted, from a flag or a controller


@dataclass(frozen=True)
class HeartbeatConfig:
    """Where the controller is and how often to report."""

    controller: str
    """host:port of the controller's gRPC service."""
    node_id: str
    advertise: str
    """host:port at which the controller can reach this node's NodeAgent service."""
    secret: str | None
    interval_s: float = 5.0
    ca_file: Path | None = None
    """CA certificate to verify the controller's TLS certificate (None: plaintext)."""
    call_timeout_s: float = 10.0


class HeartbeatLoop:
    """Runs until cancelled; `sent` counts heartbeats the controller accepted."""

    def __init__(self, config: HeartbeatConfig, status: Callable[[], pb.NodeStatus]) -> None:
        self.config = config
        self.status = status
        self.sent = 0
        self.registered = False
        self._interval = config.interval_s

    async def run(self) -> None:
        """Register, then heartbeat every interval, forever (cancel the task to stop)."""
        async with open_channel(
            self.config.controller, secret=self.config.secret, ca_file=self.config.ca_file
        ) as channel:
            stub = cpb_grpc.ControllerStub(channel)
            while True:
                try:
                    await self._tick(stub)
                except grpc.aio.AioRpcError as exc:
                    log.warning(
                        "controller %s: %s: %s",
                        self.config.controller,
                        exc.code().name,
                        exc.details(),
                    )
                await asyncio.sleep(self._interval)

    async def _tick(self, stub: cpb_grpc.ControllerStub) -> None:
        timeout = self.config.call_timeout_s
        if not self.registered:
            reply = await stub.Register(
                cpb.RegisterRequest(
                    node_id=self.config.node_id,
                    address=self.config.advertise,
                    status=self.status(),
                ),
                timeout=timeout,
            )
            # The controller may ask for another pace, but never a busy loop.
            self._interval = max(
                reply.heartbeat_interval_s or self.config.interval_s, MIN_INTERVAL_S
            )
            self.registered = True
            log.info("registered with controller %s", self.config.controller)
        beat = await stub.Heartbeat(
            cpb.HeartbeatRequest(
                node_id=self.config.node_id, sequence=self.sent + 1, status=self.status()
            ),
            timeout=timeout,
        )
        self.sent += 1
        if beat.reregister:
            self.registered = False
