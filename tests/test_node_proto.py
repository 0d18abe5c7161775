"""The committed protobuf stubs are exactly what `node_agent.proto.generate` produces, and the
converters round-trip the engine's dataclasses."""

from __future__ import annotations

from pathlib import Path

from node_agent.proto.generate import PROTO_DIR, generate


def test_committed_stubs_match_regenerated(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert {p.name for p in written} >= {"node_agent_pb2.py", "controller_pb2_grpc.py"}
    for fresh in written:
        committed = PROTO_DIR / fresh.name
        assert committed.exists(), (
            f"{fresh.name} not committed; run python -m {generate.__module__}"
        )
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed} is stale; run python -m {generate.__module__}"
        )


def test_request_round_trips_through_the_wire() -> None:
    from node_agent.convert import request_from_pb, request_to_pb
    from node_agent.engine.sampling import SamplingParams
    from node_agent.engine.sequence import Request

    request = Request(
        "r1",
        (1, 2, 3),
        SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=4, seed=11, stop=("x",)),
        output_ids=(9,),
    )
    wire = request_to_pb(request, "inst-1")
    assert wire.instance_id == "inst-1"
    back = request_from_pb(type(wire).FromString(wire.SerializeToString()))
    assert back.request_id == request.request_id
    assert back.prompt_ids == request.prompt_ids and back.output_ids == request.output_ids
    assert back.params.seed == 11 and back.params.stop == ("x",) and back.params.top_k == 4
    assert abs(back.params.top_p - 0.9) < 1e-6 and back.params.max_tokens == 7


def test_finish_reasons_round_trip() -> None:
    from node_agent.convert import event_from_pb, event_to_pb
    from node_agent.engine.sequence import FinishReason, TokenEvent

    for reason in [None, *FinishReason]:
        token = None if reason in (FinishReason.ABORT, FinishReason.ERROR) else 5
        event = TokenEvent(
            "r", token, "hi", reason, "boom" if reason is FinishReason.ERROR else None
        )
        assert event_from_pb(event_to_pb(event), "r") == event
