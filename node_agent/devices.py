"""What accelerators a node has, for Status and heartbeats: CUDA GPUs via `nvidia-smi`.

The agent does not import torch (instances do), so it asks `nvidia-smi`. A node without it is a
CPU node and reports an empty GPU list. Probing takes tens of milliseconds, so `GpuProbe` keeps
the latest answer and refreshes it off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess

from node_agent.proto import node_agent_pb2 as pb

log = logging.getLogger(__name__)

QUERY = "--query-gpu=index,name,memory.total,memory.free"
MIB = 1 << 20


class DeviceProbeError(RuntimeError):
    """`nvidia-smi` printed something this parser does not understand."""


def parse_nvidia_smi(text: str) -> list[pb.GpuDevice]:
    """Parse `nvidia-smi QUERY --format=csv,noheader,nounits` output (memory in MiB)."""
    gpus = []
    for line in text.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            raise DeviceProbeError(f"nvidia-smi line {line!r}: expected 4 comma-separated fields")
        index, name, total, free = fields
        try:
            gpus.append(
                pb.GpuDevice(
                    index=int(index),
                    name=name,
                    total_bytes=int(total) * MIB,
                    free_bytes=int(free) * MIB,
                )
            )
        except ValueError:
            raise DeviceProbeError(f"nvidia-smi line {line!r}: non-numeric field") from None
    return gpus


def probe_gpus(timeout_s: float = 10.0) -> list[pb.GpuDevice]:
    """The node's CUDA GPUs now; [] without `nvidia-smi` or if it fails (logged)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    cmd = [exe, QUERY, "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=True)
        return parse_nvidia_smi(out.stdout)
    except (OSError, subprocess.SubprocessError, DeviceProbeError) as exc:
        log.warning("cannot list GPUs with nvidia-smi: %s", exc)
        return []


class GpuProbe:
    """The latest GPU list (`latest`), refreshed by `refresh_forever` in a thread."""

    def __init__(self) -> None:
        self.latest: list[pb.GpuDevice] = []

    async def refresh(self) -> list[pb.GpuDevice]:
        """Probe once (in a thread) and remember the answer."""
        self.latest = await asyncio.to_thread(probe_gpus)
        return self.latest

    async def refresh_forever(self, interval_s: float) -> None:
        """Refresh every `interval_s` seconds until cancelled; stops early on a GPU-less node."""
        while True:
            if not await self.refresh() and shutil.which("nvidia-smi") is None:
                return
            await asyncio.sleep(interval_s)
