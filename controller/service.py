"""`Controller`: the composition that the HTTP API and the gRPC servicer share — the registry,
the cluster state, the router (placement and streams) with its instance lifecycle, draining,
the scaling loop and the metrics. Function admin (deploy, delete) lives here, so the HTTP layer
only translates.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re

from autoscaler.policy import load_policy
from controller.config import ControllerConfig
from controller.draining import Draining
from controller.elastic import Elastic
from controller.errors import AdminError, unknown_function
from controller.idle_times import IdleTimes
from controller.lifecycle import InstanceLifecycle
from controller.metrics import Metrics
from controller.migrations import Migrator
from controller.models import ModelInfo, ModelSourceError, inspect_model
from controller.nodes import NodeClients
from controller.preemption import Preemptions
from controller.registry import FunctionRecord, Registry
from controller.router import Router, RouterConfig
from controller.scaling import ScalingLoop
from controller.spec import FunctionSpec
from controller.state import ClusterState, InstanceState
from migration.live import MigrationConfig, Reason
from node_agent.facts.tiers import Origin

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class Controller:
    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.home = config.home.expanduser()
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.registry = Registry(config.db_path)
        self.state = ClusterState(IdleTimes(self.registry))
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
        self.migrator = Migrator(
            self.router,
            self._functions,
            self.metrics,
            MigrationConfig(
                max_delta_tokens=config.migration_max_delta,
                follow_delta_tokens=config.migration_follow_delta,
                max_rounds=config.migration_max_rounds,
                round_timeout_s=config.migration_round_timeout_s,
            ),
        )
        self.draining = Draining(self.state, self.clients, self.lifecycle, self.migrator)
        self.preemptions = Preemptions(
            self.state,
            self.lifecycle,
            self.migrator,
            self.metrics,
            self.router.tasks,
            margin_s=config.preemption_margin_s,
            max_concurrent=config.preemption_max_concurrent,
        )
        self.scaling = ScalingLoop(
            self.state,
            self.lifecycle,
            self.functions,
            config.policy,
            self.router.rng,
            config.autoscale_interval_s,
            evacuate=lambda instance_id: self.migrator.evacuate(instance_id, Reason.SCALE_IN),
        )
        self.elastic: Elastic | None = None
        if config.autoscale is not None:
            self.elastic = Elastic(
                load_policy(config.autoscale),
                self.state,
                self.registry,
                self.functions,
                self.draining,
                self.migrator,
                self.metrics,
                self.home,
                config.secret,
                config.autoscale_interval_s,
                cluster=config.cluster_name,
            )
            self.preemptions.capacity = self.elastic
            cap = self.elastic.policy.policy.budget.max_per_hour
            if cap is not None:
                self.metrics.budget_per_hour.set(cap)
        self.metrics.on_scrape(self._refresh_gauges)

    @property
    def lifecycle(self) -> InstanceLifecycle:
        return self.router.lifecycle

    # ---- functions -----------------------------------------------------------------------

    def function(self, name: str) -> FunctionRecord | None:
        return self._functions.get(name)

    def functions(self) -> list[FunctionRecord]:
        return sorted(self._functions.values(), key=lambda f: f.name)

    async def deploy(self, name: str, spec: FunctionSpec) -> tuple[FunctionRecord, bool]:
        """Create or replace function `name`; returns it and whether it is new."""
        _check_name(name)
        model = await self._inspect(spec)
        _check_fits(spec, model)
        old = self._functions.get(name)
        record = self.registry.put_function(name, spec, model)
        self._functions[name] = record
        if old is not None and _needs_restart(old, record):
            self._stop_instances(name, "function updated")
        self.state.notify()
        log.info("%s function %s (%s)", "updated" if old else "deployed", name, model.source)
        return record, old is None

    def delete(self, name: str) -> None:
        if name not in self._functions:
            raise AdminError(404, unknown_function(name), "function_not_found")
        self.registry.delete_function(name)
        self.state.idle_times.forget(name)
        del self._functions[name]
        self._stop_instances(name, "function deleted")
        self.state.notify()

    async def _inspect(self, spec: FunctionSpec) -> ModelInfo:
        """The model `spec` names, read (and for S3, its small files copied) off the loop."""
        try:
            return await asyncio.to_thread(inspect_model, spec.model, self.home / "models")
        except (ModelSourceError, OSError) as exc:
            raise AdminError(400, f"model: {exc}", "invalid_model") from None
        except Exception as exc:  # a checkpoint error reading the manifest, named by its type
            raise AdminError(400, f"model: {type(exc).__name__}: {exc}", "invalid_model") from None

    def _stop_instances(self, name: str, reason: str) -> None:
        for inst in self.state.of_function(name):
            self.lifecycle.stop_instance(inst.instance_id, reason=reason)

    # ---- metrics -------------------------------------------------------------------------

    def _record_cold_start(self, inst: InstanceState) -> None:
        tier = inst.source_tier or Origin.REMOTE  # where the node found it, by its own report
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


def _check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise AdminError(
            400,
            f"function name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
            "invalid_name",
        )


def _check_fits(spec: FunctionSpec, model: ModelInfo) -> None:
    """Refuse a spec that every load would fail on the node (after it took a worker)."""
    limit = spec.generation.max_tokens_limit
    context = spec.engine.max_model_len or model.context_length
    if limit is not None and limit >= context:
        raise AdminError(
            400,
            f"generation.max_tokens_limit {limit} leaves no room for a prompt in the model's "
            f"context of {context} tokens; set it below {context}.",
        )
    problem = model.kv_cache_problem(spec.engine.kv_cache_bytes, spec.engine.max_model_len)
    if problem is not None:
        raise AdminError(422, problem, "invalid_spec")


def _needs_restart(old: FunctionRecord, new: FunctionRecord) -> bool:
    """Whether running instances no longer match the function (model or engine changed)."""
    return (
        old.model.source != new.model.source
        or old.spec.engine != new.spec.engine
        or old.memory_bytes != new.memory_bytes
    )
