"""The controller's reconciliation of heartbeats with the instances it runs (in-process)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.models import ModelInfo
from controller.nodes import ControllerServicer
from controller.registry import FunctionRecord, Registry
from controller.spec import spec_from_dict
from controller.state import ClusterState
from node_agent.proto import controller_pb2 as cpb
from node_agent.proto import node_agent_pb2 as pb

SOURCE = "/models/m"


def _status(*instance_ids: str) -> pb.NodeStatus:
    return pb.NodeStatus(
        node_id="n1",
        devices=pb.Devices(cpu=pb.CpuBudget(memory_budget_bytes=8 << 30, slots_total=2)),
        instances=[
            pb.InstanceInfo(
                instance_id=i, source=SOURCE, state=pb.INSTANCE_STATE_READY, reserved_bytes=1 << 30
            )
            for i in instance_ids
        ],
    )


def test_a_stale_heartbeat_neither_resurrects_nor_charges_an_unloaded_instance(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        state = ClusterState()
        fn = FunctionRecord(
            "f", spec_from_dict({"model": SOURCE}), ModelInfo(SOURCE, tmp_path, 1, "float32", 64),
            0.0, 0.0,
        )  # fmt: skip
        servicer = ControllerServicer(state, Registry(tmp_path / "db"), lambda: [fn], 1.0)
        await servicer.Register(cpb.RegisterRequest(node_id="n1", address="a:1"), None)
        beat = cpb.HeartbeatRequest(node_id="n1", status=_status("f-old"))
        await servicer.Heartbeat(beat, None)
        assert "f-old" in state.instances, "an unknown instance of a function is adopted"

        state.drop_instance("f-old")  # what the router does once the node confirmed the unload
        state.unloaded["f-old"] = "n1"
        await servicer.Heartbeat(beat, None)  # taken before the unload, delivered after
        assert "f-old" not in state.instances
        node = state.view().nodes[0]
        assert (node.slots_used, node.memory_reserved) == (0, 0)

        await servicer.Heartbeat(cpb.HeartbeatRequest(node_id="n1", status=_status()), None)
        assert state.unloaded == {}, "forgotten once the node's reports catch up"

    asyncio.run(scenario())


def test_the_warm_fast_path_routes_as_the_whole_cluster_view_would(tmp_path: Path) -> None:
    """`Router.try_route` decides on `routing_view` (the function's instances and their nodes
    only): the least busy ready instance on a schedulable node, never one on a draining node,
    and nothing (so `acquire` decides on the whole view) when none has room."""
    from controller.cluster import InstanceStatus
    from controller.nodes import NodeClients
    from controller.policy import decide
    from controller.router import Router
    from controller.state import NodeState, function_view

    async def scenario() -> None:
        state = ClusterState()
        spec = spec_from_dict({"model": SOURCE, "autoscaling": {"target_concurrency": 2}})
        fn = FunctionRecord("f", spec, ModelInfo(SOURCE, tmp_path, 1, "float32", 64), 0.0, 0.0)
        for node_id in ("n1", "n2", "n3"):
            state.nodes[node_id] = NodeState(node_id, f"{node_id}:1", _status(), 0.0)
        state.nodes["n3"].drain_requested = True
        for iid, node_id, busy in (("f-a", "n1", 1), ("f-b", "n2", 0), ("f-c", "n3", 0)):
            inst = state.new_instance(fn, node_id, "dram", 0.0)
            state.instances[iid] = state.instances.pop(inst.instance_id)
            inst.instance_id, inst.state, inst.in_flight = iid, InstanceStatus.READY, busy
            inst.ready.set_result(None)
        other = FunctionRecord("g", spec, fn.model, 0.0, 0.0)
        state.new_instance(other, "n1", "dram", 0.0)

        view = state.routing_view("f")
        assert {i.instance_id for i in view.instances} == {"f-a", "f-b", "f-c"}
        assert {n.node_id for n in view.nodes} == {"n1", "n2", "n3"}
        assert decide(view, function_view(fn)) == decide(state.view(), function_view(fn))

        router = Router(state, NodeClients("secret"))
        taken = [router.try_route(fn) for _ in range(4)]
        got = [p.instance.instance_id if p else None for p in taken]
        assert got == ["f-b", "f-a", "f-b", None], "least busy first, never the draining node"

    asyncio.run(scenario())
