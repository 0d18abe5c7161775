"""The autoscaler loop: carries out `controller.autoscale`'s pure decisions (keep-alive stops,
min_instances starts, scale-in: migrate an instance's requests away, then stop it) every
`interval_s`, or sooner when the cluster changes. Scale-out under load is not here: placement
cold-starts an instance when every one is at target_concurrency."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable

from controller.autoscale import StartInstance, StopInstance, autoscale
from controller.lifecycle import InstanceLifecycle
from controller.policy import ColdStart, decide
from controller.registry import FunctionRecord
from controller.state import ClusterState, function_view

log = logging.getLogger(__name__)

COALESCE_S = 0.05
"""How long a tick waits after a change, so a burst of changes makes one tick."""


class ScalingLoop:
    def __init__(
        self,
        state: ClusterState,
        lifecycle: InstanceLifecycle,
        functions: Callable[[], list[FunctionRecord]],
        policy: str,
        rng: random.Random,
        interval_s: float,
        evacuate: Callable[[str], object] | None = None,
    ) -> None:
        self.state, self.lifecycle, self.functions = state, lifecycle, functions
        self.policy, self.rng, self.interval_s = policy, rng, interval_s
        self.evacuate = evacuate
        """Moves an instance's running requests elsewhere (by live migration), for scale-in."""

    async def run_forever(self) -> None:
        """Tick every `interval_s` (or sooner on change) until cancelled."""
        while True:
            try:
                self.once()
            except Exception:  # a bug here must not stop scaling for good
                log.exception("autoscaler tick failed")
            await self.state.changed(self.interval_s)
            await asyncio.sleep(COALESCE_S)

    def once(self) -> None:
        """Carry out the starts and stops due now."""
        functions = {f.name: f for f in self.functions()}
        views = [self.state.scaling_view(f) for f in functions.values()]
        for action in autoscale(self.state.view(), views):
            if isinstance(action, StopInstance):
                self.lifecycle.stop_instance(action.instance_id, reason=action.reason)
                if action.migrate and self.evacuate is not None:
                    self.evacuate(action.instance_id)
            elif isinstance(action, StartInstance) and action.function in functions:
                self._start_one(functions[action.function], action.reason)

    def _start_one(self, fn: FunctionRecord, reason: str) -> None:
        # A new instance, never a route to an existing one: with no capacity per instance the
        # policy can only answer with a cold start (or nothing fits).
        fv = dataclasses.replace(function_view(fn), target_concurrency=0)
        decision = decide(self.state.view(), fv, self.policy, self.rng)
        if isinstance(decision, ColdStart) and not decision.evict:
            log.info("starting an instance of %s on %s: %s", fn.name, decision.node_id, reason)
            self.lifecycle.start_instance(fn, decision.node_id, decision.tier, decision.estimate_s)
