"""Typed errors of the checkpoint store; each message names the value, the reason and the fix.

`StoreError` (in `node_agent.facts.errors`, with the errors the store shares with the controller:
`InvalidSizeError`, `InvalidSourceError`, `RemoteError`) is the base: the agent reports it to the
controller (and the CLI prints it) as one line a user can act on. Nothing here is raised for
internal invariants (those assert).
"""

from __future__ import annotations

from node_agent.facts.errors import StoreError


class TooLargeError(StoreError):
    """A checkpoint is larger than a tier's whole budget: it can never be admitted there."""


class NoRoomError(StoreError):
    """A tier cannot make room: what it holds beyond the budget is pinned or being written."""


class NotHeldError(StoreError, KeyError):
    """The tier does not hold the checkpoint named (pin, unpin, evict of an unknown key)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PinnedError(StoreError):
    """A pinned checkpoint was asked to be evicted (an instance is using it)."""


class CorruptObjectError(StoreError):
    """Bytes of a checkpoint (remote object or local copy) do not match the manifest's CRC-32."""

    def __init__(self, where: str, chunk: int, start: int, end: int, expected: str, got: str):
        self.where, self.chunk, self.start, self.end = where, chunk, start, end
        self.expected, self.got = expected, got
        super().__init__(
            f"{where}: chunk {chunk} (bytes {start}..{end}) has crc32 {got}, the manifest says "
            f"{expected}; the object is corrupt and was not installed. Push the checkpoint "
            "again (`stoke push CKPT_DIR URI`) or restore it from its source."
        )


class StoreLockedError(StoreError):
    """Another process (a second node agent) already owns a tier directory."""


class NotPinnedError(StoreError):
    """`unpin` of a checkpoint that has no pins left (unbalanced pin/unpin)."""


class ShortFileError(StoreError):
    """A local file ended before the size its manifest gives (truncated copy)."""


class StoreClosedError(StoreError):
    """The store (or one tier) was closed while an operation was under way."""
