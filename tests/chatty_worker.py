"""A worker stand-in for tests: the real worker, except that every Health call first prints
1 MiB on stdout (as a chatty library might). A `WorkerPool` starts it like the real one:

    WorkerSpec(program=(sys.executable, "tests/chatty_worker.py"))
"""

from __future__ import annotations

import sys
from typing import Any

from node_agent.instances import worker
from node_agent.proto import node_agent_pb2 as pb

CHATTER_BYTES = 1 << 20  # 16 times a Linux pipe's buffer


class ChattyServicer(worker.InstanceServicer):
    """Prints `CHATTER_BYTES` on stdout, then answers Health as the real worker does."""

    async def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthReply:
        line = "x" * 1023 + "\n"
        for _ in range(CHATTER_BYTES // len(line)):
            sys.stdout.write(line)  # blocks once the pipe is full and nobody reads it
        sys.stdout.flush()
        return await super().Health(request, context)


if __name__ == "__main__":
    sys.exit(worker.main(servicer=ChattyServicer))
