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
