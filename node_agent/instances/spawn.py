"""How a worker process is started: its command line, its environment, and its ready line.

The environment carries what must be in place before the worker's first line of torch runs:
the intra-op thread count (OpenMP and MKL size their pools when torch loads), the one GPU it
may see (CUDA reads `CUDA_VISIBLE_DEVICES` once, at initialisation), and the per-worker token
its `Instance` service demands (in the environment, not argv: any local user can read another
process's command line, but only its owner can read its environment).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from node_agent.auth import SECRET_ENV

READY_LINE = "stoke-worker-ready"
"""What a worker prints on stdout once it listens, followed by ` torch-threads=N`."""
_THREADS_FIELD = " torch-threads="

TOKEN_ENV = "STOKE_WORKER_TOKEN"
"""The variable that hands a worker its token; the worker removes it from its environment."""
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
WORKER_MODULE = "node_agent.instances.worker"


def default_threads(slots: int) -> int:
    """Torch threads per instance when not configured: the cores shared evenly by `slots`
    instances (OpenMP threads that outnumber cores spin-wait against each other: ~10x slower)."""
    return max(1, (os.cpu_count() or 1) // max(1, slots))


@dataclass(frozen=True)
class WorkerSpec:
    """What kind of worker a pool starts: its thread share and its device."""

    threads: int = 1
    """Torch intra-op threads (and the OpenMP/MKL pools): this instance's share of the cores."""
    gpu: int | None = None
    """nvidia-smi index of the one GPU the worker sees (as `cuda:0`); None: a CPU worker."""
    program: tuple[str, ...] = (sys.executable, "-m", WORKER_MODULE)
    """The worker's program and leading arguments (tests substitute a stand-in)."""
    arena: Path | None = None
    """The node's DRAM arena: a CPU worker maps it (read-only) once as it starts, so loads from
    the DRAM tier bind tensors in memory it already has; a GPU worker page-locks it, so they
    copy straight from it to the device. None: no arena."""

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"worker threads {self.threads}: must be at least 1")

    @property
    def device(self) -> str:
        """The torch device the worker loads onto."""
        return "cpu" if self.gpu is None else "cuda"

    def argv(self, socket: Path) -> list[str]:
        """The worker's command line (nothing secret: others can read it)."""
        argv = [*self.program, "--socket", str(socket), "--threads", str(self.threads),
                "--device", self.device]  # fmt: skip
        if self.arena is not None:
            argv += ["--arena", str(self.arena)]
        return argv

    def env(self, token: str) -> dict[str, str]:
        """The worker's environment: ours, minus the node's shared secret (a model process has
        no use for it), plus its token, thread counts and GPU pinning."""
        env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
        env[TOKEN_ENV] = token
        env.update(dict.fromkeys(THREAD_ENV, str(self.threads)))
        # A CPU worker sees no GPU at all; a GPU worker sees exactly one, numbered as by
        # nvidia-smi (PCI bus order; CUDA's default order puts the fastest first).
        env["CUDA_VISIBLE_DEVICES"] = "" if self.gpu is None else str(self.gpu)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env


def ready_line(torch_threads: int) -> str:
    """The line a worker prints once listening, with the thread count torch reports."""
    return f"{READY_LINE}{_THREADS_FIELD}{torch_threads}"


def parse_ready_line(line: str) -> int | None:
    """The thread count a ready line reports; None if `line` is not a ready line."""
    head, _, threads = line.strip().partition(_THREADS_FIELD)
    if head != READY_LINE or not threads.isdigit():
        return None
    return int(threads)
