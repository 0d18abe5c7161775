"""`Controller`: the composition of registry, cluster state, router and autoscaler that the HTTP
API and the gRPC servicer share. Admin operations (deploy, delete, drain) live here so the HTTP
layer only translates."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import re
import time
from typing import Any

from controller.autoscale import StartInstance, StopInstance, autoscale
from controller.config import ControllerConfig
from controller.metrics import Metrics
from controller.models import ModelInfo, inspect_model
from controller.nodes import NodeClients
from controller.policy import ColdStart, decide
from controller.registry import FunctionRecord, Registry
from controller.router import Router, RouterConfig
from controller.spec import FunctionSpec
from controller.state import ClusterState, InstanceState, NodeState, function_view
from node_agent.proto import node_agent_pb2 as pb

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class AdminError(Exception):
    """An admin request that cannot be done as asked: HTTP `status` and a message."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Controller:
    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.home = config.home.expanduser()
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.registry = Registry(config.db_path)
        self.state = ClusterState()
        self.clients = NodeClients(config.secret)
        self.metrics = Metrics()
        self.router = Router(
            self.state,
            self.clients,
            RouterConfig(
                policy=config.policy,
                queue_limit=config.queue_limit,
                queue_timeout_s=config.queue_timeout_s,
                load_timeout_s=config.load_timeout_s,
            ),
            rng=random.Random(),
            on_cold_start=self._record_cold_start,
        )
        self._functions: dict[str, FunctionRecord] = {f.name: f for f in self.registry.functions()}
        self.metrics.on_scrape(self._refresh_gauges)

    # ---- functions -----------------------------------------------------------------------

    def function(self, name: str) -> FunctionRecord | None:
        return self._functions.get(name)

    def functions(self) -> list[FunctionRecord]:
        return sorted(self._functions.values(), key=lambda f: f.name)

    async def deploy(self, name: str, spec: FunctionSpec) -> tuple[FunctionRecord, bool]:
        """Create or replace function `name`; returns it and whether it is new."""
        if not NAME_RE.fullmatch(name):
            raise AdminError(
                400,
                f"function name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
                "starting with a letter or digit.",
                "invalid_name",
            )
        from controller.models import ModelSourceError

        try:
            model: ModelInfo = await asyncio.to_thread(
                inspect_model, spec.model, self.home / "models"
            )
        except (ModelSourceError, OSError) as exc:
            raise AdminError(400, f"model: {exc}", "invalid_model") from None
        except Exception as exc:  # a checkpoint error reading the manifest, named by its type
            raise AdminError(400, f"model: {type(exc).__name__}: {exc}", "invalid_model") from None
        limit = spec.generation.max_tokens_limit
        context = spec.engine.max_model_len or model.context_length
        if limit is not None and limit >= context:
            raise AdminError(
                400,
                f"generation.max_tokens_limit {limit} leaves no room for a prompt in the model's "
                f"context of {context} tokens; set it below {context}.",
            )
        problem = model.kv_cache_problem(spec.engine.kv_cache_bytes, spec.engine.max_model_len)
        if problem is not None:  # else every load would fail on the node, after a worker
            raise AdminError(422, problem, "invalid_spec")
        old = self._functions.get(name)
        record = self.registry.put_function(name, spec, model)
        self._functions[name] = record
        if old is not None and _needs_restart(old, record):
            for inst in self.state.of_function(name):
                self.router.stop_instance(inst.instance_id, reason="function updated")
        self.state.notify()
        log.info("%s function %s (%s)", "updated" if old else "deployed", name, model.source)
        return record, old is None

    def delete(self, name: str) -> None:
        if name not in self._functions:
            raise AdminError(404, unknown_function(name), "function_not_found")
        self.registry.delete_function(name)
        del self._functions[name]
        for inst in self.state.of_function(name):
            self.router.stop_instance(inst.instance_id, reason="function deleted")
        self.state.notify()

    def describe(self, fn: FunctionRecord) -> dict[str, Any]:
        instances = self.state.of_function(fn.name)
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
            "queued": self.state.queued.get(fn.name, 0),
        }

    # ---- nodes ---------------------------------------------------------------------------

    def describe_nodes(self) -> list[dict[str, Any]]:
        view = {n.node_id: n for n in self.state.view().nodes}
        out = []
        for node in sorted(self.state.nodes.values(), key=lambda n: n.node_id):
            status, nv = node.status, view[node.node_id]
            out.append(
                {
                    "node_id": node.node_id,
                    "address": node.address,
                    "alive": node.alive,
                    "draining": node.draining,
                    "seconds_since_heartbeat": round(time.monotonic() - node.last_seen, 1)
                    if node.alive
                    else None,
                    "memory_total_bytes": nv.memory_total,
                    "memory_reserved_bytes": nv.memory_reserved,
                    "slots_total": nv.slots_total,
                    "slots_used": nv.slots_used,
                    "idle_workers": status.idle_workers,
                    "gpus": [
                        {
                            "index": g.index,
                            "name": g.name,
                            "total_bytes": g.total_bytes,
                            "free_bytes": g.free_bytes,
                        }
                        for g in status.devices.gpus
                    ],
                    "tiers": [
                        {
                            "tier": t.tier,
                            "budget_bytes": t.budget_bytes,
                            "holdings": [
                                {
                                    "source": h.source,
                                    "sources": list(h.sources) or ([h.source] if h.source else []),
                                    "key": h.key,
                                    "bytes": h.bytes,
                                    "pinned": h.pinned,
                                }
                                for h in t.holdings
                            ],
                        }
                        for t in status.tiers
                    ],
                    "bandwidths": {b.tier: b.bytes_per_s for b in status.bandwidths},
                    "instances": [
                        i.to_json()
                        for i in self.state.instances.values()
                        if i.node_id == node.node_id
                    ],
                    "reported_instances": [
                        {
                            "instance_id": i.instance_id,
                            "source": i.source,
                            "state": pb.InstanceState.Name(i.state),
                            "loaded_from": i.loaded_from or None,
                            "running_requests": i.running_requests,
                            "pid": i.pid,
                            "reserved_bytes": i.reserved_bytes,
                        }
                        for i in status.instances
                    ],
                }
            )
        return out

    def _node(self, node_id: str) -> NodeState:
        node = self.state.nodes.get(node_id)
        if node is None:
            raise AdminError(404, f"no node {node_id!r}; list nodes with GET /admin/nodes.")
        return node

    async def drain(self, node_id: str) -> dict[str, Any]:
        node = self._node(node_id)
        node.drain_requested = True
        in_flight = 0
        if node.alive:
            reply = await self.clients.stub(node.address).Drain(pb.DrainRequest(), timeout=10)
            in_flight = reply.in_flight
        for inst in [i for i in self.state.instances.values() if i.node_id == node_id]:
            self.router.stop_instance(inst.instance_id, reason="node draining")
        self.state.notify()
        return {"node_id": node_id, "draining": True, "in_flight": in_flight}

    async def undrain(self, node_id: str) -> dict[str, Any]:
        """Undo `drain`: the node takes new instances and requests again (its instances
        stopped by the drain stay stopped; new ones start as traffic asks)."""
        node = self._node(node_id)
        if not node.alive:
            raise AdminError(
                409, f"node {node_id!r} is not heartbeating; start its agent, then undrain it."
            )
        await self.clients.stub(node.address).Undrain(pb.UndrainRequest(), timeout=10)
        node.drain_requested = False
        node.status.draining = False  # until its next heartbeat says so itself
        self.state.notify()
        return {"node_id": node_id, "draining": False}

    # ---- autoscaler ----------------------------------------------------------------------

    async def autoscale_forever(self) -> None:
        """Keep-alive and min_instances, every `autoscale_interval_s` (or sooner on change)."""
        while True:
            try:
                self.autoscale_once()
            except Exception:  # a bug here must not stop scaling for good
                log.exception("autoscaler tick failed")
            await self.state.changed(self.config.autoscale_interval_s)
            await asyncio.sleep(0.05)  # coalesce bursts of changes

    def autoscale_once(self) -> None:
        views = [function_view(f, self.state.queued.get(f.name, 0)) for f in self.functions()]
        actions = autoscale(self.state.view(), views)
        for action in actions:
            if isinstance(action, StopInstance):
                self.router.stop_instance(action.instance_id, reason=action.reason)
            elif isinstance(action, StartInstance):
                self._start_one(action.function, action.reason)

    def _start_one(self, name: str, reason: str) -> None:
        fn = self._functions.get(name)
        if fn is None:
            return
        # A new instance, never a route to an existing one: with no capacity per instance the
        # policy can only answer with a cold start (or nothing fits).
        fv = dataclasses.replace(function_view(fn), target_concurrency=0)
        decision = decide(self.state.view(), fv, self.config.policy, self.router.rng)
        if isinstance(decision, ColdStart) and not decision.evict:
            log.info("starting an instance of %s on %s: %s", name, decision.node_id, reason)
            self.router.start_instance(fn, decision.node_id, decision.tier, decision.estimate_s)

    # ---- metrics -------------------------------------------------------------------------

    def _record_cold_start(self, inst: InstanceState) -> None:
        tier = inst.source_tier or "remote"  # where the node found it, by its own report
        self.metrics.cold_starts.labels(inst.function, tier).inc()
        self.metrics.load.labels(inst.function, tier).observe(inst.load_ms / 1000)

    def _refresh_gauges(self) -> None:
        self.metrics.queue.clear()
        for name in self._functions:
            self.metrics.queue.labels(name).set(self.state.queued.get(name, 0))
        self.metrics.instances.clear()
        for inst in self.state.instances.values():
            self.metrics.instances.labels(inst.function, inst.state).inc()
        alive = sum(n.alive for n in self.state.nodes.values())
        self.metrics.nodes.labels("true").set(alive)
        self.metrics.nodes.labels("false").set(len(self.state.nodes) - alive)

    async def close(self) -> None:
        await self.router.close()
        await self.clients.close()
        self.registry.close()


def _needs_restart(old: FunctionRecord, new: FunctionRecord) -> bool:
    """Whether running instances no longer match the function (model or engine changed)."""
    return (
        old.model.source != new.model.source
        or old.spec.engine != new.spec.engine
        or old.memory_bytes != new.memory_bytes
    )


def unknown_function(name: str) -> str:
    return (
        f"The function '{name}' does not exist. Deploy it with `stoke deploy {name} --model ...`, "
        "or list functions with `stoke list` (GET /v1/models)."
    )
