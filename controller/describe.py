"""The admin API's documents for functions and nodes (`GET /admin/functions/...`,
`GET /admin/nodes`): views of the registry and `ClusterState`, built on request, changing
nothing."""

from __future__ import annotations

import time
from typing import Any

from controller.cluster import NodeView
from controller.registry import FunctionRecord
from controller.state import ClusterState, NodeState
from node_agent.proto import node_agent_pb2 as pb


def describe_function(state: ClusterState, fn: FunctionRecord) -> dict[str, Any]:
    """`fn` as deployed, with its instances and the requests in flight or queued for it."""
    instances = state.of_function(fn.name)
    return {
        "name": fn.name,
        "model": fn.model.source,
        "spec": fn.spec.to_dict(),
        "checkpoint_bytes": fn.model.checkpoint_bytes,
        "memory_bytes": fn.memory_bytes,
        "context_length": fn.context_length,
        "created_at": fn.created_at,
        "updated_at": fn.updated_at,
        "instances": [i.to_json() for i in instances],
        "in_flight": sum(i.in_flight for i in instances),
        "queued": state.queued.get(fn.name, 0),
    }


def describe_nodes(state: ClusterState) -> list[dict[str, Any]]:
    """Every known node, by id: as the controller accounts for it and as it last reported."""
    views = {n.node_id: n for n in state.view().nodes}
    return [
        _node(state, node, views[node.node_id])
        for node in sorted(state.nodes.values(), key=lambda n: n.node_id)
    ]


def _node(state: ClusterState, node: NodeState, view: NodeView) -> dict[str, Any]:
    status = node.status
    return {
        "node_id": node.node_id,
        "address": node.address,
        "alive": node.alive,
        "draining": node.draining,
        "preemption": _preemption(node),
        "seconds_since_heartbeat": round(time.monotonic() - node.last_seen, 1)
        if node.alive
        else None,
        "memory_total_bytes": view.memory_total,
        "memory_reserved_bytes": view.memory_reserved,
        "slots_total": view.slots_total,
        "slots_used": view.slots_used,
        "idle_workers": status.idle_workers,
        "gpus": [_gpu(g) for g in status.devices.gpus],
        "tiers": [_tier(t) for t in status.tiers],
        "bandwidths": {b.tier: b.bytes_per_s for b in status.bandwidths},
        "instances": [i.to_json() for i in state.instances.values() if i.node_id == node.node_id],
        "reported_instances": [_reported(i) for i in status.instances],
    }


def _preemption(node: NodeState) -> dict[str, Any] | None:
    p = node.preemption
    if p is None:
        return None
    return {
        "source": p.source,
        "kind": p.kind,
        "deadline_in_s": round(p.deadline_unix - time.time(), 1) if p.deadline_unix > 0 else None,
        "detail": p.detail,
        "drained": p.drained,
    }


def _gpu(gpu: pb.GpuDevice) -> dict[str, Any]:
    return {
        "index": gpu.index,
        "name": gpu.name,
        "total_bytes": gpu.total_bytes,
        "free_bytes": gpu.free_bytes,
    }


def _tier(tier: pb.TierHoldings) -> dict[str, Any]:
    return {
        "tier": tier.tier,
        "budget_bytes": tier.budget_bytes,
        "holdings": [
            {
                "source": h.source,
                "sources": list(h.sources) or ([h.source] if h.source else []),
                "key": h.key,
                "bytes": h.bytes,
                "pinned": h.pinned,
            }
            for h in tier.holdings
        ],
        "arena": _arena(tier.arena) if tier.HasField("arena") else None,
    }


def _arena(arena: pb.Arena) -> dict[str, Any]:
    return {
        "path": arena.path,
        "size_bytes": arena.size_bytes,
        "free_bytes": arena.free_bytes,
        "largest_free_bytes": arena.largest_free_bytes,
        "startup_s": arena.startup_s,
    }


def _reported(info: pb.InstanceInfo) -> dict[str, Any]:
    """An instance as its node reported it (the controller's own record may differ)."""
    return {
        "instance_id": info.instance_id,
        "source": info.source,
        "state": pb.InstanceState.Name(info.state),
        "loaded_from": info.loaded_from or None,
        "running_requests": info.running_requests,
        "pid": info.pid,
        "reserved_bytes": info.reserved_bytes,
    }
