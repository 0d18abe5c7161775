"""What the cluster costs: node-hours times each node's price, attributed to functions by their
share of the node (each instance holds one of its slots; the unused slots' share is `idle`).

`Ledger.advance(now, nodes)` adds the cost of the interval since the last call; the controller
calls it every tick and persists `to_json()` with the autoscaler's state, so the spend so far
survives a restart. The simulator uses the same ledger in virtual time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

IDLE = "(idle)"


@dataclass(frozen=True, slots=True)
class BilledNode:
    node_id: str
    pool: str
    price_per_hour: float
    slots: int
    functions: Mapping[str, int] = field(default_factory=dict)
    """Function -> instances on the node (slots they hold)."""


@dataclass
class Ledger:
    total: float = 0.0
    by_pool: dict[str, float] = field(default_factory=dict)
    by_function: dict[str, float] = field(default_factory=dict)
    node_hours: dict[str, float] = field(default_factory=dict)
    """Pool -> node-hours so far."""
    last: float | None = None
    per_hour: float = 0.0
    """USD per hour of the nodes at the last `advance`."""

    def advance(self, now: float, nodes: Sequence[BilledNode]) -> None:
        """Bill `nodes` for the time since the previous call (nothing for the first)."""
        hours = 0.0 if self.last is None else max(0.0, now - self.last) / 3600.0
        self.last = now
        self.per_hour = sum(n.price_per_hour for n in nodes)
        if hours == 0.0:
            return
        for node in nodes:
            cost = node.price_per_hour * hours
            self.total += cost
            self.by_pool[node.pool] = self.by_pool.get(node.pool, 0.0) + cost
            self.node_hours[node.pool] = self.node_hours.get(node.pool, 0.0) + hours
            used = 0
            for function, count in node.functions.items():
                share = min(count, node.slots - used)
                if share <= 0:
                    continue
                used += share
                self._add(function, cost * share / node.slots)
            if used < node.slots:
                self._add(IDLE, cost * (node.slots - used) / node.slots)

    def _add(self, function: str, cost: float) -> None:
        self.by_function[function] = self.by_function.get(function, 0.0) + cost

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_pool": self.by_pool,
            "by_function": self.by_function,
            "node_hours": self.node_hours,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Ledger:
        def floats(key: str) -> dict[str, float]:
            raw = data.get(key) or {}
            return {str(k): float(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

        return cls(
            total=float(data.get("total") or 0.0),
            by_pool=floats("by_pool"),
            by_function=floats("by_function"),
            node_hours=floats("node_hours"),
        )
