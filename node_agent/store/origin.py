"""Where an `ensure` found the bytes it returned: what the store actually did, as opposed to
what a scheduler expected from the last heartbeat."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node_agent.facts.tiers import Origin


@dataclass(frozen=True)
class Ensured:
    """The result of `CheckpointStore.ensure_with_origin`."""

    path: Path
    """The checkpoint's directory in the tier asked for (its name is the checkpoint key)."""
    origin: Origin
