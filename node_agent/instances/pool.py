"""`WorkerPool`: pre-started instance processes, refilled in the background.

A worker is ready once it prints its ready line (after importing torch and the engine and
starting to listen on its unix socket) and the pool's channel to it connects. `acquire` hands
out a ready worker (waiting for one being started if none is idle) and starts a replacement,
so the pool stays at `size` idle workers (or leaves that to its caller, who calls `refill` when
a replacement's start-up no longer competes with the worker's cold start). Every worker of a
pool is started from the same `WorkerSpec` (threads, device) with its own random token, which
its service demands on every call: the socket's private directory is one lock, the token a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

from node_agent.auth import open_channel
from node_agent.instances.errors import WorkerStartError
from node_agent.instances.spawn import WorkerSpec, parse_ready_line
from node_agent.proto import node_agent_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# The worker is listening before the pool connects, so reconnect backoff never delays a start.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass
class Worker:
    """One worker process and the channel to its `Instance` service."""

    proc: asyncio.subprocess.Process
    socket: Path
    channel: grpc.aio.Channel
    stub: pb_grpc.InstanceStub
    drain: asyncio.Task[None] | None = None  # reads stdout after the ready line (see _drain)
    torch_threads: int | None = None  # as torch in the worker reported it in its ready line

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def stop(self, grace: float = 5.0) -> int:
        """Terminate the process (SIGTERM, then SIGKILL after `grace` s); returns its status.

        The process is signalled even if closing the channel fails or is interrupted."""
        try:
            await self.channel.close()
        finally:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.terminate()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
        code = await self.proc.wait()
        self.socket.unlink(missing_ok=True)
        return code


class WorkerPool:
    """Keeps `size` idle pre-started workers. Call `start`, then `acquire`; `close` at the end."""

    def __init__(
        self, size: int, spec: WorkerSpec | None = None, start_timeout: float = 120.0
    ) -> None:
        self.size = size
        self.spec = spec or WorkerSpec()
        self.start_timeout = start_timeout
        self._dir: Path | None = None  # made on first start: /tmp keeps socket paths < 108 bytes
        self._idle: asyncio.Queue[Worker] = asyncio.Queue()
        self._starting: set[asyncio.Task[None]] = set()
        self._waiters = 0  # callers blocked in acquire()
        self._closed = False

    @property
    def idle(self) -> int:
        """Ready workers waiting for a `Load`."""
        return self._idle.qsize()

    @property
    def starting(self) -> int:
        """Workers being started (not ready yet)."""
        return len(self._starting)

    def start(self) -> None:
        """Begin starting workers up to `size` (returns at once)."""
        self.refill()

    async def acquire(self, *, refill: bool = True) -> Worker:
        """A ready worker, now owned by the caller (who must `stop` it). Raises
        `WorkerStartError` if a worker cannot be started within `start_timeout`. With
        `refill=False` its replacement waits for the caller's `refill()`."""
        while True:
            self._waiters += 1
            try:
                # Enough workers on the way for every caller waiting, whatever `size` is.
                for _ in range(self._waiters - self._idle.qsize() - len(self._starting)):
                    self._spawn()
                worker = await asyncio.wait_for(self._idle.get(), self.start_timeout)
            except TimeoutError:
                raise WorkerStartError(
                    f"no worker process became ready within {self.start_timeout:.0f} s; check "
                    "the agent's log for the worker's error"
                ) from None
            finally:
                self._waiters -= 1
            if refill:
                self.refill()
            if worker.alive:
                return worker
            await worker.stop()

    async def close(self) -> None:
        """Stop starting workers and terminate the idle ones."""
        self._closed = True
        for task in list(self._starting):
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        while not self._idle.empty():
            await self._idle.get_nowait().stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def refill(self) -> None:
        """Start as many workers as the pool is short of `size` (idle plus starting)."""
        for _ in range(self.size - self._idle.qsize() - len(self._starting)):
            self._spawn()

    def _spawn(self) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._start_one())
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start_one(self) -> None:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="stoke-w-"))
        socket = self._dir / f"{uuid.uuid4().hex[:12]}.sock"
        token = secrets.token_urlsafe(32)
        proc = await asyncio.create_subprocess_exec(
            *self.spec.argv(socket),
            env=self.spec.env(token),
            stdin=asyncio.subprocess.PIPE,  # EOF when the agent exits, however it exits
            stdout=asyncio.subprocess.PIPE,  # the ready line, then drained (see _drain)
            start_new_session=True,  # a terminal's Ctrl-C reaches the agent, which stops us
        )
        channel = open_channel(f"unix:{socket}", secret=token, options=_CHANNEL_OPTIONS)
        worker = Worker(proc, socket, channel, pb_grpc.InstanceStub(channel))
        try:
            worker.torch_threads = await asyncio.wait_for(_ready_line(proc), self.start_timeout)
            ready = worker.torch_threads is not None
            if ready:
                await asyncio.wait_for(channel.channel_ready(), self.start_timeout)
        except asyncio.CancelledError:  # the pool is closing
            await asyncio.shield(worker.stop(grace=1.0))
            raise
        except TimeoutError:
            ready = False
        except Exception:  # e.g. an overlong stdout line: never leave the process orphaned
            log.exception("worker pid %d failed while starting", proc.pid)
            ready = False
        if not ready or not worker.alive:
            code = await worker.stop(grace=1.0)
            if not self._closed:
                log.error("worker pid %d did not become ready (exit status %s)", proc.pid, code)
            return
        log.info("worker pid %d ready (torch threads %s)", proc.pid, worker.torch_threads)
        if worker.torch_threads != self.spec.threads:
            log.warning(
                "worker pid %d runs %s torch threads, not the %d configured",
                proc.pid,
                worker.torch_threads,
                self.spec.threads,
            )
        worker.drain = asyncio.get_running_loop().create_task(_drain(proc))
        self._idle.put_nowait(worker)


async def _ready_line(proc: asyncio.subprocess.Process) -> int | None:
    """Wait for the worker's ready line and return the torch thread count it reports; None if
    its stdout closed first (it exited)."""
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        threads = parse_ready_line(line.decode(errors="replace"))
        if threads is not None:
            return threads
    return None


async def _drain(proc: asyncio.subprocess.Process) -> None:
    """Log whatever a ready worker still prints on stdout: a pipe nobody reads fills up (about
    64 KiB) and then blocks the worker's next print."""
    assert proc.stdout is not None
    while chunk := await proc.stdout.read(1 << 16):
        log.info("worker pid %d stdout: %s", proc.pid, chunk.decode(errors="replace").rstrip())
