"""Loopback metadata servers for AWS, GCP and Azure, following each cloud's documented contract,
for the tests of `spot.notices` (no cloud is reachable from CI).

The contracts they follow:

- AWS IMDSv2 tokens: https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html
  (PUT /latest/api/token with X-aws-ec2-metadata-token-ttl-seconds 1..21600, else 400; a PUT
  with X-Forwarded-For is 403; with IMDSv2 required, a GET without a valid token is 401).
- AWS Spot interruption notices: https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html
  (spot/instance-action: 404, then {"action", "time"}).
- AWS rebalance recommendations: https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/rebalance-recommendations.html
  (events/recommendations/rebalance: 404, then {"noticeTime"}).
- GCP metadata server: https://cloud.google.com/compute/docs/metadata/querying-metadata
  (Metadata-Flavor: Google required, else 403; X-Forwarded-For is 403; responses carry
  Metadata-Flavor: Google and an ETag; wait_for_change=true hangs until the value changes,
  returns at once when last_etag differs from the current ETag, and after timeout_sec).
- GCP preemption and maintenance: https://cloud.google.com/compute/docs/instances/spot#preemption-process,
  https://cloud.google.com/compute/docs/metadata/getting-live-migration-notice.
- Azure Scheduled Events: https://learn.microsoft.com/en-us/azure/virtual-machines/linux/scheduled-events
  (Metadata: true required, else 400; api-version required; DocumentIncarnation goes up on every
  change; POST {"StartRequests": [{"EventId"}]} approves an event, which then starts).
- Azure IMDS versions: https://learn.microsoft.com/en-us/azure/virtual-machines/instance-metadata-service
  (GET /metadata/versions).

Each server runs a real `ThreadingHTTPServer` on 127.0.0.1, port 0, in a daemon thread. For the
tests, every server also has: an injection endpoint (`POST /_inject` with a JSON body, and the
same as Python methods), a record of every request (`records`, `count()`), and fault modes
(`set_fault`) that answer 500, answer garbage, close the connection, or stall past the
client's timeout.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import secrets
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit


class Fault(enum.StrEnum):
    """How a server misbehaves, for requests other than `/_inject`."""

    NONE = "none"
    ERROR_500 = "500"  # a 500 Internal Server Error
    GARBAGE = "garbage"  # 200 with a body of no documented shape and none of the cloud's headers
    CLOSE = "close"  # drop the connection without an answer
    STALL = "stall"  # answer nothing for `stall_s` (past the client's timeout), then a 503


GARBAGE_BODY = b"\x00\xff<html>not metadata</html>{"


@dataclass
class Recorded:
    """One request as the server saw it; `status` is None until answered (or if dropped)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    fault: Fault
    status: int | None = None


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, value: object, **headers: str) -> Reply:
        return cls(
            status, json.dumps(value).encode(), {"Content-Type": "application/json", **headers}
        )

    @classmethod
    def text(cls, status: int, text: str, **headers: str) -> Reply:
        return cls(status, text.encode(), {"Content-Type": "text/plain", **headers})


