"""spot.notices against loopback servers that follow each cloud's metadata contract
(tests/cloud_metadata.py): notices are seen once, with the right kind and deadline; failures
are survived; the documented headers are sent and checked; detection picks the right cloud.

Nothing sleeps to synchronise: tests wait on the servers' request counters or on the watcher's
output, with a timeout. Poll intervals and backoffs are tiny so each test takes well under a
second (the GCP ones that wait for a hanging GET's timeout_sec take about one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, TypeVar

import httpx2
import pytest
from cloud_metadata import (
    AWS_INSTANCE_ACTION_PATH,
    AWS_REBALANCE_PATH,
    AWS_TOKEN_PATH,
    AZURE_EVENTS_PATH,
    GCP_PREFIX,
    AwsImds,
    AzureScheduledEvents,
    Fault,
    GcpMetadata,
    MetadataServer,
    closed_port_url,
    rfc1123,
)

from spot.notices import (
    AutoSource,
    AwsSource,
    AzureSource,
    GcpSource,
    Notice,
    NoticeKind,
    NoticeSource,
    SigtermSource,
    detect,
    make_source,
)

T = TypeVar("T")
WAIT_S = 5.0  # the longest any condition below may take before the test fails
FAST = {"poll_interval_s": 0.01, "max_backoff_s": 0.05}
PREEMPTED = GCP_PREFIX + "preempted"
MAINTENANCE = GCP_PREFIX + "maintenance-event"


def run(scenario: Coroutine[Any, Any, T]) -> T:
    """Run a test's coroutine in a fresh event loop, failing it if it hangs."""
    return asyncio.run(asyncio.wait_for(scenario, 20))


async def until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Wait (yielding to the loop) until `condition()` holds; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)


class Watcher:
    """Runs `source.watch()` in a task and collects what it yields; on exit, cancels it (an
    exception out of watch() fails the test) and closes the source."""

    def __init__(self, source: NoticeSource) -> None:
        self.source = source
        self.notices: list[Notice] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.source.aclose()

    async def _collect(self) -> None:
        async for notice in self.source.watch():
            self.notices.append(notice)

    async def wait_for(self, n: int) -> list[Notice]:
        """The first `n` notices, once there are that many."""

        def arrived() -> bool:
            assert self._task is not None
            if self._task.done():  # watch() must never end on its own
                self._task.result()
                pytest.fail("watch() returned")
            return len(self.notices) >= n

        await until(arrived, f"{n} notice(s), have {self.notices}")
        return self.notices[:n]


@pytest.fixture
def aws() -> Iterator[AwsImds]:
    with AwsImds(stall_s=1.0) as server:
        yield server


@pytest.fixture
def gcp() -> Iterator[GcpMetadata]:
    with GcpMetadata(stall_s=1.0) as server:
        yield server


@pytest.fixture
def azure() -> Iterator[AzureScheduledEvents]:
    with AzureScheduledEvents(stall_s=1.0) as server:
        yield server


def aws_source(server: AwsImds, **overrides: Any) -> AwsSource:
    return AwsSource(server.url, **{**FAST, "request_timeout_s": 0.4, **overrides})


def gcp_source(server: GcpMetadata, **overrides: Any) -> GcpSource:
    options = {"hang_s": 1, "max_backoff_s": 0.05, "request_timeout_s": 0.4, **overrides}
    return GcpSource(server.url, **options)


def azure_source(server: AzureScheduledEvents, **overrides: Any) -> AzureSource:
    return AzureSource(server.url, **{**FAST, "request_timeout_s": 0.4, **overrides})


