"""controller.autoscale: keep-alive, min_instances, scale-in and deleted functions, on synthetic
clusters."""

from __future__ import annotations

from typing import Any

from controller.autoscale import StartInstance, StopInstance, autoscale
from controller.cluster import ClusterView, FunctionView, InstanceView, NodeView

NOW = 1000.0
NODE = NodeView("n1", 1 << 40, 0, 64, 0, {}, {})


def inst(instance_id: str, **overrides: Any) -> InstanceView:
    """An instance of `f` that has been idle since NOW - 100."""
    fields: dict[str, Any] = {
        "instance_id": instance_id,
        "function": "f",
        "node_id": "n1",
        "state": "ready",
        "in_flight": 0,
        "idle_since": NOW - 100,
        "reserved_bytes": 1 << 30,
    }
    return InstanceView(**(fields | overrides))


def fn(name: str = "f", **overrides: Any) -> FunctionView:
    fields: dict[str, Any] = {
        "name": name,
        "source": f"s3://models/{name}",
        "checkpoint_bytes": 1 << 30,
        "memory_bytes": 1 << 30,
        "min_instances": 0,
        "max_instances": 4,
        "target_concurrency": 8,
        "keep_alive_s": 30.0,
    }
    return FunctionView(**(fields | overrides))


def run(instances: list[InstanceView], functions: list[FunctionView]) -> list[Any]:
    return list(autoscale(ClusterView((NODE,), tuple(instances), NOW), functions))


def stopped(actions: list[Any]) -> list[str]:
    return [a.instance_id for a in actions if isinstance(a, StopInstance)]


def test_stops_an_instance_idle_past_keep_alive_with_a_reason() -> None:
    (action,) = run([inst("a")], [fn()])
    assert isinstance(action, StopInstance)
    assert (action.instance_id, action.function) == ("a", "f")
    assert "keep_alive" in action.reason and "100s" in action.reason


def test_keeps_an_instance_idle_for_less_than_keep_alive() -> None:
    assert run([inst("a", idle_since=NOW - 29.9)], [fn()]) == []


def test_stops_exactly_at_keep_alive() -> None:
    assert stopped(run([inst("a", idle_since=NOW - 30)], [fn()])) == ["a"]


def test_zero_keep_alive_stops_as_soon_as_idle() -> None:
    assert stopped(run([inst("a", idle_since=NOW)], [fn(keep_alive_s=0.0)])) == ["a"]


def test_never_stops_busy_or_loading_instances() -> None:
    instances = [
        inst("busy", in_flight=1, idle_since=None),
        inst("loading", state="loading"),
        inst("no-idle-time", idle_since=None),
    ]
    assert run(instances, [fn()]) == []


def test_keeps_min_instances_stopping_the_oldest_idle_first() -> None:
    instances = [
        inst("young", idle_since=NOW - 40),
        inst("old", idle_since=NOW - 90),
        inst("mid", idle_since=NOW - 60),
    ]
    assert stopped(run(instances, [fn(min_instances=1)])) == ["old", "mid"]


def test_loading_instances_count_toward_min_instances() -> None:
    instances = [inst("idle"), inst("loading", state="loading", idle_since=None)]
    assert run(instances, [fn(min_instances=2)]) == []
    assert stopped(run(instances, [fn(min_instances=1)])) == ["idle"]


def test_starts_the_difference_up_to_min_instances() -> None:
    actions = run([inst("a", in_flight=1, idle_since=None)], [fn(min_instances=3)])
    assert actions == [StartInstance("f", "min_instances is 3, 1 running")] * 2


def test_stops_idle_instances_of_deleted_functions_regardless_of_keep_alive() -> None:
    instances = [
        inst("gone-idle", function="g", idle_since=NOW),
        inst("gone-loading", function="g", state="loading", idle_since=None),
        inst("gone-busy", function="g", in_flight=2, idle_since=None),
    ]
    actions = run(instances, [fn()])
    assert actions == [
        StopInstance("gone-idle", "g", "function deleted"),
        StopInstance("gone-loading", "g", "function deleted"),
    ]


def test_actions_come_in_a_deterministic_order() -> None:
    instances = [
        inst("z-old", function="z", idle_since=NOW - 500),
        inst("deleted-2", function="y"),
        inst("a-new", function="a"),
        inst("a-old", function="a", idle_since=NOW - 200),
        inst("deleted-1", function="x"),
    ]
    functions = [fn("z", min_instances=2), fn("a")]
    expected = ["a-old", "a-new", "deleted-1", "deleted-2"]
    actions = run(instances, functions)
    assert stopped(actions) == expected
    assert actions[2] == StartInstance("z", "min_instances is 2, 1 running")
    assert run(list(reversed(instances)), list(reversed(functions))) == actions


def test_nothing_to_do_gives_no_actions() -> None:
    assert run([], []) == []
    assert run([inst("a", in_flight=3, idle_since=None)], [fn(min_instances=1)]) == []


def busy(instance_id: str, in_flight: int, **overrides: Any) -> InstanceView:
    return inst(instance_id, in_flight=in_flight, idle_since=None, **overrides)


def test_scale_in_moves_the_least_busy_instance_when_the_rest_can_take_its_requests() -> None:
    actions = run([busy("a", 3), busy("b", 1)], [fn()])
    assert actions == [
        StopInstance(
            "b",
            "f",
            "scale in: 4 requests fit on 1 instance(s) at half their target concurrency of 8",
            migrate=True,
        )
    ]


def test_no_scale_in_over_half_the_remaining_capacity_or_at_min_instances() -> None:
    assert run([busy("a", 3), busy("b", 2)], [fn()]) == []  # 5 > 8 // 2
    assert run([busy("a", 1), busy("b", 1)], [fn(min_instances=2)]) == []
    assert run([busy("a", 1)], [fn()]) == []  # the last instance is never consolidated


def test_no_scale_in_while_an_instance_is_idle_loading_or_requests_queue() -> None:
    assert stopped(run([busy("a", 1), inst("idle", idle_since=NOW)], [fn()])) == []
    loading = inst("l", state="loading", idle_since=None)
    assert run([busy("a", 1), busy("b", 1), loading], [fn()]) == []
    assert run([busy("a", 1), busy("b", 1)], [fn(queued=1)]) == []


def test_scale_in_picks_by_load_then_id() -> None:
    actions = run([busy("c", 1), busy("a", 1), busy("b", 2)], [fn()])
    assert stopped(actions) == ["a"] and actions[0].migrate
