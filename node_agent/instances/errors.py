"""Typed instance errors; the agent maps each to one gRPC status code (`GRPC_CODES`)."""

from __future__ import annotations


class InstanceError(Exception):
    """An instance operation failed for a reason the caller can act on."""


class UnknownInstanceError(InstanceError):
    """No instance has that id on this node (never loaded, unloaded, or died)."""


class InstanceExistsError(InstanceError):
    """An instance with that id is already loaded or loading."""


class InstanceGoneError(InstanceError):
    """The instance's process exited (crash, OOM kill) while serving a call."""


class DrainingError(InstanceError):
    """The node is draining and takes no new instances or requests."""


class WorkerStartError(InstanceError):
    """A worker process failed to start or to load a model."""


class LoadRejectedError(InstanceError):
    """The engine cannot run this model with these options (a KV cache too small for one
    sequence, a config or weights it rejects): loading it again, here or elsewhere, fails the
    same way until the function's spec or the model changes."""
