"""The HTTP app's edges, in process (no node, no uvicorn): every error in OpenAI's shape with its
status code, on the hot path (invocation POSTs) and through FastAPI's routers alike."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Message

from controller.api import create_app
from controller.config import ControllerConfig
from controller.service import Controller

INVOKE = {"authorization": "Bearer invoke-key-123"}
ADMIN = {"authorization": "Bearer admin-key-123"}
LIMIT = 4096


def call(
    home: Path, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, dict[str, str], Any]:
    """One request to a fresh controller's app: status, headers, the JSON body (or text)."""

    async def run() -> tuple[int, dict[str, str], Any]:
        config = ControllerConfig(
            home=home,
            invoke_keys=["invoke-key-123"],
            admin_keys=["admin-key-123"],
            max_body_bytes=LIMIT,
        )
        controller = Controller(config)
        try:
            return await _asgi(create_app(controller), method, path, headers, body)
        finally:
            await controller.close()

    return asyncio.run(run())


async def _asgi(
    app: Any, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, dict[str, str], Any]:
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    sent = False
    out: dict[str, Any] = {"body": b""}

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            out["body"] += message.get("body", b"")

    await app(scope, receive, send)
    text = out["body"].decode()
    is_json = out["headers"].get("content-type", "").startswith("application/json")
    return out["status"], out["headers"], json.loads(text) if is_json else text


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "code"),
    [
        ("POST", "/v1/completions", {}, b"{}", 401, "missing_api_key"),
        ("POST", "/v1/completions", INVOKE, b"{", 400, "invalid_json"),
        ("POST", "/v1/completions", INVOKE, b"{}", 400, "invalid_value"),
        (
            "POST",
            "/v1/completions",
            INVOKE,
            b'{"model": "x", "prompt": "hi"}',
            404,
            "model_not_found",
        ),
        ("POST", "/v1/completions", INVOKE, b"x" * (LIMIT + 1), 413, "request_too_large"),
        (
            "POST",
            "/v1/chat/completions",
            INVOKE,
            b'{"model": "x", "messages": []}',
            400,
            "invalid_value",
        ),
        ("GET", "/v1/completions", INVOKE, b"", 405, None),
        (
            "GET",
            "/v1/models",
            {"authorization": "Bearer wrong-key-123"},
            b"",
            401,
            "invalid_api_key",
        ),
        ("GET", "/v1/models/x", INVOKE, b"", 404, "model_not_found"),
        ("GET", "/admin/functions", INVOKE, b"", 401, "invalid_api_key"),
        ("PUT", "/admin/functions/f", ADMIN, b"[1]", 400, None),
        ("PUT", "/admin/functions/f", ADMIN, b'{"model": "/x", "bogus": 1}', 422, "invalid_spec"),
        ("PUT", "/admin/functions/f", ADMIN, b"x" * (LIMIT + 1), 413, "request_too_large"),
        ("DELETE", "/admin/functions/f", ADMIN, b"", 404, "function_not_found"),
        ("POST", "/admin/nodes/n1/drain", ADMIN, b"", 404, None),
        ("GET", "/metrics", {}, b"", 401, "missing_api_key"),
        ("GET", "/nope", {}, b"", 404, "not_found"),
    ],
)
def test_errors_have_openai_shape_and_status(
    tmp_path: Path,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
    code: str | None,
) -> None:
    got, _, doc = call(tmp_path, method, path, headers, body)
    assert got == status, doc
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["error"]["code"] == code and doc["error"]["message"]


def test_a_validation_error_names_the_field(tmp_path: Path) -> None:
    body = b'{"model": "x", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}'
    _, _, doc = call(tmp_path, "POST", "/v1/chat/completions", INVOKE, body)
    assert doc["error"]["param"] == "temperature" and "temperature:" in doc["error"]["message"]


def test_health_needs_no_key_and_metrics_take_the_admin_key(tmp_path: Path) -> None:
    status, _, doc = call(tmp_path, "GET", "/healthz", {})
    assert (status, doc) == (200, {"status": "ok", "nodes_alive": 0, "functions": 0})
    status, headers, text = call(tmp_path, "GET", "/metrics", ADMIN)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE stoke_requests_total counter" in text


def test_admin_lists_start_empty(tmp_path: Path) -> None:
    assert call(tmp_path, "GET", "/admin/functions", ADMIN)[2] == {"functions": []}
    assert call(tmp_path, "GET", "/admin/nodes", ADMIN)[2] == {"nodes": []}
    assert call(tmp_path, "GET", "/v1/models", INVOKE)[2] == {"object": "list", "data": []}
