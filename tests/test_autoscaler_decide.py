"""`autoscaler.decide` on synthetic clusters: each stage (delays, smoothing, cooldowns, bounds,
budget) and the SpotHedge-style pool choice, with small builders."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from autoscaler.catalog import load_catalog
from autoscaler.decide import (
    MAX_LAUNCH_FAILURES,
    Decision,
    Demand,
    Launch,
    NodePhase,
    ObservedNode,
    PolicyState,
    Retire,
    decide,
    mark_short,
    record_launch_failure,
    record_launch_success,
)
from autoscaler.policy import PricedPolicy, parse_policy, price_policy


def policy(**overrides: Any) -> PricedPolicy:
    """Spot at $0.1/h in two zones, on-demand at $0.3/h; one slot a node; no delays."""
    data: dict[str, Any] = {
        "pools": [
            {
                "name": "spot",
                "provider": "local",
                "market": "spot",
                "price_per_hour": 0.1,
                "zones": ["a", "b"],
                "max_nodes": 4,
            },
            {
                "name": "od",
                "provider": "local",
                "market": "on_demand",
                "price_per_hour": 0.3,
                "max_nodes": 4,
            },
        ],
        "scaling": {"downscale_delay": 0, "cooldown": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return price_policy(parse_policy(data), load_catalog())


def node(
    node_id: str, pool: str = "spot", zone: str = "a", phase: NodePhase = NodePhase.READY, **kw: Any
) -> ObservedNode:
    return ObservedNode(node_id, pool, zone, phase, launched_at=kw.pop("launched_at", 0.0), **kw)


def launches(d: Decision) -> list[tuple[str, str]]:
    return [(a.pool, a.zone) for a in d.actions if isinstance(a, Launch)]


def retires(d: Decision) -> list[str]:
    return [a.node_id for a in d.actions if isinstance(a, Retire)]


def test_it_launches_the_cheapest_slots_first_spread_over_zones() -> None:
    d = decide(0.0, [], Demand(3), policy(), PolicyState())
    assert launches(d) == [("spot", "a"), ("spot", "b"), ("spot", "a")]
    assert all("need 3 more slot(s)" in a.reason for a in d.actions)


def test_zones_follow_what_runs_already_and_spread_can_be_turned_off() -> None:
    d = decide(0.0, [node("n1", zone="a")], Demand(2), policy(), PolicyState())
    assert launches(d) == [("spot", "b")]
    d = decide(0.0, [node("n1", zone="a")], Demand(3), policy(spot={"spread_zones": False}),
               PolicyState())  # fmt: skip
    assert launches(d) == [("spot", "a"), ("spot", "a")]


def test_spot_over_provision_adds_spare_nodes() -> None:
    d = decide(0.0, [], Demand(2), policy(spot={"over_provision": 1}), PolicyState())
    assert len(launches(d)) == 3


def test_over_provision_launches_nothing_while_a_downscale_waits() -> None:
    """Found by `stoke simulate`: spares added after the delays launched one every tick."""
    p = policy(spot={"over_provision": 1}, scaling={"downscale_delay": "60s"})
    nodes = [node(f"n{i}", zone="ab"[i % 2]) for i in range(5)]
    state = PolicyState()
    for t in range(0, 50, 5):
        d = decide(float(t), nodes, Demand(3), p, state)
        assert launches(d) == [], (t, d)
        state = d.state
    assert len(retires(decide(60.0, nodes, Demand(3), p, state))) == 1  # 3 + 1 spare wanted


def test_max_nodes_of_spot_spills_onto_on_demand() -> None:
    p = policy(pools=[
        {"name": "spot", "provider": "local", "market": "spot", "price_per_hour": 0.1,
         "max_nodes": 1},
        {"name": "od", "provider": "local", "price_per_hour": 0.3, "max_nodes": 1},
    ])  # fmt: skip
    d = decide(0.0, [], Demand(5), p, PolicyState())
    assert launches(d) == [("spot", "local"), ("od", "local")]  # max_nodes bound both


def test_short_spot_falls_back_to_on_demand_then_returns_and_the_fallback_retires() -> None:
    p = policy()
    state = PolicyState()
    for zone in ("a", "b"):  # refused for capacity in both zones
        state = record_launch_failure(state, p, "spot", zone, capacity=True, now=0.0)
    d = decide(1.0, [], Demand(1), p, state)
    assert launches(d) == [("od", "local")]
    assert "falling back to on-demand" in d.actions[0].reason
    fallback = [node("od1", "od", "local")]
    # Still short: nothing more to do.
    d = decide(100.0, fallback, Demand(1), p, d.state)
    assert d.actions == ()
    # return_to_spot_after (600 s) later, spot is tried again next to the on-demand node...
    d = decide(601.0, fallback, Demand(1), p, d.state)
    assert launches(d) == [("spot", "a")] and "spot is back" in d.actions[0].reason
    # ...which retires once the spot node is ready (not while it launches).
    launching = [*fallback, node("s1", phase=NodePhase.LAUNCHING, launched_at=601.0)]
    assert decide(602.0, launching, Demand(1), p, d.state).actions == ()
    ready = [*fallback, node("s1", launched_at=601.0)]
    assert retires(decide(640.0, ready, Demand(1), p, d.state)) == ["od1"]


def test_a_preempted_zone_is_avoided_while_short() -> None:
    p = policy()
    state = mark_short(PolicyState(), "spot", "a", until=50.0)
    assert launches(decide(10.0, [], Demand(2), p, state)) == [("spot", "b"), ("spot", "b")]
    assert launches(decide(60.0, [], Demand(2), p, state)) == [("spot", "a"), ("spot", "b")]


def test_fallback_none_launches_no_on_demand() -> None:
    p = policy(spot={"fallback": "none"})
    state = PolicyState()
    for zone in ("a", "b"):
        state = record_launch_failure(state, p, "spot", zone, capacity=True, now=0.0)
    assert decide(1.0, [], Demand(1), p, state).actions == ()


def test_failed_launches_back_off_then_set_the_pool_aside() -> None:
    p = policy(pools=[{"name": "od", "provider": "local", "price_per_hour": 0.3}])
    state = record_launch_failure(PolicyState(), p, "od", "local", capacity=False, now=0.0)
    assert decide(5.0, [], Demand(1), p, state).actions == ()  # backing off (10 s)
    assert launches(decide(10.0, [], Demand(1), p, state)) == [("od", "local")]
    for _ in range(MAX_LAUNCH_FAILURES - 1):
        state = record_launch_failure(state, p, "od", "local", capacity=False, now=10.0)
    assert decide(300.0, [], Demand(1), p, state).actions == ()  # set aside for 600 s
    assert launches(decide(611.0, [], Demand(1), p, state)) == [("od", "local")]
    assert record_launch_success(state, "od").failures == {}


def test_upscale_delay_waits_for_the_need_to_persist() -> None:
    p = policy(scaling={"upscale_delay": "30s"})
    d = decide(0.0, [], Demand(1), p, PolicyState())
    assert d.actions == ()
    d = decide(29.0, [], Demand(1), p, d.state)
    assert d.actions == ()
    assert launches(decide(30.0, [], Demand(1), p, d.state)) == [("spot", "a")]
    # A dip in between restarts the wait.
    d = decide(0.0, [], Demand(1), p, PolicyState())
    d = decide(10.0, [], Demand(0), p, d.state)
    d = decide(35.0, [], Demand(1), p, d.state)
    assert d.actions == ()


def test_downscale_delay_and_smoothing_slow_the_shrinking() -> None:
    nodes = [node("n1", launched_at=0), node("n2", zone="b", launched_at=1)]
    p = policy(scaling={"downscale_delay": "60s"})
    d = decide(0.0, nodes, Demand(0), p, PolicyState(smoothed=2.0))
    assert d.actions == ()
    d = decide(59.0, nodes, Demand(0), p, d.state)
    assert d.actions == ()
    d = decide(60.0, nodes, Demand(0), p, d.state)
    assert retires(d) == ["n2"]  # the newest of equals first, one per call
    smoothed = policy(scaling={"smoothing": 0.5})
    d = decide(0.0, nodes, Demand(0), smoothed, PolicyState(smoothed=2.0))
    assert d.need_slots == 1 and retires(d) == ["n2"]  # halfway: 1 slot still wanted


def test_cooldown_blocks_the_opposite_change() -> None:
    p = policy(scaling={"cooldown": "30s"})
    nodes = [node("n1"), node("n2", zone="b", launched_at=1.0)]
    state = PolicyState(last_launch=100.0)
    d = decide(110.0, nodes, Demand(1), p, state)
    assert d.actions == () and any("cooldown" in n for n in d.notes)
    assert retires(decide(130.0, nodes, Demand(1), p, state)) == ["n2"]
    d = decide(110.0, [], Demand(1), p, PolicyState(last_retire=100.0))
    assert d.actions == () and any("cooldown" in n for n in d.notes)


def test_min_nodes_are_kept_and_launched_without_demand() -> None:
    p = policy(pools=[
        {"name": "od", "provider": "local", "price_per_hour": 0.3, "min_nodes": 2},
    ])  # fmt: skip
    d = decide(0.0, [], Demand(0), p, PolicyState())
    assert launches(d) == [("od", "local"), ("od", "local")]
    assert "min_nodes is 2" in d.actions[0].reason
    nodes = [node("a", "od", "local"), node("b", "od", "local")]
    assert decide(0.0, nodes, Demand(0), p, PolicyState()).actions == ()


def test_the_budget_caps_launches_and_says_so() -> None:
    p = policy(budget={"max_per_hour": 0.25})
    d = decide(0.0, [node("n1")], Demand(4), p, PolicyState())
    assert launches(d) == [("spot", "b")]  # 0.1 + 0.1 = 0.2; a third would be 0.3
    assert any("over max_per_hour $0.25" in n for n in d.notes)


def test_retirement_takes_the_most_expensive_idlest_node_and_keeps_the_need() -> None:
    p = policy()
    nodes = [
        node("s1", running=2),
        node("s2", zone="b", running=0),
        node("o1", "od", "local", running=1),
    ]
    assert retires(decide(0.0, nodes, Demand(2), p, PolicyState())) == ["o1"]
    assert retires(decide(0.0, nodes[:2], Demand(1), p, PolicyState())) == ["s2"]
    assert decide(0.0, nodes[:2], Demand(2), p, PolicyState()).actions == ()


def test_retiring_and_preempted_nodes_are_not_capacity() -> None:
    p = policy()
    nodes = [node("s1", phase=NodePhase.PREEMPTED), node("s2", zone="b", phase=NodePhase.RETIRING)]
    d = decide(0.0, nodes, Demand(1), p, PolicyState())
    assert len(launches(d)) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"pools": []},
        {"pools": [{"name": "X", "provider": "local"}]},
        {"pools": [{"name": "a", "provider": "gcp"}]},
        {"pools": [{"name": "a", "provider": "local", "min_nodes": 3, "max_nodes": 1}]},
        {"pools": [{"name": "a", "provider": "local"}, {"name": "a", "provider": "local"}]},
        {"spot": {"fallback": "maybe"}},
        {"scaling": {"smoothing": 0}},
    ],
)
def test_state_is_plain_data_and_bad_policies_are_refused(change: dict[str, Any]) -> None:
    from autoscaler.policy import PolicyError

    with pytest.raises(PolicyError):
        policy(**change)
    state = dataclasses.asdict(PolicyState(short_until={"spot/a": 1.0}))
    assert PolicyState(**state) == PolicyState(short_until={"spot/a": 1.0})
