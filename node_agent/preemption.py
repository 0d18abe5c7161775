"""The node's side of a preemption: watch for the notice, drain, tell the controller at once,
and (when asked) exit once empty.

A `spot.notices` source (AWS IMDS, GCP metadata, Azure Scheduled Events, or SIGTERM) yields
the notice. Then the node takes no new instances or requests (the manager drains), reports the
notice to the controller with the `Preempting` RPC (retried until it answers or the deadline
passes; every heartbeat carries the notice too, via `status`), and waits until it runs nothing
— the controller moves its requests off by live migration and stops its instances — or the
deadline comes. Then it acknowledges the notice (Azure: the event may start now) and, with
`exit_when_drained` (always for SIGTERM: the orchestrator is waiting for the process to end),
sets `stop`, and the agent shuts down cleanly. An advisory notice (AWS's rebalance
recommendation) is reported and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from node_agent.proto import node_agent_pb2 as pb
from spot.notices.base import Notice, NoticeKind, NoticeSource

log = logging.getLogger(__name__)

REPORT_RETRY_S = 1.0
"""Between tries of the `Preempting` RPC while the controller does not answer."""
EMPTY_CHECK_S = 0.25
"""How often the drained node checks that it runs nothing any more."""


@dataclass(frozen=True)
class PreemptionConfig:
    """`stoke node --preemption ...`."""

    source: str
    """aws | gcp | azure | sigterm | auto."""
    endpoint: str | None = None
    """Override of the metadata service's base URL (tests, private clouds)."""
    grace_s: float = 30.0
    """SIGTERM: the time an orchestrator leaves before it kills the process."""
    exit_when_drained: bool = False
    """Stop the agent once empty (or at the deadline): always for SIGTERM."""
    poll_interval_s: float | None = None


Report = Callable[[pb.Preemption], Awaitable[None]]
"""Sends the notice to the controller (the `Preempting` RPC); raises if it could not."""


class PreemptionWatch:
    def __init__(
        self,
        source: NoticeSource,
        config: PreemptionConfig,
        *,
        drain: Callable[[], None],
        running: Callable[[], int],
        report: Report | None,
        stop: asyncio.Event,
    ) -> None:
        self.source, self.config = source, config
        self.drain, self.running, self.report = drain, running, report
        self.stop = stop
        self.notice: pb.Preemption | None = None
        """The notice being acted on (heartbeats carry it)."""
        self.drained = asyncio.Event()

    async def run(self) -> None:
        """Watch until cancelled (or until the node exits after a drain)."""
        try:
            async for notice in self.source.watch():
                await self._act(notice)
                if self.drained.is_set() and self._exits(notice):
                    return
        finally:
            await self.source.aclose()

    def _exits(self, notice: Notice) -> bool:
        return self.config.exit_when_drained or notice.kind is NoticeKind.TERMINATE

    async def _act(self, notice: Notice) -> None:
        message = pb.Preemption(
            source=notice.source,
            kind=notice.kind.value,
            deadline_unix=notice.deadline or 0.0,
            detail=notice.detail,
            noticed_unix=time.time(),
        )
        advisory = notice.deadline is None
        if advisory:
            log.warning("%s %s notice (advisory): %s", notice.source, notice.kind, notice.detail)
            if self.notice is None:
                self.notice = message
                await self._report(message, time.time() + 30.0)
            return
        left = notice.deadline - time.time() if notice.deadline is not None else 0.0
        log.warning(
            "%s %s notice: this node goes in %.0f s (%s); draining",
            notice.source,
            notice.kind,
            left,
            notice.detail,
        )
        self.notice = message
        self.drain()
        if notice.kind is NoticeKind.TERMINATE:  # a second SIGTERM stops the agent at once
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.stop.set)
        await self._report(message, message.deadline_unix)
        await self._until_empty(message.deadline_unix)
        if self.running() > 0 and not self._exits(notice):
            await self._until_empty(float("inf"))  # still here past its deadline: until empty
        message.drained = self.running() == 0  # the next heartbeat reports it
        self.drained.set()
        try:
            await self.source.acknowledge(notice)
        except Exception as exc:  # the event simply starts at its NotBefore then
            log.warning("could not acknowledge the %s notice: %s", notice.source, exc)
        if self._exits(notice):
            log.info("drained: the node agent stops now")
            self.stop.set()

    async def _report(self, message: pb.Preemption, until_unix: float) -> None:
        """Tell the controller now; retried until it answers or `until_unix`."""
        if self.report is None:
            return
        while True:
            try:
                await self.report(message)
                return
            except (grpc.aio.AioRpcError, OSError) as exc:
                if time.time() + REPORT_RETRY_S >= until_unix:
                    log.warning("notice not reported (%s); the heartbeats carry it", exc)
                    return
                log.warning("reporting the notice to the controller: %s; retrying", exc)
                await asyncio.sleep(REPORT_RETRY_S)

    async def _until_empty(self, deadline_unix: float) -> None:
        """Until this node runs no request and holds no instance, or the deadline."""
        while self.running() > 0 and time.time() < deadline_unix:
            await asyncio.sleep(EMPTY_CHECK_S)
        if self.running() > 0:
            log.warning("the deadline came with %d instance(s) still here", self.running())
        elif deadline_unix < float("inf"):
            log.info("drained %.1f s before the deadline", deadline_unix - time.time())
        else:
            log.info("drained, after the deadline")
