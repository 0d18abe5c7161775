"""Replacement capacity for a preempted node: the local provider.

`controller.preemption.Preemptions` asks a `CapacityProvider` to replace each node that gets a
notice. `LocalProvider` (config `replacement: local`) starts a new `stoke node` process on this
machine, registering with this controller under `<node>-r<N>`, with `replacement_node_args`
(sizes, slots, threads) and a home of its own under the controller's. It is the local cluster's
provider and the one the tests use; on a cloud the autoscaler's providers (EC2 spot and
on-demand) take its place behind the same seam. At most `replacement_max_nodes` are started;
they stop with the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


class LocalProvider:
    def __init__(
        self,
        controller_address: str,
        secret: str,
        home: Path,
        node_args: Sequence[str],
        max_nodes: int,
    ) -> None:
        self.controller_address, self.secret = controller_address, secret
        self.home, self.node_args, self.max_nodes = home, list(node_args), max_nodes
        self.started: dict[str, asyncio.subprocess.Process] = {}
        self.dram_dirs: list[Path] = []

    async def replace(self, node_id: str, why: str) -> None:
        """Start a node in place of `node_id`; returns once it listens (or logs why not)."""
        if len(self.started) >= self.max_nodes:
            log.warning(
                "no replacement for %s (%s): %d replacement nodes started already (the "
                "most replacement_max_nodes allows)",
                node_id,
                why,
                len(self.started),
            )
            return
        base = re.sub(r"-r\d+$", "", node_id)
        new_id = f"{base}-r{len(self.started) + 1}"
        dram = Path(f"/dev/shm/stoke-{os.getuid()}-{os.getpid()}-{new_id}")
        self.dram_dirs.append(dram)
        argv = [
            sys.executable, "-m", "stoke.cli", "node",
            "--controller", self.controller_address, "--listen", "127.0.0.1:0",
            "--home", str(self.home / new_id), "--node-id", new_id,
            "--dram-dir", str(dram),
            *self.node_args,
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env={**os.environ, "STOKE_SECRET": self.secret},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL,
        )
        self.started[new_id] = proc
        try:
            address = await asyncio.wait_for(_listening(proc), START_TIMEOUT_S)
        except (TimeoutError, EOFError) as exc:
            log.warning("replacement node %s for %s did not start: %r", new_id, node_id, exc)
            await _stop(proc)
            return
        log.info(
            "replacing %s (%s): started node %s at %s (pid %d)",
            node_id,
            why,
            new_id,
            address,
            proc.pid,
        )
        asyncio.get_running_loop().create_task(_drain(proc))

    async def close(self) -> None:
        """Stop every node this provider started, and remove their DRAM tiers (each arena
        holds its size in memory until removed)."""
        await asyncio.gather(*(_stop(p) for p in self.started.values()))
        for dram in self.dram_dirs:
            shutil.rmtree(dram, ignore_errors=True)


async def _listening(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    while line := (await proc.stdout.readline()).decode():
        if line.startswith("listening on"):
            return line.removeprefix("listening on").strip()
    raise EOFError(f"exited with status {await proc.wait()} before listening")


async def _drain(proc: asyncio.subprocess.Process) -> None:
    """Read (and drop) the node's stdout, so that it never blocks on a full pipe."""
    assert proc.stdout is not None
    while await proc.stdout.readline():
        pass


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
