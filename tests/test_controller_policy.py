"""controller.policy: where a request goes, on synthetic clusters."""

from __future__ import annotations

import random
from typing import Any

import pytest

from controller.cluster import (
    DEFAULT_BANDWIDTH,
    ClusterView,
    FunctionView,
    InstanceView,
    NodeView,
)
from controller.policy import (
    POLICIES,
    ColdStart,
    Refuse,
    Route,
    Wait,
    decide,
    startup_estimate,
)

GIB = 1 << 30
SOURCE = "s3://models/llama"
BW = {"dram": 8e9, "disk": 2e9, "remote": 1e8}


def node(node_id: str = "n1", **overrides: Any) -> NodeView:
    fields: dict[str, Any] = {
        "node_id": node_id,
        "memory_total": 16 * GIB,
        "memory_reserved": 0,
        "slots_total": 4,
        "slots_used": 0,
        "holdings": {},
        "bandwidths": BW,
    }
    return NodeView(**(fields | overrides))


def inst(instance_id: str, **overrides: Any) -> InstanceView:
    fields: dict[str, Any] = {
        "instance_id": instance_id,
        "function": "f",
        "node_id": "n1",
        "state": "ready",
        "in_flight": 0,
        "idle_since": None,
        "reserved_bytes": 4 * GIB,
    }
    return InstanceView(**(fields | overrides))


def fn(**overrides: Any) -> FunctionView:
    fields: dict[str, Any] = {
        "name": "f",
        "source": SOURCE,
        "checkpoint_bytes": 2 * GIB,
        "memory_bytes": 4 * GIB,
        "min_instances": 0,
        "max_instances": 4,
        "target_concurrency": 2,
        "keep_alive_s": 30.0,
    }
    return FunctionView(**(fields | overrides))


def cluster(
    nodes: list[NodeView], instances: list[InstanceView] | None = None, now: float = 100.0
) -> ClusterView:
    return ClusterView(tuple(nodes), tuple(instances or ()), now)


def full(node_id: str, **overrides: Any) -> NodeView:
    """A node with every slot taken."""
    return node(node_id, slots_used=4, memory_reserved=16 * GIB, **overrides)


# -- routing to existing instances ------------------------------------------------------------


def test_routes_to_the_ready_instance_with_fewest_in_flight() -> None:
    view = cluster([node()], [inst("a", in_flight=1), inst("b", in_flight=0)])
    assert decide(view, fn()) == Route("b")


def test_ready_ties_go_to_the_smaller_instance_id() -> None:
    view = cluster([node()], [inst("b", in_flight=1), inst("a", in_flight=1)])
    assert decide(view, fn()) == Route("a")


def test_ready_instance_is_preferred_over_an_emptier_loading_one() -> None:
    view = cluster([node()], [inst("l", state="loading"), inst("r", in_flight=1)])
    assert decide(view, fn()) == Route("r")


def test_loading_instance_with_capacity_takes_the_request_when_ready_ones_are_full() -> None:
    view = cluster([node()], [inst("r", in_flight=2), inst("l", state="loading", in_flight=1)])
    assert decide(view, fn()) == Route("l")


def test_instances_of_other_functions_are_not_routed_to() -> None:
    view = cluster([node()], [inst("g1", function="g")])
    assert isinstance(decide(view, fn()), ColdStart)


def test_instances_on_draining_or_dead_nodes_take_no_requests() -> None:
    nodes = [node("n1", draining=True), node("n2", alive=False), node("n3")]
    view = cluster(nodes, [inst("a", node_id="n1"), inst("b", node_id="n2")])
    assert decide(view, fn()) == ColdStart("n3", "remote", 2 * GIB / BW["remote"])


def test_full_instances_at_max_instances_wait() -> None:
    view = cluster([node()], [inst("a", in_flight=2), inst("b", state="loading", in_flight=2)])
    decision = decide(view, fn(max_instances=2))
    assert decision == Wait("all 2 instances busy")


# -- cold starts ------------------------------------------------------------------------------


