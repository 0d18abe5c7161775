"""The boto3 S3 client the store (and the controller, reading a model's small files) uses, and S3
failures turned into `RemoteError`s.

Endpoint, region and credentials come from the standard AWS environment and config files
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...), so MinIO, Ceph, R2 or moto work
the same as AWS S3.
"""

from __future__ import annotations

import os
from typing import Any

from node_agent.facts.errors import RemoteError

S3Client = Any  # boto3 clients are generated at run time; there is no static type to name


def make_client(*, pool_size: int, max_attempts: int = 5, verify_checksums: bool = False) -> Any:
    """A thread-safe S3 client with `pool_size` HTTP connections.

    `verify_checksums=False` turns off botocore's own response checksums: the fetcher checks
    every chunk's CRC-32 against the manifest itself, so a second pass would only cost CPU.
    """
    import boto3
    from botocore.config import Config

    mode = "when_supported" if verify_checksums else "when_required"
    config = Config(
        max_pool_connections=pool_size,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        tcp_keepalive=True,
        response_checksum_validation=mode,
        request_checksum_calculation=mode,
    )
    return boto3.session.Session().client("s3", config=config)


def remote_error(exc: Exception, uri: str, action: str) -> RemoteError:
    """A `RemoteError` naming the URI, what failed and what to do about it."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "?"))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return RemoteError(f"{action} {uri}: {code} (HTTP {status}). {_hint(code, status)}")
    if isinstance(exc, NoCredentialsError):
        return RemoteError(
            f"{action} {uri}: no AWS credentials found. Set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run on a machine with an instance role."
        )
    if isinstance(exc, EndpointConnectionError):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
        return RemoteError(
            f"{action} {uri}: cannot connect to {endpoint} ({exc}). Check AWS_ENDPOINT_URL "
            "and that the S3 server is running and reachable."
        )
    return RemoteError(
        f"{action} {uri}: {type(exc).__name__}: {exc}. Retry; if it persists, "
        "check the S3 server's health."
    )


def _hint(code: str, status: object) -> str:
    if code == "NoSuchBucket":
        return "The bucket does not exist: check its name or create it."
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return (
            "Nothing is stored there: check the URI, or upload the checkpoint with "
            "`stoke push CKPT_DIR s3://BUCKET/PREFIX`."
        )
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return "The credentials are refused or lack permission: check AWS_PROFILE / keys."
    if code in ("InvalidRange", "416") or status == 416:
        return (
            "The object is shorter than the manifest says: it was changed or partly "
            "uploaded. Push the checkpoint again."
        )
    return "Retry; if it persists, check the S3 server's logs."
