"""Model instances as processes: one process per instance, driven over a unix-domain socket.

`WorkerPool` keeps pre-started worker processes (torch and the engine imported, waiting for a
`Load`), so starting an instance does not pay the interpreter and torch import.
`InstanceManager` turns pooled workers into instances under the node's memory and slot budget
(`Budget`), relays generation, and notices instances that die.
"""

from node_agent.instances.budget import Budget, NoRoomError
from node_agent.instances.errors import (
    DrainingError,
    InstanceError,
    InstanceExistsError,
    InstanceGoneError,
    UnknownInstanceError,
    WorkerStartError,
)
from node_agent.instances.manager import Instance, InstanceManager
from node_agent.instances.pool import Worker, WorkerPool

__all__ = [
    "Budget",
    "DrainingError",
    "Instance",
    "InstanceError",
    "InstanceExistsError",
    "InstanceGoneError",
    "InstanceManager",
    "NoRoomError",
    "UnknownInstanceError",
    "Worker",
    "WorkerPool",
    "WorkerStartError",
]
