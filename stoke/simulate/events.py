"""The simulation's event kinds; at equal times they are handled in this order (a node that
registers, then an instance that finishes loading, before the requests that wait on them)."""

from __future__ import annotations

import enum


class Kind(enum.IntEnum):
    NODE_READY = 0
    INSTANCE_READY = 1
    FIRST_TOKEN = 2
    DONE = 3
    SPOT = 4
    DEADLINE = 5
    TICK = 6
