"""GCP: Spot/preemptible VM preemption and host maintenance from the Compute Engine metadata
server.

The contract, from Google's documentation:

- Querying (https://cloud.google.com/compute/docs/metadata/querying-metadata): requests go to
  `http://169.254.169.254/computeMetadata/v1/...` (also reachable as metadata.google.internal)
  and must carry `Metadata-Flavor: Google`; the server answers 403 without it (and to requests
  with `X-Forwarded-For`), and its responses carry `Metadata-Flavor: Google`. A 503 can happen
  during maintenance and is retried.
- Waiting for change (same page, "Wait for change"): `?wait_for_change=true` makes a hanging
  GET that returns when the value changes; `last_etag=<ETag of the value you have>` makes it
  return at once if the value already differs (so nothing is missed between two requests), and
  `timeout_sec=<n>` makes it return the unchanged value after n seconds.
- Preemption (https://cloud.google.com/compute/docs/instances/spot#preemption-process):
  `instance/preempted` turns from `FALSE` to `TRUE` when the VM is being preempted; the VM
  gets about 30 seconds before it is stopped.
- Maintenance (https://cloud.google.com/compute/docs/metadata/getting-live-migration-notice):
  `instance/maintenance-event` is `NONE`, then `MIGRATE_ON_HOST_MAINTENANCE` (live migration:
  the VM survives, not a notice) or `TERMINATE_ON_HOST_MAINTENANCE` (the VM is stopped), about
  60 seconds ahead.

Both keys are followed by their own hanging GET, concurrently, so a change to either is seen
within a round trip instead of a poll interval.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from spot.notices.base import (
    Backoff,
    FailureLog,
    MetadataUnavailable,
    Notice,
    NoticeKind,
    metadata_client,
    send,
)

ENDPOINT = "http://169.254.169.254"
PREFIX = "/computeMetadata/v1/instance/"
PREEMPTED = "preempted"
MAINTENANCE_EVENT = "maintenance-event"
FLAVOR_HEADER = "Metadata-Flavor"
HEADERS = {FLAVOR_HEADER: "Google"}
HANG_S = 60  # timeout_sec of a hanging GET: one request a minute per key while nothing changes
MAINTENANCE_VALUES = ("NONE", "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE")


class GcpSource:
    """Follows `instance/preempted` (PREEMPT) and `instance/maintenance-event` (MAINTENANCE)
    with hanging GETs. A notice is reported when a key turns to its notice value, once; a key
    that goes back (maintenance-event to NONE) can report again on its next turn."""

    name = "gcp"

    def __init__(
        self,
        endpoint: str = ENDPOINT,
        *,
        hang_s: int = HANG_S,
        preempt_notice_s: float = 30.0,
        maintenance_notice_s: float = 60.0,
        max_backoff_s: float = 5.0,
        request_timeout_s: float = 2.0,
    ) -> None:
        """`hang_s`: the `timeout_sec` of each hanging GET (whole seconds, as the server takes
        them); the client waits that long plus `request_timeout_s`. `max_backoff_s` stays well
        under the 30 seconds of a preemption."""
        if hang_s < 1:
            raise ValueError(f"hang_s must be a whole number of seconds >= 1, got {hang_s}")
        self.endpoint = endpoint
        self.hang_s = hang_s
        self.notice_s = {PREEMPTED: preempt_notice_s, MAINTENANCE_EVENT: maintenance_notice_s}
        self.max_backoff_s = max_backoff_s
        self.request_timeout_s = request_timeout_s
        self._client = metadata_client(endpoint, timeout_s=request_timeout_s)
        self._reported: dict[str, str | None] = {}  # key -> the value last reported as a notice

    async def watch(self) -> AsyncIterator[Notice]:
        # A follower that dies of something other than an unreadable server (a bug) hands its
        # exception over the queue, so watch() raises it instead of going quiet for that key.
        queue: asyncio.Queue[Notice | Exception] = asyncio.Queue()
        keys = (PREEMPTED, MAINTENANCE_EVENT)
        tasks = [asyncio.create_task(self._follow_or_report(key, queue)) for key in keys]
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def acknowledge(self, notice: Notice) -> None:
        """No-op: Compute Engine has no call to approve a preemption or maintenance."""

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _follow_or_report(self, key: str, queue: asyncio.Queue[Notice | Exception]) -> None:
        try:
            await self._follow(key, queue)
        except Exception as exc:  # not swallowed: watch() raises it
            queue.put_nowait(exc)

    async def _follow(self, key: str, queue: asyncio.Queue[Notice | Exception]) -> None:
        """Read `key`, then hang on it until it changes, forever; queue each new notice."""
        backoff = Backoff(min(1.0, self.max_backoff_s), self.max_backoff_s)
        failures = FailureLog(self.name)
        etag: str | None = None  # None: read the value now instead of waiting for a change
        while True:
            try:
                value, etag = await self._read(key, etag)
                notice = self._interpret(key, value)
            except MetadataUnavailable as exc:
                failures.failure(f"instance/{key}", exc)
                etag = None
                await asyncio.sleep(backoff.next_delay())
                continue
            failures.success()
            backoff.reset()
            if notice is None:
                self._reported[key] = None
            elif self._reported.get(key) != value:
                self._reported[key] = value
                queue.put_nowait(notice)

    async def _read(self, key: str, etag: str | None) -> tuple[str, str]:
        """The value of `key` and its ETag; with `etag`, after it changes from that (or after
        `hang_s`)."""
        params = {}
        timeout = self.request_timeout_s
        if etag is not None:
            params = {"wait_for_change": "true", "last_etag": etag, "timeout_sec": str(self.hang_s)}
            timeout += self.hang_s
        request = self._client.build_request(
            "GET", PREFIX + key, params=params, headers=HEADERS, timeout=timeout
        )
        response = await send(self._client, request)
        if response.status_code != 200:
            raise MetadataUnavailable(f"GET {PREFIX}{key}: HTTP {response.status_code}")
        if response.headers.get(FLAVOR_HEADER) != "Google":
            raise MetadataUnavailable(
                f"GET {PREFIX}{key}: no '{FLAVOR_HEADER}: Google' in the response, so it is "
                "not from the GCE metadata server"
            )
        new_etag = response.headers.get("ETag")
        if not new_etag:  # without it the next GET cannot wait, and would spin
            raise MetadataUnavailable(f"GET {PREFIX}{key}: no ETag in the response")
        return response.text.strip(), new_etag

    def _interpret(self, key: str, value: str) -> Notice | None:
        """The notice a key's value means, None for a normal value; raises
        `MetadataUnavailable` for a value the documentation does not list."""
        if key == PREEMPTED:
            if value not in ("TRUE", "FALSE"):
                raise MetadataUnavailable(f"instance/preempted is {value[:40]!r}, not TRUE/FALSE")
            is_notice = value == "TRUE"
            kind = NoticeKind.PREEMPT
        else:
            if value not in MAINTENANCE_VALUES:
                raise MetadataUnavailable(f"instance/maintenance-event is {value[:40]!r}")
            is_notice = value == "TERMINATE_ON_HOST_MAINTENANCE"
            kind = NoticeKind.MAINTENANCE
        if not is_notice:
            return None
        return Notice(
            source=self.name,
            kind=kind,
            deadline=time.time() + self.notice_s[key],
            detail=f"{key}={value}",
        )
