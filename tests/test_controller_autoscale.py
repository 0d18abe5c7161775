"""controller.autoscale: keep-alive (fixed and adaptive), min_instances, scale-in and deleted
functions, on synthetic clusters; adaptive against fixed keep-alive over simulated time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autoscaler.keepalive import DEFAULT_CONFIG, Windows
from controller.autoscale import StartInstance, StopInstance, autoscale
from controller.cluster import ClusterView, FunctionView, InstanceView, NodeView
from controller.idle_times import IdleTimes

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


# -- adaptive keep-alive ----------------------------------------------------------------------

PREWARM_S, KEEP_S = 480.0, 180.0  # instance wanted from 8m to 11m after the function went idle


def adaptive(idle_for: float | None, **overrides: Any) -> FunctionView:
    """An adaptive function whose windows want an instance from PREWARM_S to PREWARM_S + KEEP_S
    of idleness, idle for `idle_for` seconds (None: it serves)."""
    w = Windows(PREWARM_S, KEEP_S, "p5 idle 9m, p99 idle 10m", from_histogram=True)
    since = None if idle_for is None else NOW - idle_for
    return fn(windows=w, idle_since=since, **overrides)


def prewarmed(instance_id: str = "p", **overrides: Any) -> InstanceView:
    """A ready instance that was started ahead of a request and has served none."""
    return inst(instance_id, idle_since=None, **overrides)


def test_adaptive_with_prewarm_stops_an_instance_as_soon_as_the_function_is_idle() -> None:
    (action,) = run([inst("a", idle_since=NOW - 2)], [adaptive(2)])
    assert isinstance(action, StopInstance) and action.instance_id == "a"
    assert action.reason.startswith("adaptive keep-alive: idle 2s, before its pre-warm window")
    assert "p99 idle 10m" in action.reason


def test_adaptive_starts_an_instance_when_the_prewarm_window_ends() -> None:
    assert run([], [adaptive(PREWARM_S - 1)]) == []
    (action,) = run([], [adaptive(PREWARM_S)])
    assert isinstance(action, StartInstance) and action.function == "f"
    assert action.reason.startswith("adaptive keep-alive: pre-warm after 8m idle")
    assert run([], [adaptive(PREWARM_S + KEEP_S - 1)]) != []


def test_adaptive_keeps_a_prewarmed_instance_through_the_keep_alive_window() -> None:
    assert run([prewarmed()], [adaptive(PREWARM_S + 1)]) == []
    assert run([prewarmed()], [adaptive(PREWARM_S + KEEP_S - 1)]) == []
    assert run([prewarmed(state="loading")], [adaptive(PREWARM_S)]) == []  # no second start


def test_adaptive_stops_the_prewarmed_instance_when_the_window_ends_and_starts_none() -> None:
    (action,) = run([prewarmed()], [adaptive(PREWARM_S + KEEP_S)])
    assert isinstance(action, StopInstance) and action.instance_id == "p"
    assert "past its keep-alive window ending at 11m" in action.reason
    assert run([], [adaptive(PREWARM_S + KEEP_S)]) == []


def test_adaptive_without_prewarm_keeps_the_instance_for_the_keep_alive_window() -> None:
    w = Windows(0.0, 300.0, "3 idle times recorded, fewer than 10: fixed keep-alive 5m", False)
    assert run([inst("a", idle_since=NOW - 299)], [fn(windows=w, idle_since=NOW - 299)]) == []
    (action,) = run([inst("a", idle_since=NOW - 300)], [fn(windows=w, idle_since=NOW - 300)])
    assert isinstance(action, StopInstance) and "fixed keep-alive 5m" in action.reason
    assert run([], [fn(windows=w, idle_since=NOW - 10)]) == []  # nothing to pre-warm


def test_adaptive_while_others_serve_keeps_an_idle_instance_through_both_windows() -> None:
    busy_one = busy("b", 1)
    end = PREWARM_S + KEEP_S
    assert stopped(run([busy_one, inst("a", idle_since=NOW - end + 1)], [adaptive(None)])) == []
    assert stopped(run([busy_one, inst("a", idle_since=NOW - end)], [adaptive(None)])) == ["a"]


def test_adaptive_keeps_min_instances_and_prewarms_only_from_zero() -> None:
    assert run([inst("a", idle_since=NOW - 2)], [adaptive(2, min_instances=1)]) == []
    assert run([], [adaptive(PREWARM_S, min_instances=1)]) == [
        StartInstance("f", "min_instances is 1, 0 running")
    ]


def test_fixed_keep_alive_ignores_the_function_idle_time() -> None:
    assert run([inst("a", idle_since=NOW - 2)], [fn(idle_since=NOW - 2)]) == []
    assert run([], [fn(idle_since=NOW - PREWARM_S)]) == []


# -- adaptive vs fixed keep-alive over simulated time -----------------------------------------


@dataclass
class SimInstance:
    ready_at: float
    in_flight: int = 0
    idle_since: float | None = None
    done_at: float = 0.0


def simulate(keep_alive: float | None, period_s: int = 600, hours: int = 24) -> tuple[int, float]:
    """One function, a 5 s request every `period_s`, run through `autoscale` every 5 s for
    `hours`, with fixed `keep_alive` seconds or adaptive windows (None) learned by the
    controller's IdleTimes. Instances load in 20 s. Returns (cold starts: requests that found no
    ready instance, instance-seconds spent loaded or loading but serving nothing)."""
    tick, serve_s, load_s, fallback_s = 5, 5.0, 20.0, 300.0
    idle = IdleTimes()
    instances: dict[str, SimInstance] = {}
    cold, idle_s, started = 0, 0.0, 0
    for t in range(0, hours * 3600, tick):
        now = float(t)
        for i in instances.values():
            if i.in_flight and i.done_at <= now:
                i.in_flight, i.idle_since = 0, now
                if not any(other.in_flight for other in instances.values()):
                    idle.went_idle("f", now)
        if t % period_s == 0:
            ready = [i for i in instances.values() if i.ready_at <= now]
            if not ready:
                cold += 1
            if not instances:
                started += 1
                instances[f"i{started}"] = SimInstance(ready_at=now + load_s)
            target = min(instances.values(), key=lambda i: i.ready_at)
            target.in_flight, target.idle_since = 1, None
            target.done_at = max(now, target.ready_at) + serve_s
            idle.arrived("f", now)
        views = tuple(
            inst(
                name,
                state="ready" if i.ready_at <= now else "loading",
                in_flight=i.in_flight,
                idle_since=i.idle_since,
            )
            for name, i in instances.items()
        )
        windows = idle.windows("f", fallback_s) if keep_alive is None else None
        function = fn(
            keep_alive_s=keep_alive or fallback_s, windows=windows, idle_since=idle.idle_since("f")
        )
        for action in autoscale(ClusterView((NODE,), views, now), [function]):
            if isinstance(action, StopInstance):
                del instances[action.instance_id]
            else:
                started += 1
                instances[f"i{started}"] = SimInstance(ready_at=now + load_s)
        idle_s += tick * sum(1 for i in instances.values() if not i.in_flight)
    return cold, idle_s


def test_adaptive_keep_alive_beats_fixed_ones_on_a_periodic_workload() -> None:
    fixed_5m, fixed_15m, learned = simulate(300.0), simulate(900.0), simulate(None)
    assert learned[0] < fixed_5m[0]  # fewer cold starts than a short fixed keep-alive
    assert learned[1] < fixed_15m[1]  # less idle instance-time than a long one
    assert learned[1] < fixed_5m[1]  # and even less than the short one
    # Only the first request and those while it learns (the fallback is 5m) start cold.
    assert learned[0] <= DEFAULT_CONFIG.min_samples + 1
