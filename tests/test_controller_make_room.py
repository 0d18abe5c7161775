"""controller.make_room: locality-driven placement by migration, on synthetic clusters."""

from __future__ import annotations

import math
from typing import Any

from controller.cluster import ClusterView, FunctionView, InstanceView, NodeView
from controller.make_room import plan_make_room

GIB = 1 << 30
BW = {"dram": 8e9, "disk": 2e9, "remote": 1e8}
NEW = "s3://models/new"


def node(node_id: str, **overrides: Any) -> NodeView:
    fields: dict[str, Any] = {
        "node_id": node_id,
        "memory_total": 8 * GIB,
        "memory_reserved": 8 * GIB,
        "slots_total": 2,
        "slots_used": 2,
        "holdings": {},
        "bandwidths": BW,
    }
    return NodeView(**(fields | overrides))


def inst(instance_id: str, node_id: str, function: str = "other", **overrides: Any) -> InstanceView:
    fields: dict[str, Any] = {
        "instance_id": instance_id,
        "function": function,
        "node_id": node_id,
        "state": "ready",
        "in_flight": 1,
        "idle_since": None,
        "reserved_bytes": 4 * GIB,
    }
    return InstanceView(**(fields | overrides))


def fn(name: str = "new", **overrides: Any) -> FunctionView:
    fields: dict[str, Any] = {
        "name": name,
        "source": NEW if name == "new" else f"s3://models/{name}",
        "checkpoint_bytes": 4 * GIB,
        "memory_bytes": 4 * GIB,
        "min_instances": 0,
        "max_instances": 4,
        "target_concurrency": 4,
        "keep_alive_s": 30.0,
    }
    return FunctionView(**(fields | overrides))


def cluster(*parts: NodeView | InstanceView) -> ClusterView:
    nodes = tuple(p for p in parts if isinstance(p, NodeView))
    instances = tuple(p for p in parts if isinstance(p, InstanceView))
    return ClusterView(nodes=nodes, instances=instances, now=100.0)


FUNCTIONS = {"other": fn("other"), "new": fn()}
IN_DRAM = {"dram": {NEW: 4 * GIB}}


def test_busy_instance_on_the_dram_node_moves_to_its_sibling_and_the_function_starts_there() -> (
    None
):
    view = cluster(
        node("a", holdings=IN_DRAM),
        node("b", slots_used=1, memory_reserved=4 * GIB),
        inst("o1", "a"),
        inst("o2", "a", in_flight=0, idle_since=None, state="loading"),
        inst("o3", "b"),
    )
    plan = plan_make_room(view, fn(), FUNCTIONS, alternative_s=math.inf, migration_s=0.5)
    assert plan is not None
    assert (plan.node_id, plan.tier, dict(plan.migrate), plan.evict) == (
        "a",
        "dram",
        {"o1": "o3"},
        (),
    )
    assert math.isclose(plan.estimate_s, 0.5 + 4 * GIB / 8e9)


def test_no_plan_when_it_does_not_beat_the_alternative() -> None:
    view = cluster(
        node("a", holdings=IN_DRAM), node("b", slots_used=1), inst("o1", "a"), inst("o3", "b")
    )
    load_s = 4 * GIB / 8e9
    assert (
        plan_make_room(view, fn(), FUNCTIONS, alternative_s=0.5 + load_s, migration_s=0.5) is None
    )
    assert plan_make_room(view, fn(), FUNCTIONS, alternative_s=0.6 + load_s, migration_s=0.5)


def test_no_plan_when_the_busy_instance_has_nowhere_to_go() -> None:
    full = fn("other", target_concurrency=1)
    view = cluster(
        node("a", holdings=IN_DRAM), node("b", slots_used=1), inst("o1", "a"), inst("o3", "b")
    )
    assert (
        plan_make_room(view, fn(), {"other": full}, alternative_s=math.inf, migration_s=0.5) is None
    )


def test_no_plan_when_the_checkpoint_is_not_in_dram_or_the_node_is_draining() -> None:
    base = (node("b", slots_used=1), inst("o1", "a"), inst("o3", "b"))
    on_disk = cluster(node("a", holdings={"disk": {NEW: 4 * GIB}}), *base)
    draining = cluster(node("a", holdings=IN_DRAM, draining=True), *base)
    for view in (on_disk, draining):
        assert (
            plan_make_room(view, fn(), FUNCTIONS, alternative_s=math.inf, migration_s=0.5) is None
        )


def test_idle_instances_are_evicted_before_busy_ones_are_migrated() -> None:
    view = cluster(
        node(
            "a",
            holdings=IN_DRAM,
            slots_total=3,
            slots_used=3,
            memory_total=12 * GIB,
            memory_reserved=12 * GIB,
        ),
        node("b", slots_used=1),
        inst("idle", "a", in_flight=0, idle_since=50.0),
        inst("o1", "a", in_flight=2),
        inst("o2", "a", in_flight=1),
        inst("o3", "b"),
    )
    plan = plan_make_room(
        view, fn(memory_bytes=8 * GIB), FUNCTIONS, alternative_s=math.inf, migration_s=1.0
    )
    assert plan is not None
    assert plan.evict == ("idle",) and dict(plan.migrate) == {"o2": "o3"}


def test_destinations_account_for_what_earlier_victims_send() -> None:
    view = cluster(
        node(
            "a",
            holdings=IN_DRAM,
            memory_total=12 * GIB,
            memory_reserved=12 * GIB,
            slots_total=3,
            slots_used=3,
        ),
        node("b", slots_used=2),
        inst("v1", "a", in_flight=2),
        inst("v2", "a", in_flight=2),
        inst("v3", "a", in_flight=3),
        inst("d1", "b", in_flight=1),
        inst("d2", "b", in_flight=2),
    )
    plan = plan_make_room(
        view, fn(memory_bytes=8 * GIB), FUNCTIONS, alternative_s=math.inf, migration_s=1.0
    )
    assert plan is not None
    assert dict(plan.migrate) == {"v1": "d1", "v2": "d2"}  # d1 has room for 2 more, then d2


def test_a_node_with_room_needs_no_plan() -> None:
    view = cluster(
        node("a", holdings=IN_DRAM, slots_used=1, memory_reserved=4 * GIB), inst("o1", "a")
    )
    assert plan_make_room(view, fn(), FUNCTIONS, alternative_s=math.inf, migration_s=0.5) is None
