"""Choosing a source: by name (`make_source`), or by asking which cloud's metadata server
answers (`detect`, and `make_source("auto")`).

All three clouds serve metadata at 169.254.169.254, so an answer alone proves nothing; each
probe sends its cloud's required headers and checks what only that cloud answers: an AWS IMDSv2
session token, GCP's `Metadata-Flavor: Google` response header, Azure IMDS's `apiVersions` list
(https://learn.microsoft.com/en-us/azure/virtual-machines/instance-metadata-service#versions).
Azure is probed at /metadata/versions rather than at Scheduled Events because the first
Scheduled Events request of a VM can take minutes while the service starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx2

from spot.notices import aws, azure, gcp
from spot.notices.base import Notice, NoticeSource, metadata_client
from spot.notices.sigterm import SigtermSource

log = logging.getLogger(__name__)

SOURCE_NAMES = ("aws", "gcp", "azure", "sigterm", "auto")


def make_source(
    name: str,
    *,
    endpoint: str | None = None,
    poll_interval_s: float | None = None,
    grace_s: float = 30.0,
    resource_name: str | None = None,
) -> NoticeSource:
    """The source called `name` (aws|gcp|azure|sigterm|auto).

    `endpoint` replaces the documented metadata base URL (tests, private clouds; for "auto", the
    one URL all three probes go to). `poll_interval_s` replaces the cloud's default (AWS 5 s,
    Azure 1 s); for GCP it is the hanging GET's `timeout_sec`, rounded up to whole seconds.
    `grace_s` is the SIGTERM grace period; `resource_name` is Azure's VM name filter. Options a
    source does not use are ignored, so one configuration serves "auto".
    """
    if name == "aws":
        return aws.AwsSource(
            endpoint or aws.ENDPOINT, poll_interval_s=_or(poll_interval_s, aws.POLL_INTERVAL_S)
        )
    if name == "gcp":
        hang_s = gcp.HANG_S if poll_interval_s is None else max(1, math.ceil(poll_interval_s))
        return gcp.GcpSource(endpoint or gcp.ENDPOINT, hang_s=hang_s)
    if name == "azure":
        return azure.AzureSource(
            endpoint or azure.ENDPOINT,
            poll_interval_s=_or(poll_interval_s, azure.POLL_INTERVAL_S),
            resource_name=resource_name,
        )
    if name == "sigterm":
        return SigtermSource(grace_s)
    if name == "auto":
        return AutoSource(
            endpoint=endpoint,
            poll_interval_s=poll_interval_s,
            grace_s=grace_s,
            resource_name=resource_name,
        )
    raise ValueError(
        f"unknown notice source {name!r}: use one of {', '.join(SOURCE_NAMES)} "
        "('auto' asks each cloud's metadata server, and falls back to 'sigterm')"
    )


def _or(value: float | None, default: float) -> float:
    """`value` unless it is None (0 is kept, for the source to reject)."""
    return default if value is None else value


async def detect(
    *,
    aws_endpoint: str = aws.ENDPOINT,
    gcp_endpoint: str = gcp.ENDPOINT,
    azure_endpoint: str = azure.ENDPOINT,
    timeout_s: float = 1.0,
) -> str:
    """The name of the cloud whose metadata server answers ("aws", "gcp", "azure"), or
    "sigterm" when none does within `timeout_s`. The probes run concurrently, so this takes at
    most about `timeout_s`; off-cloud, a link-local address usually refuses or times out."""
    probes: dict[str, Callable[[httpx2.AsyncClient], Awaitable[bool]]] = {
        "aws": _is_aws,
        "gcp": _is_gcp,
        "azure": _is_azure,
    }
    endpoints = {"aws": aws_endpoint, "gcp": gcp_endpoint, "azure": azure_endpoint}
    answers = await asyncio.gather(
        *(_probe(name, endpoints[name], probe, timeout_s) for name, probe in probes.items())
    )
    for name, answered in zip(probes, answers, strict=True):
        if answered:
            log.info("notice source: detected %s metadata at %s", name, endpoints[name])
            return name
    log.info("notice source: no cloud metadata server answered; watching SIGTERM only")
    return "sigterm"


async def _probe(
    name: str,
    endpoint: str,
    probe: Callable[[httpx2.AsyncClient], Awaitable[bool]],
    timeout_s: float,
) -> bool:
    """Whether `probe` recognises `endpoint` within `timeout_s`; any failure is a no."""
    async with metadata_client(endpoint, timeout_s=timeout_s) as client:
        try:
            async with asyncio.timeout(timeout_s):
                return await probe(client)
        except (httpx2.HTTPError, TimeoutError) as exc:
            log.debug("notice source: %s probe at %s: %r", name, endpoint, exc)
            return False


async def _is_aws(client: httpx2.AsyncClient) -> bool:
    response = await client.put(aws.TOKEN_PATH, headers={aws.TTL_HEADER: "60"})
    return response.status_code == 200 and bool(response.text.strip())


async def _is_gcp(client: httpx2.AsyncClient) -> bool:
    response = await client.get(gcp.PREFIX + gcp.PREEMPTED, headers=gcp.HEADERS)
    return response.status_code == 200 and response.headers.get(gcp.FLAVOR_HEADER) == "Google"


async def _is_azure(client: httpx2.AsyncClient) -> bool:
    response = await client.get("/metadata/versions", headers=azure.HEADERS)
    if response.status_code != 200:
        return False
    try:
        body = json.loads(response.content)
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("apiVersions"), list)


class AutoSource:
    """`make_source("auto")`: detects the cloud when first watched, then is that cloud's
    source. `name` is "auto" until then, the chosen source's name after."""

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        poll_interval_s: float | None = None,
        grace_s: float = 30.0,
        resource_name: str | None = None,
        detect_timeout_s: float = 1.0,
    ) -> None:
        self.name = "auto"
        self.endpoint = endpoint
        self.poll_interval_s = poll_interval_s
        self.grace_s = grace_s
        self.resource_name = resource_name
        self.detect_timeout_s = detect_timeout_s
        self.source: NoticeSource | None = None
        """The chosen source, once `resolve()` ran."""
        self._lock = asyncio.Lock()

    async def resolve(self) -> NoticeSource:
        """Detect the cloud (once) and build its source."""
        async with self._lock:
            if self.source is None:
                urls = (
                    {}
                    if self.endpoint is None
                    else {f"{cloud}_endpoint": self.endpoint for cloud in ("aws", "gcp", "azure")}
                )
                chosen = await detect(timeout_s=self.detect_timeout_s, **urls)
                self.source = make_source(
                    chosen,
                    endpoint=self.endpoint,
                    poll_interval_s=self.poll_interval_s,
                    grace_s=self.grace_s,
                    resource_name=self.resource_name,
                )
                self.name = self.source.name
            return self.source

    async def watch(self) -> AsyncIterator[Notice]:
        source = await self.resolve()
        notices = source.watch()
        try:
            async for notice in notices:
                yield notice
        finally:
            # Close the inner generator now, so its tasks (GCP's hanging GETs) and signal
            # handler go with ours instead of whenever it is garbage-collected.
            aclose = getattr(notices, "aclose", None)
            if aclose is not None:
                await aclose()

    async def acknowledge(self, notice: Notice) -> None:
        if self.source is not None:
            await self.source.acknowledge(notice)

    async def aclose(self) -> None:
        if self.source is not None:
            await self.source.aclose()
