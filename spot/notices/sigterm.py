"""SIGTERM: the notice an orchestrator gives (Kubernetes, systemd, docker stop, and the clouds'
own shutdown paths): stop within a grace period, then SIGKILL.

Kubernetes sends SIGTERM and waits `terminationGracePeriodSeconds` (30 by default) before
SIGKILL (https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-termination),
hence the default `grace_s`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

from spot.notices.base import Notice, NoticeKind

log = logging.getLogger(__name__)


class SigtermSource:
    """Yields one TERMINATE notice, deadline = arrival + `grace_s`, when SIGTERM arrives.

    `watch()` installs the handler with `loop.add_signal_handler` (main thread, Unix), so the
    signal wakes the event loop instead of interrupting whatever it runs; `aclose()` (or the end
    of `watch()`) puts back the handler that was there before. Code that owns signal handling
    itself passes `install_handler=False` and calls `trigger()` from the event loop's thread
    (`loop.call_soon_threadsafe(source.trigger)` from elsewhere).
    """

    name = "sigterm"

    def __init__(self, grace_s: float = 30.0, *, install_handler: bool = True) -> None:
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        self.grace_s = grace_s
        self.install_handler = install_handler
        self._deadline: float | None = None  # set by the first trigger()
        self._reported = False
        self._wakeup: asyncio.Event | None = None  # made in watch(), bound to its loop
        self._loop: asyncio.AbstractEventLoop | None = None  # where the handler is installed
        self._previous: Any = None  # the SIGTERM handler before ours

    @property
    def installed(self) -> bool:
        """Whether our SIGTERM handler is in place now."""
        return self._loop is not None

    def trigger(self) -> None:
        """Record a termination request now; `watch()` yields its notice. Later calls keep the
        first deadline: a second SIGTERM does not extend the grace period."""
        if self._deadline is None:
            self._deadline = time.time() + self.grace_s
            log.info("sigterm notices: termination requested, %.0f s to drain", self.grace_s)
        if self._wakeup is not None:
            self._wakeup.set()

    async def watch(self) -> AsyncIterator[Notice]:
        self._wakeup = asyncio.Event()
        if self.install_handler:
            self._install(asyncio.get_running_loop())
        try:
            if self._deadline is None:
                await self._wakeup.wait()
            if not self._reported:
                self._reported = True
                yield Notice(
                    source=self.name,
                    kind=NoticeKind.TERMINATE,
                    deadline=self._deadline,
                    detail=f"SIGTERM, grace {self.grace_s:g} s",
                )
            await asyncio.Event().wait()  # one notice per process; run until cancelled
        finally:
            self._uninstall()

    async def acknowledge(self, notice: Notice) -> None:
        """No-op: the orchestrator waits for the process to exit, not for an answer."""

    async def aclose(self) -> None:
        self._uninstall()

    def _install(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None:
            return
        previous = signal.getsignal(signal.SIGTERM)
        try:
            loop.add_signal_handler(signal.SIGTERM, self.trigger)
        except (NotImplementedError, RuntimeError, ValueError) as exc:
            # Not Unix, or not the main thread: only trigger() can report a termination.
            log.warning("sigterm notices: cannot install a SIGTERM handler (%s)", exc)
            return
        self._previous = previous
        self._loop = loop

    def _uninstall(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if not loop.is_closed():
            loop.remove_signal_handler(signal.SIGTERM)
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
