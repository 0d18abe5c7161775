"""Model instances as processes: one process per instance, driven over a unix-domain socket.

`WorkerPool` keeps pre-started worker processes (torch and the engine imported, waiting for a
`Load`), so starting an instance does not pay the interpreter and torch import; `WorkerSpec`
says how they start (threads, GPU, token). `InstanceManager` turns pooled workers into
instances under the node's memory and slot budget (`Budget`, and `GpuLedger` on a GPU node),
relays generation, and notices instances that die.
"""

from node_agent.instances.budget import Budget, NoRoomError
from node_agent.instances.errors import (
    DrainingError,
    InstanceError,
    InstanceExistsError,
    InstanceGoneError,
    LoadRejectedError,
    UnknownInstanceError,
    WorkerStartError,
)
from node_agent.instances.gpus import GpuLedger
from node_agent.instances.manager import Instance, InstanceManager
from node_agent.instances.placement import Reservation
from node_agent.instances.pool import Worker, WorkerPool
from node_agent.instances.spawn import WorkerSpec, default_threads

__all__ = [
    "Budget",
    "DrainingError",
    "GpuLedger",
    "Instance",
    "InstanceError",
    "InstanceExistsError",
    "InstanceGoneError",
    "InstanceManager",
    "LoadRejectedError",
    "NoRoomError",
    "Reservation",
    "UnknownInstanceError",
    "Worker",
    "WorkerPool",
    "WorkerSpec",
    "WorkerStartError",
    "default_threads",
]
