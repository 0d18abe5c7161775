"""What a node provider does for the autoscaler: launch a node of a pool, list the nodes it
launched (to reconcile after a controller restart), terminate one. Providers are registered by
name (`autoscaler.providers.PROVIDERS`); the policy file's `provider:` picks one per pool.

The controller chooses each node's id before the launch and the provider hands it to the new
machine (`stoke node --node-id`), so the node registers under the name the autoscaler expects.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from autoscaler.policy import Pool


class LaunchError(Exception):
    """A launch failed. `capacity`: the provider has no capacity of this kind now (spot short,
    insufficient capacity): the pool falls back as the policy says. Otherwise (quota, a bad AMI,
    a crash) it is retried with backoff, and the pool is given up for a while after a few."""

    def __init__(self, message: str, *, capacity: bool = False) -> None:
        super().__init__(message)
        self.capacity = capacity


class NodeStatus(enum.StrEnum):
    PENDING = "pending"
    """Launched; the machine is coming up (it has not necessarily registered)."""
    RUNNING = "running"
    GONE = "gone"
    """Terminated, stopped, or never came up."""


@dataclass(frozen=True, slots=True)
class LaunchRequest:
    """One node to launch: its id, pool and zone, and how it reaches this controller."""

    node_id: str
    pool: Pool
    zone: str
    controller_address: str
    """host:port of the controller's gRPC server, as the new node can reach it."""
    secret: str = field(repr=False)
    """The shared gRPC secret the node must present."""


@dataclass(frozen=True, slots=True)
class ProviderNode:
    """A node as its provider sees it."""

    node_id: str
    pool: str
    zone: str
    provider_id: str
    """The provider's own handle: an EC2 instance id, a local process id."""
    status: NodeStatus
    launched_unix: float


class Provider(Protocol):
    """A place nodes come from. Methods may block on the network: the controller runs them off
    its event loop (`asyncio.to_thread`)."""

    name: str

    def launch(self, request: LaunchRequest) -> ProviderNode:
        """Start one node; returns once the provider accepted it (it registers later).
        Raises LaunchError."""
        ...

    def list_nodes(self) -> list[ProviderNode]:
        """Every node this provider launched for this cluster that is not terminated (a
        stopped one is listed GONE: it still costs its disks until terminated)."""
        ...

    def terminate(self, node: ProviderNode) -> None:
        """Stop `node` for good (idempotent: a gone node is fine)."""
        ...

    def close(self) -> None:
        """Release what the provider holds (local: stop the processes it started)."""
        ...