def iso_to_unix(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# -- AWS ---------------------------------------------------------------------------------------


def test_aws_no_notice_while_polling(aws: AwsImds) -> None:
    async def scenario() -> None:
        async with Watcher(aws_source(aws)) as watcher:
            await until(lambda: aws.count(AWS_INSTANCE_ACTION_PATH) >= 5, "5 polls")
            await until(lambda: aws.count(AWS_REBALANCE_PATH) >= 5, "5 rebalance polls")
            assert watcher.notices == []
        assert aws.count(status=404) >= 10  # the documented "no notice" answer
        assert aws.count(AWS_TOKEN_PATH, method="PUT") == 1  # one token serves every poll

    run(scenario())


def test_aws_instance_action_is_one_preempt_at_its_time(aws: AwsImds) -> None:
    async def scenario() -> None:
        async with Watcher(aws_source(aws)) as watcher:
            await until(lambda: aws.count(AWS_INSTANCE_ACTION_PATH) >= 2, "polls")
            when = "2030-01-02T03:04:05Z"
            httpx2.post(
                f"{aws.url}/_inject",
                json={"instance-action": {"action": "stop", "time": when}},
                trust_env=False,
            )
            [notice] = await watcher.wait_for(1)
            seen = aws.count(AWS_INSTANCE_ACTION_PATH)
            await until(lambda: aws.count(AWS_INSTANCE_ACTION_PATH) >= seen + 3, "more polls")
            assert watcher.notices == [notice]  # once, not on every poll
        assert notice == Notice(
            source="aws",
            kind=NoticeKind.PREEMPT,
            deadline=iso_to_unix(when),
            detail=f"action=stop time={when}",
        )

    run(scenario())


def test_aws_rebalance_is_advisory(aws: AwsImds) -> None:
    async def scenario() -> None:
        async with Watcher(aws_source(aws)) as watcher:
            notice_time = aws.inject_rebalance("2030-01-02T03:00:00Z")
            [notice] = await watcher.wait_for(1)
            assert (notice.kind, notice.deadline) == (NoticeKind.REBALANCE, None)
            assert notice.detail == f"noticeTime={notice_time}"
            when = aws.inject_instance_action("terminate")
            _, preempt = await watcher.wait_for(2)
            assert (preempt.kind, preempt.deadline) == (NoticeKind.PREEMPT, iso_to_unix(when))

    run(scenario())


def test_aws_expired_token_is_renewed_and_polling_goes_on(aws: AwsImds) -> None:
    async def scenario() -> None:
        source = aws_source(aws)
        async with Watcher(source) as watcher:
            await until(lambda: aws.count(AWS_INSTANCE_ACTION_PATH) >= 2, "polls")
            assert source.tokens_fetched == 1
            aws.expire_tokens()
            await until(lambda: aws.count(AWS_TOKEN_PATH, method="PUT") >= 2, "a new token")
            when = aws.inject_instance_action()
            [notice] = await watcher.wait_for(1)
        assert aws.count(status=401) >= 1  # the expired token was refused...
        assert source.tokens_fetched == 2  # ...and replaced once
        assert notice.deadline == iso_to_unix(when)

    run(scenario())


def test_aws_server_requires_token_and_ttl_header(aws: AwsImds) -> None:
    with httpx2.Client(base_url=aws.url, trust_env=False) as client:
        assert client.put(AWS_TOKEN_PATH).status_code == 400
        assert (
            client.put(
                AWS_TOKEN_PATH, headers={"X-aws-ec2-metadata-token-ttl-seconds": "0"}
            ).status_code
            == 400
        )
        forwarded = {"X-aws-ec2-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "1.2.3.4"}
        assert client.put(AWS_TOKEN_PATH, headers=forwarded).status_code == 403
        assert client.get(AWS_INSTANCE_ACTION_PATH).status_code == 401
        bogus = {"X-aws-ec2-metadata-token": "not-a-token"}
        assert client.get(AWS_INSTANCE_ACTION_PATH, headers=bogus).status_code == 401
        token = client.put(AWS_TOKEN_PATH, headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        assert token.status_code == 200
        good = {"X-aws-ec2-metadata-token": token.text}
        assert client.get(AWS_INSTANCE_ACTION_PATH, headers=good).status_code == 404


def test_aws_client_sends_ttl_and_token_headers(aws: AwsImds) -> None:
    async def scenario() -> None:
        async with Watcher(aws_source(aws, token_ttl_s=600)):
            await until(lambda: aws.count(AWS_INSTANCE_ACTION_PATH) >= 3, "polls")

    run(scenario())
    [put] = [r for r in aws.records if r.method == "PUT"]
    assert put.headers["x-aws-ec2-metadata-token-ttl-seconds"] == "600"
    gets = [r for r in aws.records if r.method == "GET"]
    assert gets and all(r.headers.get("x-aws-ec2-metadata-token") for r in gets)
    assert all(r.status in (200, 404) for r in aws.records)  # nothing was refused


# -- GCP ---------------------------------------------------------------------------------------


def test_gcp_no_notice_while_watching(gcp: GcpMetadata) -> None:
    async def scenario() -> None:
        async with Watcher(gcp_source(gcp)) as watcher:
            # a plain read, then hanging GETs that return unchanged after timeout_sec=1
            await until(lambda: gcp.count(PREEMPTED) >= 3, "3 reads of preempted")
            await until(lambda: gcp.count(MAINTENANCE) >= 3, "3 reads of maintenance-event")
            assert watcher.notices == []
        waits = [r for r in gcp.records if r.query.get("wait_for_change") == "true"]
        assert waits and all(r.query["timeout_sec"] == "1" and r.query["last_etag"] for r in waits)

    run(scenario())


def test_gcp_preempted_is_one_preempt_30_s_ahead(gcp: GcpMetadata) -> None:
    async def scenario() -> None:
        async with Watcher(gcp_source(gcp)) as watcher:
            await until(lambda: gcp.waiting == 2, "both keys hanging")
            injected_at = time.time()
            httpx2.post(f"{gcp.url}/_inject", json={"preempted": "TRUE"}, trust_env=False)
            [notice] = await watcher.wait_for(1)
            seen = gcp.count(PREEMPTED)
            await until(lambda: gcp.count(PREEMPTED) >= seen + 1, "another read")
            await until(lambda: gcp.waiting == 2, "both keys hanging again")
            assert watcher.notices == [notice]
        assert (notice.source, notice.kind, notice.detail) == (
            "gcp",
            NoticeKind.PREEMPT,
            "preempted=TRUE",
        )
        assert notice.deadline is not None
        assert injected_at + 30 <= notice.deadline < injected_at + 31

    run(scenario())


def test_gcp_terminate_maintenance_is_a_notice_and_migrate_is_not(gcp: GcpMetadata) -> None:
    async def scenario() -> None:
        async with Watcher(gcp_source(gcp)) as watcher:
            await until(lambda: gcp.waiting == 2, "both keys hanging")
            reads = gcp.count(MAINTENANCE)
            gcp.set_value("maintenance-event", "MIGRATE_ON_HOST_MAINTENANCE")
            await until(lambda: gcp.count(MAINTENANCE) >= reads + 1, "a read after MIGRATE")
            assert watcher.notices == []
            injected_at = time.time()
            gcp.set_value("maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE")
            [notice] = await watcher.wait_for(1)
        assert notice.kind == NoticeKind.MAINTENANCE
        assert notice.detail == "maintenance-event=TERMINATE_ON_HOST_MAINTENANCE"
        assert notice.deadline is not None
        assert injected_at + 60 <= notice.deadline < injected_at + 61

    run(scenario())


def test_gcp_hanging_get_returns_on_change(gcp: GcpMetadata) -> None:
    async def scenario() -> None:
        async with Watcher(gcp_source(gcp, hang_s=30)) as watcher:
            await until(lambda: gcp.waiting == 2, "both keys hanging")
            assert gcp.count(PREEMPTED) == 2  # the first read, then one hanging GET
            started = time.monotonic()
            gcp.set_value("preempted", "TRUE")
            await watcher.wait_for(1)
            assert time.monotonic() - started < 2  # the hanging GET answered, not its timeout
            await until(lambda: gcp.waiting == 2, "both keys hanging again")
        # The first read, the GET that hung on FALSE and answered TRUE, and one hanging on TRUE:
        # no extra read was needed to see the change.
        reads = [r for r in gcp.records if r.path == PREEMPTED]
        assert [r.query.get("last_etag") for r in reads] == [
            None,
            GcpMetadata.etag("FALSE"),
            GcpMetadata.etag("TRUE"),
        ]
        assert reads[1].status == 200 and reads[1].query["timeout_sec"] == "30"

    run(scenario())


def test_gcp_server_requires_flavor_header_and_client_sends_it(gcp: GcpMetadata) -> None:
    with httpx2.Client(base_url=gcp.url, trust_env=False) as client:
        assert client.get(PREEMPTED).status_code == 403
        forwarded = {"Metadata-Flavor": "Google", "X-Forwarded-For": "1.2.3.4"}
        assert client.get(PREEMPTED, headers=forwarded).status_code == 403
        ok = client.get(PREEMPTED, headers={"Metadata-Flavor": "Google"})
        assert (ok.status_code, ok.text, ok.headers["Metadata-Flavor"]) == (200, "FALSE", "Google")

    async def scenario() -> None:
        async with Watcher(gcp_source(gcp)):
            await until(lambda: gcp.count(PREEMPTED, status=200) >= 2, "answered reads")

    run(scenario())
    watched = gcp.records[3:]  # after the three requests above
    assert watched and all(r.headers.get("metadata-flavor") == "Google" for r in watched)


def test_gcp_bug_in_a_follower_raises_out_of_watch(
    gcp: GcpMetadata, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an unreadable server is retried; a bug must not leave a key silently unwatched."""

    def broken(self: GcpSource, key: str, value: str) -> Notice | None:
        raise RuntimeError(f"bug reading {key}")

    monkeypatch.setattr(GcpSource, "_interpret", broken)

    async def scenario() -> None:
        source = gcp_source(gcp)
        with pytest.raises(RuntimeError, match="bug reading"):
            async for _ in source.watch():
                pass
        await source.aclose()

    run(scenario())


# -- Azure -------------------------------------------------------------------------------------


def test_azure_no_notice_while_polling(azure: AzureScheduledEvents) -> None:
    async def scenario() -> None:
        async with Watcher(azure_source(azure)) as watcher:
            azure.inject_event("Freeze")  # a pause of seconds: the node survives it
            await until(lambda: azure.count(AZURE_EVENTS_PATH) >= 5, "5 polls")
            assert watcher.notices == []

    run(scenario())
    assert all(r.status == 200 for r in azure.records)


def test_azure_preempt_is_one_notice_at_not_before(azure: AzureScheduledEvents) -> None:
    async def scenario() -> None:
        source = azure_source(azure)
        async with Watcher(source) as watcher:
            await until(lambda: azure.count(AZURE_EVENTS_PATH) >= 2, "polls")
            not_before = "Mon, 19 Sep 2033 18:29:47 GMT"
            event = {"EventType": "Preempt", "NotBefore": not_before, "EventId": "E-1"}
            httpx2.post(f"{azure.url}/_inject", json=event, trust_env=False)
            [notice] = await watcher.wait_for(1)
            seen = azure.count(AZURE_EVENTS_PATH)
            await until(lambda: azure.count(AZURE_EVENTS_PATH) >= seen + 3, "more polls")
            assert watcher.notices == [notice]
            assert source.incarnation == azure.incarnation
        assert (notice.source, notice.kind, notice.event_id) == ("azure", NoticeKind.PREEMPT, "E-1")
        assert notice.deadline == parsedate_to_datetime(not_before).timestamp()
        assert "EventType=Preempt" in notice.detail and not_before in notice.detail

    run(scenario())


def test_azure_started_event_without_not_before_is_due_now(azure: AzureScheduledEvents) -> None:
    async def scenario() -> None:
        async with Watcher(azure_source(azure)) as watcher:
            before = time.time()
            azure.inject_event("Terminate", not_before="", status="Started")
            azure.inject_event("Reboot", not_before=rfc1123(before + 600))
            terminate, reboot = await watcher.wait_for(2)
        assert terminate.kind == NoticeKind.PREEMPT
        assert terminate.deadline is not None and before <= terminate.deadline <= time.time()
        assert reboot.kind == NoticeKind.MAINTENANCE
        assert reboot.deadline == pytest.approx(before + 600, abs=1)

    run(scenario())


def test_azure_resource_filter_ignores_other_vms(azure: AzureScheduledEvents) -> None:
    async def scenario() -> None:
        async with Watcher(azure_source(azure, resource_name="vm-self")) as watcher:
            azure.inject_event("Preempt", resources=["vm-other"])
            polls = azure.count(AZURE_EVENTS_PATH)
            await until(lambda: azure.count(AZURE_EVENTS_PATH) >= polls + 3, "polls")
            assert watcher.notices == []
            mine = azure.inject_event("Preempt", resources=["vm-other", "vm-self"])
            [notice] = await watcher.wait_for(1)
        assert notice.event_id == mine["EventId"]

    run(scenario())


def test_azure_acknowledge_posts_start_request(azure: AzureScheduledEvents) -> None:
    async def scenario() -> None:
        async with Watcher(azure_source(azure)) as watcher:
            event = azure.inject_event("Preempt")
            [notice] = await watcher.wait_for(1)
            await watcher.source.acknowledge(notice)
            assert azure.start_requests == [{"StartRequests": [{"EventId": event["EventId"]}]}]
            assert event["EventStatus"] == "Started"  # the server started it
            polls = azure.count(AZURE_EVENTS_PATH, method="GET")
            await until(lambda: azure.count(AZURE_EVENTS_PATH, method="GET") >= polls + 3, "polls")
            assert watcher.notices == [notice]  # Scheduled -> Started is the same event
        [post] = [r for r in azure.records if r.method == "POST"]
        assert (post.path, post.query, post.status) == (
            AZURE_EVENTS_PATH,
            {"api-version": "2020-07-01"},
            200,
        )
        assert post.headers["metadata"] == "true"

    run(scenario())


def test_azure_acknowledge_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        source = AzureSource(closed_port_url(), request_timeout_s=0.2)
        notice = Notice("azure", NoticeKind.PREEMPT, 0.0, "test", event_id="E-9")
        await source.acknowledge(notice)
        with pytest.raises(ValueError, match="event_id"):
            await source.acknowledge(Notice("aws", NoticeKind.PREEMPT, 0.0, "test"))
        await source.aclose()

    run(scenario())
    assert any("could not approve event E-9" in r.getMessage() for r in caplog.records)


def test_azure_server_requires_metadata_header_and_client_sends_it(
    azure: AzureScheduledEvents,
) -> None:
    query = {"api-version": "2020-07-01"}
    with httpx2.Client(base_url=azure.url, trust_env=False) as client:
        assert client.get(AZURE_EVENTS_PATH, params=query).status_code == 400
        headers = {"Metadata": "true"}
        assert client.get(AZURE_EVENTS_PATH, headers=headers).status_code == 400  # no api-version
        ok = client.get(AZURE_EVENTS_PATH, params=query, headers=headers)
        assert ok.status_code == 200 and ok.json() == {"DocumentIncarnation": 1, "Events": []}

    async def scenario() -> None:
        async with Watcher(azure_source(azure)):
            await until(lambda: azure.count(AZURE_EVENTS_PATH, status=200) >= 4, "polls")

    run(scenario())
    watched = azure.records[3:]  # after the three requests above
    assert all(r.headers.get("metadata") == "true" for r in watched)
    assert all(r.query == query and r.status == 200 for r in watched)


# -- resilience: every fault, on every cloud ---------------------------------------------------

SERVERS: dict[str, Callable[[], MetadataServer]] = {
    "aws": lambda: AwsImds(stall_s=1.0),
    "gcp": lambda: GcpMetadata(stall_s=1.0),
    "azure": lambda: AzureScheduledEvents(stall_s=1.0),
}


def make_fast_source(server: MetadataServer) -> NoticeSource:
    if isinstance(server, AwsImds):
        return aws_source(server)
    if isinstance(server, GcpMetadata):
        return gcp_source(server)
    assert isinstance(server, AzureScheduledEvents)
    return azure_source(server)


def inject_preempt(server: MetadataServer) -> None:
    bodies: dict[str, dict[str, Any]] = {
        "aws": {"instance-action": {"action": "terminate"}},
        "gcp": {"preempted": "TRUE"},
        "azure": {"EventType": "Preempt"},
    }
    server.inject(bodies[server.cloud])


@pytest.mark.parametrize("fault", [Fault.ERROR_500, Fault.GARBAGE, Fault.CLOSE, Fault.STALL])
@pytest.mark.parametrize("cloud", sorted(SERVERS))
def test_fault_is_no_notice_and_polling_resumes(
    cloud: str, fault: Fault, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="spot.notices")

    async def scenario(server: MetadataServer) -> None:
        async with Watcher(make_fast_source(server)) as watcher:
            await until(lambda: server.count() >= 2, "the first reads")
            server.set_fault(fault)
            await until(lambda: server.faulted >= 4, "4 faulted requests")
            assert watcher.notices == []
            server.set_fault(Fault.NONE)
            inject_preempt(server)
            [notice] = await watcher.wait_for(1)
            # (GCP: the key that failed may recover after the other one saw the notice.)
            await until(lambda: any("readable again" in m for m in caplog.messages), "recovery")
        assert (notice.source, notice.kind) == (cloud, NoticeKind.PREEMPT)

    with SERVERS[cloud]() as server:
        run(scenario(server))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # One report per watched key at the start of the outage, not one per failed request.
    assert 1 <= len(warnings) <= (2 if cloud == "gcp" else 1), warnings


# -- choosing a source -------------------------------------------------------------------------


def test_make_source_rejects_an_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"'nope'.*aws, gcp, azure, sigterm, auto"):
        make_source("nope")


def test_make_source_builds_each_source_with_overrides() -> None:
    aws = make_source("aws", endpoint="http://127.0.0.1:1", poll_interval_s=0.5)
    gcp = make_source("gcp", endpoint="http://127.0.0.1:2", poll_interval_s=2.5)
    azure = make_source("azure", resource_name="vm-self")
    sigterm = make_source("sigterm", grace_s=7)
    assert isinstance(aws, AwsSource) and (aws.endpoint, aws.poll_interval_s) == (
        "http://127.0.0.1:1",
        0.5,
    )
    assert isinstance(gcp, GcpSource) and (gcp.endpoint, gcp.hang_s) == ("http://127.0.0.1:2", 3)
    assert isinstance(azure, AzureSource) and azure.poll_interval_s == 1.0
    assert (azure.endpoint, azure.resource_name) == ("http://169.254.169.254", "vm-self")
    assert isinstance(sigterm, SigtermSource) and sigterm.grace_s == 7
    default_aws = make_source("aws")
    assert isinstance(default_aws, AwsSource) and default_aws.poll_interval_s == 5.0
    assert isinstance(make_source("auto"), AutoSource)
    for source in (aws, gcp, azure, sigterm, default_aws):
        run(source.aclose())


@pytest.mark.parametrize("cloud", sorted(SERVERS))
def test_detect_recognises_each_cloud_by_its_contract(cloud: str) -> None:
    """All three probes go to the one server, as all three clouds use 169.254.169.254: only
    the probe that speaks its contract may recognise it."""
    with SERVERS[cloud]() as server:
        url = server.url
        assert run(detect(aws_endpoint=url, gcp_endpoint=url, azure_endpoint=url)) == cloud


def test_detect_falls_back_to_sigterm_when_nothing_answers(gcp: GcpMetadata) -> None:
    closed = closed_port_url()
    assert run(detect(aws_endpoint=closed, gcp_endpoint=closed, azure_endpoint=closed)) == "sigterm"
    gcp.set_fault(Fault.STALL)  # answers too late: a timeout is no answer either
    started = time.monotonic()
    found = run(
        detect(aws_endpoint=closed, gcp_endpoint=gcp.url, azure_endpoint=closed, timeout_s=0.2)
    )
    assert found == "sigterm" and time.monotonic() - started < 0.9  # well before the 1 s stall


def test_auto_source_watches_the_detected_cloud(azure: AzureScheduledEvents) -> None:
    async def scenario() -> None:
        source = make_source("auto", endpoint=azure.url, poll_interval_s=0.01)
        assert source.name == "auto"
        async with Watcher(source) as watcher:
            event = azure.inject_event("Preempt")
            [notice] = await watcher.wait_for(1)
            assert source.name == "azure"
            await source.acknowledge(notice)
        assert notice.event_id == event["EventId"]
        assert azure.start_requests == [{"StartRequests": [{"EventId": event["EventId"]}]}]

    run(scenario())


# -- SIGTERM -----------------------------------------------------------------------------------


def test_sigterm_yields_terminate_with_grace_deadline() -> None:
    previous = signal.getsignal(signal.SIGTERM)

    async def scenario() -> Notice:
        source = SigtermSource(grace_s=12.0)
        async with Watcher(source) as watcher:
            await until(lambda: source.installed, "the SIGTERM handler")
            sent_at = time.time()
            os.kill(os.getpid(), signal.SIGTERM)
            [notice] = await watcher.wait_for(1)
        assert not source.installed
        assert notice.deadline is not None
        assert sent_at + 12 <= notice.deadline < sent_at + 13
        return notice

    notice = run(scenario())
    assert (notice.source, notice.kind, notice.event_id) == ("sigterm", NoticeKind.TERMINATE, None)
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler before ours is back


def test_sigterm_trigger_feeds_a_source_without_handler() -> None:
    async def scenario() -> None:
        source = SigtermSource(grace_s=5.0, install_handler=False)
        async with Watcher(source) as watcher:
            await asyncio.sleep(0)  # let watch() start
            assert not source.installed
            triggered_at = time.time()
            source.trigger()
            [notice] = await watcher.wait_for(1)
        assert notice.kind == NoticeKind.TERMINATE
        assert notice.deadline == pytest.approx(triggered_at + 5, abs=0.5)

    run(scenario())
