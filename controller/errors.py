"""The controller's typed failures, each mapped to one HTTP answer by `controller.api.errors`."""

from __future__ import annotations


class AdminError(Exception):
    """An admin request that cannot be done as asked: HTTP `status` and a message."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Overloaded(Exception):
    """No capacity now: 429 (queue full) or 503 (nothing can take it), with a retry hint."""

    def __init__(self, status: int, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class LoadRejected(Exception):
    """A node refused to load the function as deployed (its engine options cannot work, say);
    retrying elsewhere would not help: the function needs redeploying."""


class NoRoom(Exception):
    """A node refused a load for lack of room (its last heartbeat was stale): placement tries
    another node."""


def unknown_function(name: str) -> str:
    """The message for a request naming a function that is not deployed."""
    return (
        f"The function '{name}' does not exist. Deploy it with `stoke deploy {name} --model ...`, "
        "or list functions with `stoke list` (GET /v1/models)."
    )
