"""What the API's endpoints are given: the `ApiContext` (the controller and the API keys) kept
in `app.state`, and the key checks, as FastAPI dependencies. Nothing here is a module global:
two apps in one process (tests) each have their own."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from controller.api.errors import ApiError
from controller.service import Controller


@dataclass(frozen=True)
class ApiContext:
    """The state every endpoint works from."""

    controller: Controller
    invoke_keys: tuple[bytes, ...]
    """Keys that may invoke functions (admin keys may too)."""
    admin_keys: tuple[bytes, ...]

    @classmethod
    def of(cls, controller: Controller) -> ApiContext:
        config = controller.config
        return cls(
            controller,
            invoke_keys=tuple(k.encode() for k in (*config.invoke_keys, *config.admin_keys)),
            admin_keys=tuple(k.encode() for k in config.admin_keys),
        )

    def install(self, app: FastAPI) -> None:
        """Make this the context of `app`'s endpoints."""
        app.state.api = self

    def check_invoke(self, request: Request) -> None:
        """401 unless `request` carries an invoke (or admin) key."""
        _check_key(request, self.invoke_keys, "invoke")

    def check_admin(self, request: Request) -> None:
        """401 unless `request` carries an admin key."""
        _check_key(request, self.admin_keys, "admin")


def api_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.api
    return context


Context = Annotated[ApiContext, Depends(api_context)]


def controller(context: Context) -> Controller:
    return context.controller


Ctl = Annotated[Controller, Depends(controller)]


def require_invoke(request: Request, context: Context) -> None:
    context.check_invoke(request)


def require_admin(request: Request, context: Context) -> None:
    context.check_admin(request)


def _check_key(request: Request, keys: tuple[bytes, ...], role: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401,
            f"missing API key: send 'Authorization: Bearer <{role} key>' "
            "(the openai client sends its api_key this way).",
            "authentication_error",
            "missing_api_key",
        )
    got = token.strip().encode()
    if not any(hmac.compare_digest(got, key) for key in keys):
        raise ApiError(401, f"invalid {role} API key.", "authentication_error", "invalid_api_key")
