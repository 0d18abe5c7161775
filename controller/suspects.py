"""Suspect nodes: nodes whose gRPC connection just failed, kept out of placement for a few
seconds instead of until their heartbeat times out.

A node agent that dies refuses connections at once, but the controller declares it gone only
when its heartbeats have been silent for `--node-timeout` seconds. Until then every placement
that picks it (a resume, a cold start) fails within a millisecond. The router marks such a node
here (a failed `LoadInstance`, a request's stream that failed there) and leaves suspect nodes
out of its decisions (`avoided`) unless every candidate is suspect: a transient blip never makes
a function unservable. An instance that loads on a suspect node clears it (the node answers).
NVIDIA Dynamo's request migration likewise keeps a failed worker out of routing for a few
seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

SUSPECT_S = 5.0
"""How long a node stays suspect after its connection failed: longer than a burst of resumes
takes to place, short enough that a node which only blipped soon takes work again (one that
died is declared gone by its heartbeat timeout meanwhile)."""


class Suspects:
    """Which nodes failed recently, each until `hold_s` after its last failure.

    Called on the event loop only; `clock` is injectable so expiry is testable without sleeps.
    """

    def __init__(
        self, hold_s: float = SUSPECT_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.hold_s = hold_s
        self._clock = clock
        self._until: dict[str, float] = {}
        """Node id -> clock time its suspicion ends."""

    def mark(self, node_id: str, why: str) -> None:
        """`node_id` failed now (`why` says how): suspect until `hold_s` from now. Logs when
        the node becomes suspect; a failure of a node already suspect only extends it."""
        now = self._clock()
        if self._until.get(node_id, now) <= now:
            log.warning("node %s is suspect for %.0f s: %s", node_id, self.hold_s, why)
        else:
            log.debug("node %s stays suspect: %s", node_id, why)
        self._until[node_id] = now + self.hold_s

    def clear(self, node_id: str, why: str) -> None:
        """`node_id` proved healthy (`why` says how): no longer suspect. Logs if it was."""
        if self._until.pop(node_id, 0.0) > self._clock():
            log.info("node %s is no longer suspect: %s", node_id, why)

    def current(self) -> frozenset[str]:
        """The nodes suspect now (expired ones are forgotten)."""
        now = self._clock()
        for node_id in [n for n, until in self._until.items() if until <= now]:
            del self._until[node_id]
        return frozenset(self._until)

    def __contains__(self, node_id: object) -> bool:
        until = self._until.get(node_id) if isinstance(node_id, str) else None
        return until is not None and until > self._clock()


def avoided(
    excluded: frozenset[str], suspect: frozenset[str], candidates: Iterable[str]
) -> frozenset[str]:
    """The nodes a placement attempt avoids: its own `excluded` ones plus the `suspect` ones,
    unless that leaves none of `candidates` (the nodes that could take work); then only
    `excluded`, so that suspicion alone never makes a function unservable."""
    merged = excluded | suspect
    if any(node_id not in merged for node_id in candidates):
        return merged
    return excluded
