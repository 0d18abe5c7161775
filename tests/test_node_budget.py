"""The node's memory and slot budget never over-commits, and releases what it reserved."""

from __future__ import annotations

from typing import Any

import pytest

from node_agent.instances import Budget, NoRoomError


def _budget(**overrides: Any) -> Budget:
    return Budget(**({"memory_bytes": 100, "slots": 2} | overrides))


def test_reserve_refuses_beyond_the_budget() -> None:
    budget = _budget()
    budget.reserve(60, "a")
    with pytest.raises(NoRoomError, match="--cpu-memory"):
        budget.reserve(41, "b")
    budget.reserve(40, "c")
    assert budget.reserved_bytes == 100


def test_release_makes_room_again() -> None:
    budget = _budget()
    budget.reserve(100, "a")
    budget.release(100)
    budget.reserve(100, "b")


def test_slots_are_counted() -> None:
    budget = _budget(slots=1)
    budget.take_slot()
    assert not budget.can_take_slot()
    with pytest.raises(NoRoomError, match="--slots"):
        budget.take_slot()
    budget.free_slot()
    assert budget.can_take_slot()


@pytest.mark.parametrize("overrides", [{"memory_bytes": 0}, {"slots": 0}])
def test_empty_budget_is_rejected(overrides: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        _budget(**overrides)
