"""The node's capacity: a memory budget and a number of instance slots, never over-committed.

Loading an instance reserves a slot first (cheap, before any fetch), then, once the
checkpoint's size is known, its bytes (see `placement.reserve`: on a CPU node weights + KV
cache + `facts.sizing.WORKER_OVERHEAD_BYTES`; on a GPU node the overhead here and the rest on
one GPU).
Both are released when the instance is unloaded or dies.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from node_agent.facts.units import format_size
from node_agent.instances.errors import InstanceError


class NoRoomError(InstanceError):
    """The node has no free slot or not enough memory for an instance."""


@dataclass
class Budget:
    """Memory bytes and instance slots, with reservations. Thread-safe."""

    memory_bytes: int
    slots: int
    reserved_bytes: int = 0
    used_slots: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0 or self.slots <= 0:
            raise ValueError(
                f"budget memory={self.memory_bytes} slots={self.slots}: both must be positive"
            )

    def can_take_slot(self) -> bool:
        """True if a slot is free."""
        with self._lock:
            return self.used_slots < self.slots

    def take_slot(self) -> None:
        """Reserve one instance slot; `NoRoomError` if all are taken."""
        with self._lock:
            if self.used_slots >= self.slots:
                raise NoRoomError(
                    f"all {self.slots} instance slots are in use; unload an instance or start "
                    "the node with more --slots"
                )
            self.used_slots += 1

    def free_slot(self) -> None:
        """Undo one `take_slot`."""
        with self._lock:
            assert self.used_slots > 0, "free_slot without take_slot"
            self.used_slots -= 1

    def reserve(self, nbytes: int, what: str) -> None:
        """Reserve `nbytes` of memory for `what`; `NoRoomError` if they do not fit."""
        with self._lock:
            free = self.memory_bytes - self.reserved_bytes
            if nbytes > free:
                raise NoRoomError(
                    f"{what} needs {format_size(nbytes)} but only {format_size(free)} of the "
                    f"node's {format_size(self.memory_bytes)} memory budget is free; unload an "
                    "instance, lower its KV cache, or raise --cpu-memory"
                )
            self.reserved_bytes += nbytes

    def release(self, nbytes: int) -> None:
        """Undo one `reserve` of `nbytes`."""
        with self._lock:
            assert 0 <= nbytes <= self.reserved_bytes, "release of bytes never reserved"
            self.reserved_bytes -= nbytes
