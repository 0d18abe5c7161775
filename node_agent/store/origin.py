"""Where an `ensure` found the bytes it returned: what the store actually did, as opposed to
what a scheduler expected from the last heartbeat."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path


class Origin(enum.StrEnum):
    """The slowest place the checkpoint's bytes were read from to satisfy one `ensure`."""

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


@dataclass(frozen=True)
class Ensured:
    """The result of `CheckpointStore.ensure_with_origin`."""

    path: Path
    """The checkpoint's directory in the tier asked for (its name is the checkpoint key)."""
    origin: Origin