def test_startup_estimate_uses_the_fastest_tier_holding_the_source() -> None:
    both = node(holdings={"dram": {SOURCE: 2 * GIB}, "disk": {SOURCE: 2 * GIB}})
    disk = node(holdings={"disk": {SOURCE: 2 * GIB}, "dram": {"other": 1}})
    assert startup_estimate(both, fn()) == ("dram", 2 * GIB / BW["dram"])
    assert startup_estimate(disk, fn()) == ("disk", 2 * GIB / BW["disk"])
    assert startup_estimate(node(), fn()) == ("remote", 2 * GIB / BW["remote"])


def test_startup_estimate_adds_the_loading_queue() -> None:
    assert startup_estimate(node(loading_queue_s=3.0), fn()) == (
        "remote",
        3.0 + 2 * GIB / BW["remote"],
    )


@pytest.mark.parametrize("bandwidths", [{}, {"disk": 0.0}, {"disk": -5.0}])
def test_startup_estimate_falls_back_to_default_bandwidth(bandwidths: dict[str, float]) -> None:
    held = node(holdings={"disk": {SOURCE: 1}}, bandwidths=bandwidths)
    assert startup_estimate(held, fn()) == ("disk", 2 * GIB / DEFAULT_BANDWIDTH["disk"])


def test_locality_prefers_dram_over_disk_over_nothing() -> None:
    nodes = [
        node("a"),
        node("b", holdings={"disk": {SOURCE: 2 * GIB}}),
        node("c", holdings={"dram": {SOURCE: 2 * GIB}}),
    ]
    assert decide(cluster(nodes), fn()) == ColdStart("c", "dram", 2 * GIB / BW["dram"])
    assert decide(cluster(nodes[:2]), fn()) == ColdStart("b", "disk", 2 * GIB / BW["disk"])


def test_a_holding_reached_from_two_sources_is_local_for_both() -> None:
    """A node reports one checkpoint known under a local path and its S3 copy: the controller's
    view (`ClusterState`, from the heartbeat) makes it local for a function deployed from
    either, not only from whichever source the node used last."""
    from controller.state import ClusterState, NodeState
    from node_agent.proto import node_agent_pb2 as pb

    local = "/models/llama"
    holding = pb.Holding(key="k" * 64, source=local, sources=[local, SOURCE], bytes=2 * GIB)
    status = pb.NodeStatus(
        node_id="b",
        devices=pb.Devices(cpu=pb.CpuBudget(memory_budget_bytes=16 * GIB, slots_total=4)),
        tiers=[pb.TierHoldings(tier="dram", budget_bytes=8 * GIB, holdings=[holding])],
        bandwidths=[pb.Bandwidth(tier=t, bytes_per_s=b) for t, b in BW.items()],
    )
    state = ClusterState()
    state.nodes = {
        "a": NodeState("a", "a:1", pb.NodeStatus(node_id="a", devices=status.devices), 0.0),
        "b": NodeState("b", "b:1", status, 0.0),
    }
    for source in (local, SOURCE):
        decision = decide(state.view(), fn(source=source))
        assert decision == ColdStart("b", "dram", 2 * GIB / BW["dram"]), source


def test_a_loading_queue_can_make_a_farther_node_win() -> None:
    nodes = [
        node("a", holdings={"dram": {SOURCE: 2 * GIB}}, loading_queue_s=10.0),
        node("b", holdings={"disk": {SOURCE: 2 * GIB}}),
    ]
    assert decide(cluster(nodes), fn()) == ColdStart("b", "disk", 2 * GIB / BW["disk"])


def test_locality_ties_go_to_the_smaller_node_id() -> None:
    assert decide(cluster([node("z"), node("m")]), fn()).node_id == "m"  # type: ignore[union-attr]


def test_scales_out_when_every_instance_is_at_target_concurrency() -> None:
    view = cluster([node("n1")], [inst("a", in_flight=2)])
    assert isinstance(decide(view, fn(max_instances=2)), ColdStart)