class _Server(ThreadingHTTPServer):
    """Quiet about clients that hang up mid-request (a node killed while it polls)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class MetadataServer:
    """The HTTP plumbing, records and faults shared by the three clouds' servers; subclasses
    implement `handle` (the cloud's contract) and `inject` (raise a notice)."""

    cloud = "?"

    def __init__(self, *, stall_s: float = 1.0) -> None:
        self.stall_s = stall_s
        self.records: list[Recorded] = []
        self.faulted = 0
        """Requests answered with a fault so far."""
        self._cond = threading.Condition()  # guards all state; notified on every change
        self._fault = Fault.NONE
        self._fault_left: int | None = None
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError(f"the {self.cloud} metadata server is not started: call start()")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        handler = type(f"{type(self).__name__}Handler", (_Handler,), {"owner": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.02},  # how soon stop() is noticed
            name=f"{self.cloud}-metadata",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; wakes hanging and stalled requests so their threads end."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- test controls ---------------------------------------------------------------------

    def set_fault(self, fault: Fault, count: int | None = None) -> None:
        """Misbehave on the next `count` requests (None: until `set_fault(Fault.NONE)`)."""
        with self._cond:
            self._fault, self._fault_left = fault, count

    def count(
        self, path: str | None = None, *, method: str | None = None, status: int | None = None
    ) -> int:
        """How many requests (to `path`, with `method`, answered `status`) arrived so far; a
        request is counted on arrival, so a hanging GET counts while it hangs."""
        with self._cond:
            return sum(
                1
                for r in self.records
                if (path is None or r.path == path)
                and (method is None or r.method == method)
                and (status is None or r.status == status)
            )

    def inject(self, body: dict[str, Any]) -> None:
        """Raise a notice described by a JSON object (the body of `POST /_inject`)."""
        raise NotImplementedError

    def handle(self, request: Recorded) -> Reply:
        """Answer one request following the cloud's contract (called in a server thread)."""
        raise NotImplementedError

    # -- plumbing --------------------------------------------------------------------------

    def _take_fault(self) -> Fault:
        with self._cond:
            fault = self._fault
            if fault is not Fault.NONE:
                self.faulted += 1
                if self._fault_left is not None:
                    self._fault_left -= 1
                    if self._fault_left <= 0:
                        self._fault, self._fault_left = Fault.NONE, None
            return fault

    def _record(self, request: Recorded) -> None:
        with self._cond:
            self.records.append(request)
            self._cond.notify_all()

    def _answer(self, request: Recorded) -> Reply | None:
        """The reply to a request, None to drop the connection."""
        if request.path == "/_inject" and request.method == "POST":
            try:
                self.inject(json.loads(request.body))
            except (ValueError, TypeError, KeyError) as exc:
                return Reply.text(400, f"bad injection: {exc}\n")
            return Reply(204)
        fault = request.fault
        if fault is Fault.CLOSE:
            return None
        if fault is Fault.ERROR_500:
            return Reply.text(500, "internal error\n")
        if fault is Fault.GARBAGE:
            return Reply(200, GARBAGE_BODY, {"Content-Type": "application/octet-stream"})
        if fault is Fault.STALL:
            self._stopping.wait(self.stall_s)
            return Reply.text(503, "unavailable\n")
        return self.handle(request)


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to its server's `MetadataServer` (`owner`)."""

    owner: MetadataServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the clouds' servers and httpx use
    disable_nagle_algorithm = True  # headers and body go out in two writes: don't delay the 2nd

    def do_GET(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the records are the log."""

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        request = Recorded(
            method=self.command,
            path=parts.path,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self.rfile.read(length) if length else b"",
            fault=Fault.NONE if parts.path == "/_inject" else self.owner._take_fault(),
        )
        if parts.path != "/_inject":
            self.owner._record(request)
        reply = self.owner._answer(request)
        if reply is None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        request.status = reply.status
        with contextlib.suppress(OSError):  # the client may have timed out and gone
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)


def iso_z(unix_time: float) -> str:
    """AWS's time format: '2017-09-18T08:22:00Z'."""
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc1123(unix_time: float) -> str:
    """Azure's NotBefore format: 'Mon, 19 Sep 2016 18:29:47 GMT'."""
    return format_datetime(datetime.fromtimestamp(unix_time, UTC), usegmt=True)


# -- AWS IMDSv2 ------------------------------------------------------------------------------

AWS_TOKEN_PATH = "/latest/api/token"
AWS_INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
AWS_REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
AWS_TTL_HEADER = "x-aws-ec2-metadata-token-ttl-seconds"
AWS_TOKEN_HEADER = "x-aws-ec2-metadata-token"


class AwsImds(MetadataServer):
    """IMDSv2 with session tokens required; `expire_tokens()` ends every token issued so far."""

    cloud = "aws"

    def __init__(self, *, stall_s: float = 1.0) -> None:
        super().__init__(stall_s=stall_s)
        self.instance_action: dict[str, str] | None = None
        self.rebalance: dict[str, str] | None = None
        self._tokens: dict[str, float] = {}  # token -> time.monotonic() it expires

    def expire_tokens(self) -> None:
        with self._cond:
            self._tokens = dict.fromkeys(self._tokens, 0.0)

    def inject_instance_action(self, action: str = "terminate", when: str | None = None) -> str:
        """Publish an interruption notice; returns its time (default: two minutes from now)."""
        when = when or iso_z(time.time() + 120)
        with self._cond:
            self.instance_action = {"action": action, "time": when}
        return when

    def inject_rebalance(self, notice_time: str | None = None) -> str:
        notice_time = notice_time or iso_z(time.time())
        with self._cond:
            self.rebalance = {"noticeTime": notice_time}
        return notice_time

    def inject(self, body: dict[str, Any]) -> None:
        """`{"instance-action": {"action", "time"}}` and/or `{"rebalance": {"noticeTime"}}`."""
        if "instance-action" in body:
            action = body["instance-action"]
            self.inject_instance_action(action.get("action", "terminate"), action.get("time"))
        if "rebalance" in body:
            self.inject_rebalance(body["rebalance"].get("noticeTime"))
        if not {"instance-action", "rebalance"} & body.keys():
            raise KeyError("inject 'instance-action' or 'rebalance'")

    def handle(self, request: Recorded) -> Reply:
        if request.method == "PUT" and request.path == AWS_TOKEN_PATH:
            return self._issue_token(request)
        if request.method != "GET":
            return Reply.text(405, "Method Not Allowed\n")
        with self._cond:
            expires = self._tokens.get(request.headers.get(AWS_TOKEN_HEADER, ""))
            if expires is None or expires <= time.monotonic():
                return Reply.text(401, "Unauthorized\n")
            document = {
                AWS_INSTANCE_ACTION_PATH: self.instance_action,
                AWS_REBALANCE_PATH: self.rebalance,
            }.get(request.path)
        if document is None:
            return Reply.text(404, "Not Found\n")
        return Reply.text(200, json.dumps(document))  # IMDS serves these as text/plain

    def _issue_token(self, request: Recorded) -> Reply:
        if "x-forwarded-for" in request.headers:
            return Reply.text(403, "Forbidden\n")
        ttl = request.headers.get(AWS_TTL_HEADER, "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return Reply.text(400, "Bad Request\n")
        token = secrets.token_urlsafe(32)
        with self._cond:
            self._tokens[token] = time.monotonic() + int(ttl)
        return Reply.text(200, token, **{AWS_TTL_HEADER: ttl})


# -- GCP metadata server ---------------------------------------------------------------------

GCP_PREFIX = "/computeMetadata/v1/instance/"


class GcpMetadata(MetadataServer):
    """The `instance/preempted` and `instance/maintenance-event` keys, with hanging GETs.
    `waiting` is how many hanging GETs are waiting for a change now."""

    cloud = "gcp"

    def __init__(self, *, stall_s: float = 1.0) -> None:
        super().__init__(stall_s=stall_s)
        self.values = {"preempted": "FALSE", "maintenance-event": "NONE"}
        self.waiting = 0

    def set_value(self, key: str, value: str) -> None:
        with self._cond:
            if key not in self.values:
                raise KeyError(f"no key {key!r}; the server has {sorted(self.values)}")
            self.values[key] = value
            self._cond.notify_all()

    def inject(self, body: dict[str, Any]) -> None:
        """New values by key: `{"preempted": "TRUE"}`, `{"maintenance-event": "..."}`."""
        if not body:
            raise KeyError("inject 'preempted' or 'maintenance-event'")
        for key, value in body.items():
            self.set_value(key, str(value))

    @staticmethod
    def etag(value: str) -> str:
        return hashlib.sha1(value.encode()).hexdigest()[:16]

    def handle(self, request: Recorded) -> Reply:
        flavor = {"Metadata-Flavor": "Google"}
        if "x-forwarded-for" in request.headers:
            return Reply.text(403, "Forbidden: X-Forwarded-For\n", **flavor)
        if request.headers.get("metadata-flavor") != "Google":
            return Reply.text(403, "Missing Metadata-Flavor:Google header.\n", **flavor)
        key = request.path.removeprefix(GCP_PREFIX)
        if (
            request.method != "GET"
            or not request.path.startswith(GCP_PREFIX)
            or key not in self.values
        ):
            return Reply.text(404, "Not Found\n", **flavor)
        timeout_sec = request.query.get("timeout_sec", "3600")
        if not timeout_sec.isdigit():
            return Reply.text(400, f"timeout_sec={timeout_sec!r} is not whole seconds\n", **flavor)
        with self._cond:
            if request.query.get("wait_for_change") == "true":
                self._wait_for_change(key, request.query.get("last_etag"), int(timeout_sec))
            value = self.values[key]
        return Reply.text(200, value, ETag=self.etag(value), **flavor)

    def _wait_for_change(self, key: str, last_etag: str | None, timeout_s: int) -> None:
        """Hang (holding `_cond`) until the key's ETag differs from `last_etag` (or from the
        current one when none is given), the timeout passes, or the server stops."""
        waited_for = last_etag or self.etag(self.values[key])
        deadline = time.monotonic() + timeout_s
        self.waiting += 1
        self._cond.notify_all()
        try:
            while self.etag(self.values[key]) == waited_for and not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        finally:
            self.waiting -= 1


# -- Azure Scheduled Events ------------------------------------------------------------------

AZURE_EVENTS_PATH = "/metadata/scheduledevents"
AZURE_API_VERSIONS = ("2017-11-01", "2019-01-01", "2019-08-01", "2020-07-01")


class AzureScheduledEvents(MetadataServer):
    """Scheduled Events; `start_requests` holds each StartRequests POST body received."""

    cloud = "azure"

    def __init__(self, *, stall_s: float = 1.0) -> None:
        super().__init__(stall_s=stall_s)
        self.incarnation = 1
        self.events: list[dict[str, Any]] = []
        self.start_requests: list[dict[str, Any]] = []

    def inject_event(
        self,
        event_type: str = "Preempt",
        *,
        not_before: str | None = None,
        resources: list[str] | None = None,
        status: str = "Scheduled",
        event_id: str | None = None,
    ) -> dict[str, Any]:
        """Publish an event (default: a Preempt of vm-1, NotBefore in 30 s); returns it."""
        event = {
            "EventId": event_id or str(uuid.uuid4()).upper(),
            "EventType": event_type,
            "ResourceType": "VirtualMachine",
            "Resources": resources if resources is not None else ["vm-1"],
            "EventStatus": status,
            "NotBefore": rfc1123(time.time() + 30) if not_before is None else not_before,
            "Description": f"{event_type} injected by the loopback server",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        }
        with self._cond:
            self.events.append(event)
            self.incarnation += 1
        return event

    def inject(self, body: dict[str, Any]) -> None:
        """An event's fields, as `inject_event` takes them: `{"EventType": "Preempt", ...}`."""
        self.inject_event(
            body["EventType"],
            not_before=body.get("NotBefore"),
            resources=body.get("Resources"),
            status=body.get("EventStatus", "Scheduled"),
            event_id=body.get("EventId"),
        )

    def handle(self, request: Recorded) -> Reply:
        if "x-forwarded-for" in request.headers:
            return Reply.json(400, {"error": "Bad request. X-Forwarded-For is not allowed"})
        if request.headers.get("metadata") != "true":
            return Reply.json(400, {"error": "Bad request. Required metadata header not specified"})
        if request.path == "/metadata/versions" and request.method == "GET":
            return Reply.json(200, {"apiVersions": list(AZURE_API_VERSIONS)})
        if request.path != AZURE_EVENTS_PATH:
            return Reply.json(404, {"error": "Not found"})
        version = request.query.get("api-version")
        if version not in AZURE_API_VERSIONS:
            return Reply.json(
                400,
                {
                    "error": "Bad request. api-version is missing or invalid",
                    "newest-versions": list(AZURE_API_VERSIONS[::-1]),
                },
            )
        if request.method == "GET":
            with self._cond:
                return Reply.json(
                    200, {"DocumentIncarnation": self.incarnation, "Events": self.events}
                )
        if request.method == "POST":
            return self._start(request.body)
        return Reply.json(405, {"error": "Method not allowed"})

    def _start(self, body: bytes) -> Reply:
        """Approve the events named in a StartRequests body: they start now."""
        try:
            document = json.loads(body)
            ids = {r["EventId"] for r in document["StartRequests"]}
        except (ValueError, TypeError, KeyError):
            return Reply.json(400, {"error": 'Bad request. Expected {"StartRequests": [...]}'})
        with self._cond:
            self.start_requests.append(document)
            for event in self.events:
                if event["EventId"] in ids:
                    event["EventStatus"], event["NotBefore"] = "Started", ""
            self.incarnation += 1
        return Reply(200)


def closed_port_url() -> str:
    """A 127.0.0.1 URL nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
