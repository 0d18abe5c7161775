"""AWS: Spot interruption notices and rebalance recommendations from the instance metadata
service (IMDSv2).

The contract, from AWS's documentation:

- Session tokens (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html):
  `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds: 1..21600` returns a token;
  every metadata `GET` carries it in `X-aws-ec2-metadata-token`. With IMDSv2 required, a `GET`
  with no token or an expired one is answered 401, and the client gets a new token.
- Interruption notices (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html):
  `GET /latest/meta-data/spot/instance-action` is 404 until EC2 decides to interrupt, then
  200 `{"action": "terminate"|"stop"|"hibernate", "time": "2017-09-18T08:22:00Z"}`, two minutes
  ahead (hibernation starts at once). AWS recommends checking every 5 seconds.
- Rebalance recommendations (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/rebalance-recommendations.html):
  `GET /latest/meta-data/events/recommendations/rebalance` is 404, then 200
  `{"noticeTime": "2020-11-05T08:22:00Z"}` when the instance is at elevated risk; advisory.

In a container on a bridge network the token PUT's answer needs two hops; with the instance's
default `HttpPutResponseHopLimit` of 1 it never arrives, and every poll times out (logged as
unreadable metadata). Raise the hop limit to 2 or run the agent on the host network.
"""

from __future__ import annotations

import json
import time
from datetime import datetime

import httpx2

from spot.notices.base import (
    MetadataUnavailable,
    Notice,
    NoticeKind,
    PolledSource,
    metadata_client,
    send,
)

ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TOKEN_TTL_S = 21600  # the largest TTL IMDS accepts (6 hours)
POLL_INTERVAL_S = 5.0  # AWS's recommendation


class AwsSource(PolledSource):
    """Polls IMDSv2 for `spot/instance-action` (PREEMPT) and the rebalance recommendation
    (REBALANCE). One token serves every poll until it is near expiry or a 401 says it expired.
    """

    name = "aws"

    def __init__(
        self,
        endpoint: str = ENDPOINT,
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
        max_backoff_s: float = 10.0,
        request_timeout_s: float = 2.0,
        token_ttl_s: int = MAX_TOKEN_TTL_S,
    ) -> None:
        """`max_backoff_s` stays well under the two-minute notice, so a flaky IMDS still leaves
        most of the notice for draining."""
        super().__init__(poll_interval_s=poll_interval_s, max_backoff_s=max_backoff_s)
        if not 1 <= token_ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(f"token_ttl_s must be in 1..{MAX_TOKEN_TTL_S}, got {token_ttl_s}")
        self.endpoint = endpoint
        self.token_ttl_s = token_ttl_s
        self.tokens_fetched = 0
        self._client = metadata_client(endpoint, timeout_s=request_timeout_s)
        self._token: str | None = None
        self._token_renew_at = 0.0  # time.monotonic() after which the token is renewed

    async def poll(self) -> list[Notice]:
        notices = []
        action = await self._get_json(INSTANCE_ACTION_PATH)
        if action is not None:
            notices.append(_instance_action_notice(action))
        rebalance = await self._get_json(REBALANCE_PATH)
        if rebalance is not None:
            notices.append(_rebalance_notice(rebalance))
        return notices

    async def acknowledge(self, notice: Notice) -> None:
        """No-op: EC2 has no call to approve an interruption."""

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _get_json(self, path: str) -> dict[str, object] | None:
        """The JSON object at `path`, or None for a 404 (no notice yet)."""
        response = await self._get(path, await self._valid_token())
        if response.status_code == 401:  # the token expired (or IMDS restarted): get a new one
            self._token = None
            response = await self._get(path, await self._valid_token())
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise MetadataUnavailable(f"GET {path}: HTTP {response.status_code}")
        try:
            body = json.loads(response.content)
        except ValueError as exc:
            raise MetadataUnavailable(f"GET {path}: not JSON: {response.content[:80]!r}") from exc
        if not isinstance(body, dict):
            raise MetadataUnavailable(f"GET {path}: not a JSON object: {body!r:.80}")
        return body

    async def _get(self, path: str, token: str) -> httpx2.Response:
        request = self._client.build_request("GET", path, headers={TOKEN_HEADER: token})
        return await send(self._client, request)

    async def _valid_token(self) -> str:
        """The cached session token, or a new one when there is none or it is near expiry."""
        if self._token is not None and time.monotonic() < self._token_renew_at:
            return self._token
        requested_at = time.monotonic()
        request = self._client.build_request(
            "PUT", TOKEN_PATH, headers={TTL_HEADER: str(self.token_ttl_s)}
        )
        response = await send(self._client, request)
        token = response.text.strip()
        if response.status_code != 200 or not token:
            raise MetadataUnavailable(f"PUT {TOKEN_PATH}: HTTP {response.status_code}")
        self.tokens_fetched += 1
        self._token = token
        # Renew at 90% of the TTL, counted from before the request, so it never lapses mid-poll.
        self._token_renew_at = requested_at + 0.9 * self.token_ttl_s
        return token


def _instance_action_notice(body: dict[str, object]) -> Notice:
    """PREEMPT at the document's `time`. An action other than the documented three still counts
    (the node goes either way); a body without a readable `time` is not a notice."""
    action, when = body.get("action"), body.get("time")
    if not isinstance(action, str) or not action or not isinstance(when, str):
        raise MetadataUnavailable(f"instance-action without action/time: {body!r:.120}")
    return Notice(
        source="aws",
        kind=NoticeKind.PREEMPT,
        deadline=_parse_time(when, "instance-action"),
        detail=f"action={action} time={when}",
    )


def _rebalance_notice(body: dict[str, object]) -> Notice:
    when = body.get("noticeTime")
    if not isinstance(when, str):
        raise MetadataUnavailable(f"rebalance recommendation without noticeTime: {body!r:.120}")
    _parse_time(when, "rebalance")  # a time that does not parse means the body is not IMDS's
    return Notice(
        source="aws", kind=NoticeKind.REBALANCE, deadline=None, detail=f"noticeTime={when}"
    )


def _parse_time(text: str, what: str) -> float:
    """IMDS's ISO 8601 UTC time ('2017-09-18T08:22:00Z') as unix time."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise MetadataUnavailable(f"{what}: time {text!r} is not ISO 8601") from exc
    if parsed.tzinfo is None:
        raise MetadataUnavailable(f"{what}: time {text!r} has no time zone")
    return parsed.timestamp()
