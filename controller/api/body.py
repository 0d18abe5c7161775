"""Request bodies: a size limit for every request (`BodyLimit`) and the parsers that turn a
body into a request model or a JSON object, with errors a client can act on."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.api.errors import ApiError, ValidationFailed
from controller.schemas import error_body

M = TypeVar("M", bound=BaseModel)


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            error_body(
                f"request body is larger than {self.limit} bytes; send a shorter prompt.",
                "invalid_request_error",
                "request_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


async def parse_body(request: Request, model: type[M]) -> M:
    """The body as `model`; 400 (`ApiError`, `ValidationFailed`) when it is not one."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw)  # one pass, no dict in between
    except ValidationError as exc:
        if not any(e["type"] == "json_invalid" for e in exc.errors()):
            raise ValidationFailed(exc.errors()) from None
    # pydantic's parser refuses some JSON that json accepts (a byte-order mark, UTF-16,
    # nesting past 200 levels): the body is judged by json, as OpenAI's clients expect.
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the body nests too deeply.", code="invalid_json") from None
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise ValidationFailed(exc.errors()) from None


async def json_body(request: Request) -> Any:
    """The body as a JSON document; 400 when it is not valid JSON."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
