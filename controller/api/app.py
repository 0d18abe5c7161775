"""The controller's ASGI app: the FastAPI app (one router per resource, OpenAI's error shape
for every error, a body size limit) behind `HotPath`, which serves invocations itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from controller.api import (
    admin_autoscaler,
    admin_functions,
    admin_nodes,
    admin_requests,
    openai,
    ops,
)
from controller.api.body import BodyLimit
from controller.api.deps import ApiContext
from controller.api.errors import (
    ApiError,
    ValidationFailed,
    install_error_handlers,
    validation_response,
)
from controller.service import Controller


def create_app(controller: Controller) -> ASGIApp:
    """The HTTP API of `controller`, ready for uvicorn."""
    context = ApiContext.of(controller)
    app = FastAPI(title="stoke", docs_url=None, redoc_url=None, openapi_url=None)
    context.install(app)
    install_error_handlers(app)
    for resource in (openai, admin_functions, admin_nodes, admin_requests, admin_autoscaler, ops):
        app.include_router(resource.router)
    limit = controller.config.max_body_bytes
    app.add_middleware(BodyLimit, limit=limit)
    return HotPath(app, openai.HOT_ROUTES, context, limit)


_Handler = Callable[[Request, ApiContext], Awaitable[Response]]


class HotPath:
    """ASGI: `POST` to an invocation endpoint goes straight to its handler, past FastAPI's
    middleware and routing layers (~0.2 ms of each request's way to its first token, measured);
    everything else (and every other method on those paths) goes to `app`."""

    def __init__(
        self, app: ASGIApp, routes: Mapping[str, _Handler], context: ApiContext, limit: int
    ) -> None:
        self.app, self.routes, self.context = app, routes, context
        self._limited = BodyLimit(self._serve, limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.routes:
            await self._limited(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self.routes[scope["path"]](request, self.context)
        except ApiError as exc:
            response = exc.response()
        except ValidationFailed as exc:
            response = validation_response(exc.errors)
        await response(scope, receive, send)
