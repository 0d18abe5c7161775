"""Shared-secret authentication and optional TLS for stoke's gRPC services.

Every call carries metadata `authorization: Bearer <secret>`. Servers install
`BearerAuthInterceptor`, which refuses a missing or wrong secret with UNAUTHENTICATED before
the method runs; clients get the header from `open_channel(..., secret=...)`. With cert files,
the server listens with TLS and the client verifies it against a CA file.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

AUTH_KEY = "authorization"
SECRET_ENV = "STOKE_SECRET"


class AuthConfigError(ValueError):
    """A secret or TLS setting is unusable (empty secret, missing or unreadable cert file)."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS listener: its certificate chain and private key."""

    cert: Path
    key: Path


def _bearer(secret: str) -> str:
    if not secret:
        raise AuthConfigError(f"empty shared secret: pass --secret or set ${SECRET_ENV}.")
    return f"Bearer {secret}"


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose `authorization` metadata is not `Bearer <secret>` (UNAUTHENTICATED).

    `source` names where a caller finds the secret, for the refusal's message."""

    def __init__(self, secret: str, source: str = f"the node's ${SECRET_ENV}") -> None:
        self._expected = _bearer(secret).encode()
        self._source = source

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
        return _refusal(
            handler,
            "missing authorization"
            if not self._has_header(handler_call_details.invocation_metadata or ())
            else "wrong shared secret",
            self._source,
        )

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata:
            if key == AUTH_KEY:
                got = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(got, self._expected)
        return False

    @staticmethod
    def _has_header(metadata: Any) -> bool:
        return any(key == AUTH_KEY for key, _ in metadata)


def _refusal(handler: grpc.RpcMethodHandler | None, why: str, source: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED."""
    message = f"{why}: send metadata 'authorization: Bearer <secret>' ({source})"

    async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler is not None and handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    if handler is not None and handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if handler is not None and handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(deny_unary)
    return grpc.unary_unary_rpc_method_handler(deny_unary)


class _AddBearer:
    """Adds `authorization: Bearer <secret>` to an outgoing call's details."""

    def __init__(self, secret: str) -> None:
        self._header = (AUTH_KEY, _bearer(secret))

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files each interceptor under one call shape only, so each shape gets its own class.
class _BearerUnary(_AddBearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStream(_AddBearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerBidi(_AddBearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(details), request_iterator)


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS credentials for a listener from PEM cert and key files."""
    return grpc.ssl_server_credentials([(_read(tls.key, "key"), _read(tls.cert, "certificate"))])


def add_port(server: grpc.aio.Server, address: str, tls: TlsFiles | None) -> int:
    """Listen on `address` (host:port, port 0 = pick one), with TLS if `tls`; returns the port."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))


def open_channel(
    address: str,
    *,
    secret: str | None,
    ca_file: Path | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to `address` that authenticates with `secret` (None: no header) and,
    with `ca_file`, speaks TLS and verifies the server against that CA. `options` are grpc
    channel arguments."""
    interceptors: list[grpc.aio.ClientInterceptor] | None = None
    if secret is not None:
        interceptors = [_BearerUnary(secret), _BearerStream(secret), _BearerBidi(secret)]
    if ca_file is None:
        return grpc.aio.insecure_channel(address, options, interceptors=interceptors)
    creds = grpc.ssl_channel_credentials(root_certificates=_read(ca_file, "CA certificate"))
    return grpc.aio.secure_channel(address, creds, options, interceptors=interceptors)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"TLS {what} file {path}: {exc.strerror}; check the path.") from None
