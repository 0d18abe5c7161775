"""Azure: Spot eviction and host events from Scheduled Events (Azure Instance Metadata Service).

The contract, from https://learn.microsoft.com/en-us/azure/virtual-machines/linux/scheduled-events:

- `GET /metadata/scheduledevents?api-version=2020-07-01` with the header `Metadata: true`
  (IMDS answers 400 without it, and rejects requests carrying `X-Forwarded-For`) returns
  `{"DocumentIncarnation": n, "Events": [...]}`; the incarnation goes up whenever the list
  changes. Each event has `EventId`, `EventType` (`Freeze`, `Reboot`, `Redeploy`, `Preempt`,
  `Terminate`), `ResourceType` ("VirtualMachine"), `Resources` (the VM names it affects: the
  document is shared by every VM of an availability set or scale-set placement group),
  `EventStatus` (`Scheduled`, then `Started`), `NotBefore` (an RFC 1123 time such as
  "Mon, 19 Sep 2016 18:29:47 GMT"; empty once Started), `Description`, `EventSource`,
  `DurationInSeconds`.
- A Spot VM's eviction is a `Preempt` event at least 30 seconds ahead.
- `POST` to the same URL with `{"StartRequests": [{"EventId": ...}]}` approves an event, so it
  starts now instead of at `NotBefore`.

Preempt and Terminate are PREEMPT notices; Reboot and Redeploy stop the processes on the VM, so
they are MAINTENANCE notices; Freeze (a pause of seconds, e.g. live migration) is not a notice:
the node comes back with its state. The docs suggest polling every second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Hashable
from email.utils import parsedate_to_datetime

from spot.notices.base import (
    MetadataUnavailable,
    Notice,
    NoticeKind,
    PolledSource,
    metadata_client,
    send,
)

log = logging.getLogger(__name__)

ENDPOINT = "http://169.254.169.254"
PATH = "/metadata/scheduledevents"
API_VERSION = "2020-07-01"
HEADERS = {"Metadata": "true"}
KINDS = {
    "Preempt": NoticeKind.PREEMPT,
    "Terminate": NoticeKind.PREEMPT,
    "Reboot": NoticeKind.MAINTENANCE,
    "Redeploy": NoticeKind.MAINTENANCE,
}
ACTIVE_STATUSES = ("Scheduled", "Started")
ACK_ATTEMPTS = 3
POLL_INTERVAL_S = 1.0  # the documentation's suggestion


class AzureSource(PolledSource):
    """Polls Scheduled Events; each event is reported once (by `EventId`), and `acknowledge`
    approves it once the node has drained."""

    name = "azure"

    def __init__(
        self,
        endpoint: str = ENDPOINT,
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
        max_backoff_s: float = 5.0,
        request_timeout_s: float = 2.0,
        resource_name: str | None = None,
    ) -> None:
        """`resource_name`: report only events whose `Resources` name this VM. Without it every
        event in the document counts, including a sibling VM's in the same availability set.
        `max_backoff_s` stays well under a Preempt's 30 seconds of notice."""
        super().__init__(poll_interval_s=poll_interval_s, max_backoff_s=max_backoff_s)
        self.endpoint = endpoint
        self.resource_name = resource_name
        self.incarnation: int | None = None
        """The last DocumentIncarnation read (for the log and tests)."""
        self._client = metadata_client(endpoint, timeout_s=request_timeout_s)

    async def poll(self) -> list[Notice]:
        request = self._client.build_request(
            "GET", PATH, params={"api-version": API_VERSION}, headers=HEADERS
        )
        response = await send(self._client, request)
        if response.status_code != 200:
            raise MetadataUnavailable(f"GET {PATH}: HTTP {response.status_code}")
        events = self._read_document(response.content)
        return [n for e in events if (n := self._notice(e)) is not None]

    def dedup_key(self, notice: Notice) -> Hashable:
        """The EventId: an event moving from Scheduled to Started is the same event."""
        return notice.event_id

    async def acknowledge(self, notice: Notice) -> None:
        """Approve the event (StartRequests), retried a few times, then logged and given up: the
        event starts at NotBefore anyway, so a failed approval only loses the early start, and
        every caller would otherwise wrap this in the same try/except."""
        if notice.source != self.name or notice.event_id is None:
            raise ValueError(
                f"cannot acknowledge {notice!r} on Azure: only Azure notices with an event_id "
                "(EventId) can be approved"
            )
        body = {"StartRequests": [{"EventId": notice.event_id}]}
        for attempt in range(1, ACK_ATTEMPTS + 1):
            request = self._client.build_request(
                "POST", PATH, params={"api-version": API_VERSION}, headers=HEADERS, json=body
            )
            try:
                response = await send(self._client, request)
            except MetadataUnavailable as exc:
                outcome = str(exc)
            else:
                if response.status_code == 200:
                    log.info("azure notices: approved event %s", notice.event_id)
                    return
                outcome = f"HTTP {response.status_code}"
            if attempt < ACK_ATTEMPTS:
                await asyncio.sleep(0.2 * attempt)
        log.warning(
            "azure notices: could not approve event %s (%s); it starts at its NotBefore",
            notice.event_id,
            outcome,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _read_document(self, content: bytes) -> list[dict[str, object]]:
        """The events of a Scheduled Events document; raises `MetadataUnavailable` when the body
        is not one."""
        try:
            document = json.loads(content)
        except ValueError as exc:
            raise MetadataUnavailable(f"GET {PATH}: not JSON: {content[:80]!r}") from exc
        if not isinstance(document, dict):
            raise MetadataUnavailable(f"GET {PATH}: not a JSON object: {document!r:.80}")
        incarnation, events = document.get("DocumentIncarnation"), document.get("Events")
        if not isinstance(incarnation, int) or not isinstance(events, list):
            raise MetadataUnavailable(
                f"GET {PATH}: no DocumentIncarnation/Events: {document!r:.120}"
            )
        if not all(isinstance(e, dict) for e in events):
            raise MetadataUnavailable(f"GET {PATH}: an event is not an object: {events!r:.120}")
        self.incarnation = incarnation
        return events

    def _notice(self, event: dict[str, object]) -> Notice | None:
        """The notice an event means for this node, or None (another VM's, a Freeze, over)."""
        event_id, event_type = event.get("EventId"), event.get("EventType")
        if not isinstance(event_id, str) or not isinstance(event_type, str):
            raise MetadataUnavailable(f"event without EventId/EventType: {event!r:.120}")
        kind = KINDS.get(event_type)
        status = event.get("EventStatus")
        resources = event.get("Resources")
        if kind is None or status not in ACTIVE_STATUSES:
            return None
        if self.resource_name is not None and (
            not isinstance(resources, list) or self.resource_name not in resources
        ):
            return None
        not_before = event.get("NotBefore", "")
        if not isinstance(not_before, str):
            raise MetadataUnavailable(f"event {event_id}: NotBefore {not_before!r} not a string")
        return Notice(
            source=self.name,
            kind=kind,
            deadline=_parse_not_before(not_before, event_id),
            detail=(
                f"EventType={event_type} EventStatus={status} NotBefore={not_before!r} "
                f"Resources={resources} EventSource={event.get('EventSource')}"
            ),
            event_id=event_id,
        )


def _parse_not_before(text: str, event_id: str) -> float:
    """NotBefore as unix time; empty (a Started event) means now."""
    if not text:
        return time.time()
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError) as exc:
        raise MetadataUnavailable(f"event {event_id}: NotBefore {text!r} is not a date") from exc