@pytest.mark.parametrize(
    "bad",
    [
        {"draining": True},
        {"alive": False},
        {"slots_used": 4},
        {"memory_reserved": 13 * GIB},  # 3 GiB free < 4 GiB needed
    ],
)
def test_cold_start_skips_nodes_without_room(bad: dict[str, Any]) -> None:
    dram = {"dram": {SOURCE: 2 * GIB}}
    nodes = [node("a", holdings=dram, **bad), node("b")]
    assert decide(cluster(nodes), fn()).node_id == "b"  # type: ignore[union-attr]


def test_exactly_enough_memory_is_room() -> None:
    assert decide(cluster([node(memory_reserved=12 * GIB)]), fn()) == ColdStart(
        "n1", "remote", 2 * GIB / BW["remote"]
    )


def test_random_with_a_seeded_rng_is_deterministic_and_spreads() -> None:
    nodes = [node("a"), node("b"), node("c")]
    view = cluster(nodes)

    def picks(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [decide(view, fn(), "random", rng).node_id for _ in range(30)]  # type: ignore[union-attr]

    assert picks(7) == picks(7)
    assert set(picks(7)) == {"a", "b", "c"}


def test_random_without_an_rng_still_picks_a_candidate() -> None:
    view = cluster([node("a", alive=False), node("b")])
    assert decide(view, fn(), "random") == ColdStart("b", "remote", 2 * GIB / BW["remote"])


def test_least_loaded_picks_the_emptiest_node_whatever_it_holds() -> None:
    nodes = [
        node("a", memory_reserved=8 * GIB, holdings={"dram": {SOURCE: 2 * GIB}}),
        node("b", memory_reserved=2 * GIB),
        node("c", memory_reserved=4 * GIB),
    ]
    assert decide(cluster(nodes), fn(), "least-loaded") == ColdStart(
        "b", "remote", 2 * GIB / BW["remote"]
    )


def test_least_loaded_breaks_ties_by_slots_used_then_node_id() -> None:
    nodes = [node("a", slots_used=2), node("b", slots_used=1), node("c", slots_used=1)]
    assert decide(cluster(nodes), fn(), "least-loaded").node_id == "b"  # type: ignore[union-attr]


def test_least_loaded_compares_fractions_not_bytes() -> None:
    nodes = [
        node("big", memory_total=64 * GIB, memory_reserved=8 * GIB),
        node("small", memory_total=8 * GIB, memory_reserved=2 * GIB),
    ]
    assert decide(cluster(nodes), fn(), "least-loaded").node_id == "big"  # type: ignore[union-attr]


def test_unknown_policy_is_a_value_error_listing_the_choices() -> None:
    with pytest.raises(ValueError, match="locality, random, least-loaded"):
        decide(cluster([node()]), fn(), "fastest")
    assert POLICIES == ("locality", "random", "least-loaded")


# -- eviction ---------------------------------------------------------------------------------


def test_eviction_stops_the_oldest_idle_prefix_that_frees_enough() -> None:
    n1 = full("n1", slots_total=4)
    others = [
        inst("new", function="g", idle_since=50.0, reserved_bytes=4 * GIB),
        inst("old", function="g", idle_since=10.0, reserved_bytes=2 * GIB),
        inst("mid", function="h", idle_since=30.0, reserved_bytes=2 * GIB),
        inst("busy", function="g", in_flight=1, reserved_bytes=8 * GIB),
    ]
    decision = decide(cluster([n1], others), fn())
    assert isinstance(decision, ColdStart)
    assert decision.evict == ("old", "mid")
    assert decision.node_id == "n1"


def test_eviction_needs_a_free_slot_as_well_as_memory() -> None:
    # Slots lowered below what is running: memory is there after one eviction, a slot after two.
    n1 = node("n1", slots_total=2, slots_used=3, memory_reserved=6 * GIB)
    idle = [
        inst("a", function="g", idle_since=1.0, reserved_bytes=2 * GIB),
        inst("b", function="g", idle_since=2.0, reserved_bytes=2 * GIB),
        inst("c", function="g", idle_since=3.0, reserved_bytes=2 * GIB),
    ]
    decision = decide(cluster([n1], idle), fn(memory_bytes=12 * GIB))
    assert isinstance(decision, ColdStart)
    assert decision.evict == ("a", "b")


def test_eviction_never_takes_busy_loading_or_same_function_instances() -> None:
    n1 = full("n1")
    untouchable = [
        inst("busy", function="g", in_flight=1),
        inst("loading", function="g", state="loading"),
        inst("mine", function="f", in_flight=2),
    ]
    decision = decide(cluster([n1], untouchable), fn(max_instances=3))
    assert isinstance(decision, Wait)


def test_eviction_skips_draining_and_dead_nodes() -> None:
    nodes = [full("a", draining=True), full("b", alive=False), full("c")]
    idle = [
        inst("ia", function="g", node_id="a", idle_since=1.0, reserved_bytes=16 * GIB),
        inst("ib", function="g", node_id="b", idle_since=1.0, reserved_bytes=16 * GIB),
        inst("ic", function="g", node_id="c", idle_since=9.0, reserved_bytes=16 * GIB),
    ]
    decision = decide(cluster(nodes, idle), fn())
    assert isinstance(decision, ColdStart)
    assert (decision.node_id, decision.evict) == ("c", ("ic",))


def test_free_room_is_used_before_evicting() -> None:
    nodes = [full("a", holdings={"dram": {SOURCE: 2 * GIB}}), node("b")]
    idle = [inst("ia", function="g", node_id="a", idle_since=1.0, reserved_bytes=16 * GIB)]
    assert decide(cluster(nodes, idle), fn()) == ColdStart("b", "remote", 2 * GIB / BW["remote"])


def test_eviction_node_is_chosen_by_locality() -> None:
    nodes = [full("a"), full("b", holdings={"disk": {SOURCE: 2 * GIB}})]
    idle = [
        inst("ia", function="g", node_id="a", idle_since=1.0, reserved_bytes=16 * GIB),
        inst("ib", function="g", node_id="b", idle_since=5.0, reserved_bytes=16 * GIB),
    ]
    decision = decide(cluster(nodes, idle), fn())
    assert decision == ColdStart("b", "disk", 2 * GIB / BW["disk"], evict=("ib",))


def test_eviction_ties_prefer_fewer_evictions() -> None:
    nodes = [full("a"), full("b")]
    idle = [
        inst("a1", function="g", node_id="a", idle_since=1.0, reserved_bytes=2 * GIB),
        inst("a2", function="g", node_id="a", idle_since=2.0, reserved_bytes=2 * GIB),
        inst("b1", function="g", node_id="b", idle_since=3.0, reserved_bytes=8 * GIB),
    ]
    decision = decide(cluster(nodes, idle), fn())
    assert isinstance(decision, ColdStart)
    assert (decision.node_id, decision.evict) == ("b", ("b1",))


# -- nowhere to go ----------------------------------------------------------------------------


def test_no_room_with_an_existing_instance_waits() -> None:
    view = cluster([full("n1")], [inst("a", in_flight=2)])
    decision = decide(view, fn())
    assert isinstance(decision, Wait)
    assert "busy" in decision.reason


def test_no_room_and_no_instance_refuses_naming_the_memory() -> None:
    nodes = [node("a", memory_reserved=14 * GIB), node("b", memory_reserved=15 * GIB)]
    decision = decide(cluster(nodes), fn())
    assert isinstance(decision, Refuse)
    assert "4.0 GiB" in decision.reason and "2.0 GiB" in decision.reason
    assert "node a" in decision.reason
    assert decision.retry_after_s == 5.0


def test_no_nodes_at_all_refuses() -> None:
    decision = decide(cluster([node(alive=False)]), fn())
    assert isinstance(decision, Refuse)
    assert "no node is available" in decision.reason


# -- the view's helpers -----------------------------------------------------------------------


def test_cluster_view_helpers() -> None:
    view = cluster([node("a"), node("b")], [inst("x"), inst("y", function="g", node_id="b")])
    assert [i.instance_id for i in view.instances_of("g")] == ["y"]
    assert [i.instance_id for i in view.instances_on("n1")] == ["x"]
    assert view.node("b").node_id == "b"
    assert view.find_node("zz") is None
    with pytest.raises(KeyError, match="zz"):
        view.node("zz")
