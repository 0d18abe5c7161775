"""What a preemption notice is, the interface every source follows, and the retry machinery
they share.

A source turns one cloud's way of announcing "this node is going away" into `Notice` values.
The node agent runs one source's `watch()` in its event loop and reports each notice to the
controller, which drains the node before the deadline. A metadata server that is down or
answers nonsense must never be mistaken for a notice (draining a healthy node costs capacity)
nor kill the watcher (the next answer may be the real notice), so every source retries with
capped backoff and logs failures rate-limited: a node whose metadata server is unreachable for
an hour logs a line a minute, not one per poll.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import httpx2

log = logging.getLogger(__name__)


class NoticeKind(enum.StrEnum):
    """Why the node is going away, which decides how urgently to drain it."""

    PREEMPT = "preempt"
    """The cloud takes the node back at `deadline` (AWS instance-action, GCP preempted, Azure
    Preempt/Terminate)."""
    REBALANCE = "rebalance"
    """AWS rebalance recommendation: the risk of preemption went up; no deadline (advisory)."""
    MAINTENANCE = "maintenance"
    """Host maintenance that stops the node (GCP TERMINATE_ON_HOST_MAINTENANCE, Azure
    Reboot/Redeploy)."""
    TERMINATE = "terminate"
    """SIGTERM from an orchestrator: drain within the grace period."""


@dataclass(frozen=True)
class Notice:
    """One announcement that the node will go away, as the metadata said it."""

    source: str
    """Which source saw it: "aws", "gcp", "azure" or "sigterm"."""
    kind: NoticeKind
    deadline: float | None
    """Unix time (the `time.time()` clock) at which the node goes; None for advisory notices."""
    detail: str
    """What the metadata said, for the log (e.g. 'action=terminate time=2017-09-18T08:22:00Z')."""
    event_id: str | None = None
    """The cloud's id for the event, where it has one to acknowledge (Azure's EventId)."""


@runtime_checkable
class NoticeSource(Protocol):
    """A watcher of one kind of preemption notice.

    The node agent calls `watch()` once and iterates it in its event loop until it cancels the
    task; `acknowledge` once it has drained after a notice; `aclose` when it shuts down.
    """

    name: str

    def watch(self) -> AsyncIterator[Notice]:
        """Yield each new notice once (not again on every poll), until cancelled.

        A metadata server that is down, times out, or answers garbage or a 5xx is logged
        (rate-limited) and retried with capped backoff; it never raises out of `watch()` and
        never counts as a notice.
        """
        ...

    async def acknowledge(self, notice: Notice) -> None:
        """Tell the cloud the node has drained, so the event may start early (Azure); a no-op
        where the cloud has no such call."""
        ...

    async def aclose(self) -> None:
        """Release the HTTP client and signal handlers; the source cannot be watched again."""
        ...


class MetadataUnavailable(Exception):
    """The metadata server could not be read this time: down, timed out, a 5xx, a rejection or
    an answer that is not the documented shape. Sources raise it from one poll and catch it in
    their retry loop; it never leaves `watch()`."""


class Backoff:
    """Capped exponential delay between failed attempts, reset by a success.

    No jitter: each node polls its own link-local metadata server, so there is no herd of
    clients to spread out, and a predictable delay keeps the worst-case notice latency at
    `cap_s`.
    """

    def __init__(self, initial_s: float, cap_s: float) -> None:
        if initial_s <= 0 or cap_s < initial_s:
            raise ValueError(
                f"backoff needs 0 < initial_s <= cap_s, got initial_s={initial_s}, cap_s={cap_s}"
            )
        self.initial_s = initial_s
        self.cap_s = cap_s
        self._next_s = initial_s

    def next_delay(self) -> float:
        """The delay before the next attempt; doubles up to `cap_s` on each call."""
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self.cap_s)
        return delay

    def reset(self) -> None:
        self._next_s = self.initial_s


class FailureLog:
    """Logs a source's failures at most once per `every_s`, and its recovery once.

    The first failure of a run is logged at once (someone should know the notices are not
    being watched); later ones are counted and summarised every `every_s`.
    """

    def __init__(
        self, source: str, *, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.source = source
        self.every_s = every_s
        self.failures = 0
        """Failures since the last success."""
        self._clock = clock
        self._last_logged: float | None = None
        self._unlogged = 0

    def failure(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        now = self._clock()
        if self._last_logged is not None and now - self._last_logged < self.every_s:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more failures since the last report)" if self._unlogged else ""
        log.warning(
            "%s notices: cannot read %s: %s; retrying with backoff%s", self.source, what, exc, more
        )
        self._last_logged = now
        self._unlogged = 0

    def success(self) -> None:
        if self.failures:
            log.info(
                "%s notices: metadata readable again after %d failures", self.source, self.failures
            )
        self.failures = 0
        self._last_logged = None
        self._unlogged = 0


def metadata_client(endpoint: str, *, timeout_s: float) -> httpx2.AsyncClient:
    """An HTTP client for a link-local metadata server.

    `trust_env=False`: an HTTP(S)_PROXY in the environment must not route 169.254.169.254
    through a proxy (the proxy would answer for a different machine, or not at all), and no
    netrc credentials belong on these requests.
    """
    timeout = httpx2.Timeout(timeout_s, connect=min(timeout_s, 1.0))
    return httpx2.AsyncClient(base_url=endpoint, timeout=timeout, trust_env=False)


async def send(client: httpx2.AsyncClient, request: httpx2.Request) -> httpx2.Response:
    """Send `request`, turning transport failures (refused, reset, timed out) into
    `MetadataUnavailable`."""
    try:
        return await client.send(request)
    except httpx2.HTTPError as exc:
        raise MetadataUnavailable(f"{request.method} {request.url.path}: {exc!r}") from exc


class PolledSource(abc.ABC):
    """A source that asks its metadata server every `poll_interval_s` (AWS, Azure).

    Subclasses implement `poll()`, one look at the metadata. This class owns the loop: it yields
    each notice whose `dedup_key` it has not seen before, and turns a `MetadataUnavailable` into
    a logged failure and a backoff. The seen keys live on the source, so a watcher that is
    cancelled and restarted does not report the same event twice.
    """

    name: str

    def __init__(self, *, poll_interval_s: float, max_backoff_s: float) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self.poll_interval_s = poll_interval_s
        self._backoff = Backoff(min(poll_interval_s, max_backoff_s), max_backoff_s)
        self._failures = FailureLog(self.name)
        self._seen: set[Hashable] = set()

    @abc.abstractmethod
    async def poll(self) -> list[Notice]:
        """The notices the metadata shows now (seen or not); raises `MetadataUnavailable`."""

    def dedup_key(self, notice: Notice) -> Hashable:
        """What makes two notices the same event (default: kind and what the metadata said)."""
        return (notice.kind, notice.detail)

    async def watch(self) -> AsyncIterator[Notice]:
        while True:
            try:
                notices = await self.poll()
            except MetadataUnavailable as exc:
                self._failures.failure(f"{self.name} metadata", exc)
                await asyncio.sleep(self._backoff.next_delay())
                continue
            self._failures.success()
            self._backoff.reset()
            for notice in notices:
                key = self.dedup_key(notice)
                if key not in self._seen:
                    self._seen.add(key)
                    yield notice
            await asyncio.sleep(self.poll_interval_s)
