"""Every error the HTTP API returns, in OpenAI's shape (`{"error": {"message", "type", "param",
"code"}}`) with the status code a client can act on: `ApiError` and the exception handlers
that turn the controller's own errors, validation failures and unknown routes into one."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from controller.errors import AdminError
from controller.schemas import error_body


class ApiError(Exception):
    """An HTTP error response: `status`, a message, OpenAI's `type`, `code` and `param`, and
    extra headers (`Retry-After`)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(str(self), self.type, self.code, self.param),
            status_code=self.status,
            headers=self.headers,
        )


class ValidationFailed(Exception):
    """A body that does not fit its request model; `errors` as pydantic lists them."""

    def __init__(self, errors: Any) -> None:
        super().__init__("validation failed")
        self.errors = errors


def validation_response(errors: Any) -> JSONResponse:
    """400 naming each problem (`field: message`), `param` the first field."""
    problems = []
    first_param = None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        first_param = first_param or where
        problems.append(f"{where}: {err.get('msg')}")
    return ApiError(
        400, "; ".join(problems) or "invalid request", code="invalid_value", param=first_param
    ).response()


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error of `app` OpenAI's shape."""
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(AdminError, _admin_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _request_validation)  # type: ignore[arg-type]
    app.add_exception_handler(ValidationFailed, _validation_failed)  # type: ignore[arg-type]
    app.add_exception_handler(404, _not_found)
    app.add_exception_handler(405, _not_allowed)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _admin_error(request: Request, exc: AdminError) -> JSONResponse:
    return ApiError(exc.status, str(exc), code=exc.code).response()


async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_response(exc.errors())


async def _validation_failed(request: Request, exc: ValidationFailed) -> JSONResponse:
    return validation_response(exc.errors)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return ApiError(404, f"no route {request.url.path}", code="not_found").response()


async def _not_allowed(request: Request, exc: Exception) -> JSONResponse:
    return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()
