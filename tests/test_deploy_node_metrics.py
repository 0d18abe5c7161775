"""A node agent's /metrics endpoint (node_agent/metrics.py) on its own: what it answers, and
how `stoke node --metrics-listen` refuses a bad address. The scrape of a running node is in
tests/test_deploy_prometheus.py."""

from __future__ import annotations

import asyncio

import pytest
from deploy_fixtures import parse_stoke

from node_agent.metrics import NodeMetrics, start_http
from node_agent.proto import node_agent_pb2 as pb
from stoke.commands.node import build_config
from stoke.errors import StokeError


async def _ask(address: str, request: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


def _status() -> pb.NodeStatus:
    return pb.NodeStatus(
        node_id="n",
        tiers=[
            pb.TierHoldings(
                tier="dram",
                budget_bytes=100,
                holdings=[pb.Holding(bytes=40)],
                arena=pb.Arena(size_bytes=4096, free_bytes=1024),
            ),
            pb.TierHoldings(tier="disk", budget_bytes=1000),
        ],
        instances=[pb.InstanceInfo(state=pb.INSTANCE_STATE_READY, running_requests=3)],
        draining=True,
        preemption=pb.Preemption(source="sigterm", kind="terminate", deadline_unix=1e9),
    )


def test_it_serves_metrics_and_nothing_else() -> None:
    async def main() -> tuple[bytes, bytes, bytes, bytes]:
        metrics = NodeMetrics()
        metrics.watch(_status)
        server, address = await start_http(metrics, "127.0.0.1:0")
        async with server:
            return (
                await _ask(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
                await _ask(address, b"HEAD /metrics HTTP/1.1\r\n\r\n"),
                await _ask(address, b"GET /admin HTTP/1.1\r\n\r\n"),
                await _ask(address, b"POST /metrics HTTP/1.1\r\n\r\n"),
            )

    ok, head, other, post = asyncio.run(main())
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
    body = ok.split(b"\r\n\r\n", 1)[1].decode()
    for line in (
        'stoke_node_tier_bytes{tier="dram"} 40.0',
        'stoke_node_tier_budget_bytes{tier="dram"} 100.0',
        'stoke_node_arena_bytes{tier="dram"} 4096.0',
        'stoke_node_arena_free_bytes{tier="dram"} 1024.0',
        'stoke_node_instances{state="ready"} 1.0',
        "stoke_node_running_requests 3.0",
        "stoke_node_draining 1.0",
        'stoke_node_preemption_notice{kind="terminate",source="sigterm"} 1.0',
        "stoke_node_preemption_deadline_timestamp_seconds 1e+09",
    ):
        assert line in body.splitlines(), line
    assert 'stoke_node_arena_bytes{tier="disk"}' not in body  # a tier without an arena
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert other.startswith(b"HTTP/1.1 404 ")
    assert post.startswith(b"HTTP/1.1 405 ")


def test_a_load_is_counted_by_tier_and_timed_by_phase() -> None:
    metrics = NodeMetrics()
    timings = pb.LoadTimings(queue_s=0.01, fetch_s=0.3, read_build_s=1.5, total_s=1.9)
    metrics.observe_load(pb.LoadInstanceReply(loaded_from="disk", weight_bytes=7, timings=timings))
    text = metrics.render().decode()
    assert 'stoke_node_loads_total{tier="disk"} 1.0' in text
    assert 'stoke_node_loaded_bytes_total{tier="disk"} 7.0' in text
    assert 'stoke_node_load_phase_seconds_bucket{le="2.0",phase="total",tier="disk"} 1.0' in text
    assert 'stoke_node_load_phase_seconds_bucket{le="1.0",phase="total",tier="disk"} 0.0' in text
    assert 'phase="streamed"' not in text  # not a streamed load


@pytest.mark.parametrize("address", ["9400", "host:", "host:http", "host:70000"])
def test_a_bad_metrics_address_is_refused_naming_the_flag(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STOKE_SECRET", "a-secret-for-the-test")
    with pytest.raises(StokeError, match="--metrics-listen"):
        build_config(parse_stoke(["node", "--metrics-listen", address]))


def test_a_taken_metrics_port_fails_to_bind() -> None:
    async def main() -> None:
        metrics = NodeMetrics()
        server, address = await start_http(metrics, "127.0.0.1:0")
        async with server:
            await start_http(metrics, address)

    with pytest.raises(OSError):
        asyncio.run(main())
