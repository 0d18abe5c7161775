"""Where a node keeps and finds a checkpoint's bytes: its tiers, and where one load's bytes came
from. The values are the strings on the wire (`LoadInstanceRequest.tier`, `TierStatus.tier`,
`LoadInstanceReply.loaded_from`, heartbeat bandwidths) and in metrics labels; both sides compare
against these enums, never against the bare strings."""

from __future__ import annotations

import enum

from node_agent.facts.errors import StoreError


class TierName(enum.StrEnum):
    """A local tier, fastest first. The remote source (S3) is not a tier: nothing is evicted
    there."""

    DRAM = "dram"
    DISK = "disk"


TIERS_FASTEST_FIRST: tuple[TierName, ...] = (TierName.DRAM, TierName.DISK)


def parse_tier(value: TierName | str) -> TierName:
    """`"dram"` / `"disk"` (or a `TierName`) -> `TierName`; anything else is a `StoreError`."""
    try:
        return TierName(value)
    except ValueError:
        names = ", ".join(repr(t.value) for t in TierName)
        raise StoreError(f"tier {value!r}: not a tier of this store; use one of {names}.") from None


class Origin(enum.StrEnum):
    """The slowest place the checkpoint's bytes were read from to satisfy one load (what the
    store did, or, before a load, what a scheduler expects it to do)."""

    DRAM = "dram"
    """Already in the DRAM tier: nothing moved."""
    DISK = "disk"
    """Read from the disk tier (promoted into DRAM, or served from disk)."""
    REMOTE = "remote"
    """Downloaded from S3."""
    LOCAL = "local"
    """Copied from a local stoke checkpoint directory (the source path)."""
    CONVERTED = "converted"
    """Converted from a Hugging Face directory (the source path)."""


LOAD_PLACES_FASTEST_FIRST: tuple[Origin, ...] = (Origin.DRAM, Origin.DISK, Origin.REMOTE)
"""Where a scheduler expects a load to come from: a tier holding the checkpoint, else its
remote source. Each has a measured bandwidth (`TierStatus`/heartbeat `bandwidths`)."""
