"""`stoke` subcommands run as child processes whose stdout lines are read in the background:
how `stoke up` starts a cluster (and the end-to-end tests start its parts), and how it keeps
one running when a part dies (`Supervisor`, within a `RestartPolicy`)."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from stoke.errors import StokeError


@dataclass
class Child:
    """A running `python -m stoke.cli ARGV`; its stdout lines queue up in `lines`."""

    name: str
    proc: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, name: str, argv: list[str], env: dict[str, str]) -> Child:
        """Start it (stderr is inherited, so its log shows) and read its stdout."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "stoke.cli", *argv], stdout=subprocess.PIPE, text=True, env=env
        )
        child = cls(name, proc, argv=list(argv), env=env)
        threading.Thread(target=child._pump, daemon=True).start()
        return child

    def restart(self, argv: list[str] | None = None) -> Child:
        """A new process under the same name and environment, with `argv` (default: the same
        arguments). This one must have exited."""
        assert self.proc.poll() is not None, f"{self.name} is still running"
        return Child.start(self.name, self.argv if argv is None else argv, self.env)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, prefix: str, deadline: float) -> str:
        """The rest of the next stdout line starting with `prefix`, by `deadline` (monotonic);
        `StokeError` if the process exits or the deadline passes first."""
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise StokeError(
                        f"{self.name} exited with status {self.proc.returncode} while starting; "
                        "its messages are above."
                    ) from None
                if time.monotonic() > deadline:
                    raise StokeError(f"{self.name}: no {prefix!r} line in time.") from None
                continue
            if line.startswith(prefix):
                return line.removeprefix(prefix).strip()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` (SIGTERM: a clean stop), wait, kill after `timeout`; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@dataclass(frozen=True)
class RestartPolicy:
    """How `Supervisor` restarts a child that exited: at most `max_restarts` times within any
    `window_s` seconds (0: never), each try after a backoff that doubles with the restarts
    already made in the window, so a child that dies at once is not restarted in a tight loop."""

    max_restarts: int = 3
    window_s: float = 60.0
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, recent: int) -> float | None:
        """Seconds to wait before restarting a child restarted `recent` times within the
        window; None when the bound is reached and the child is to be given up."""
        if recent >= self.max_restarts:
            return None
        return min(self.backoff_s * 2**recent, self.max_backoff_s)


@dataclass
class _Watched:
    """One supervised process and the facts about its restarts."""

    child: Child
    restart_argv: list[str] | None
    essential: bool
    restarts: list[float] = field(default_factory=list)
    """monotonic times of the restarts made"""
    exit_seen: bool = False
    due: float | None = None
    """monotonic time of the restart scheduled after the exit seen, if any"""


class Supervisor:
    """Watches children and restarts each that exits, within a `RestartPolicy`.

    `check()` is called from one thread (a polling loop); `stopping` is only ever set (by a
    signal handler, say), and once it is set no child is started any more, so `stop_all()`
    after the loop stops every process there is. A child given up is logged and left down,
    unless it is essential: then `check()` raises `StokeError` (the caller stops the rest).
    """

    def __init__(
        self, policy: RestartPolicy, log: Callable[[str], None], stopping: threading.Event
    ) -> None:
        self.policy = policy
        self.log = log
        self.stopping = stopping
        self._watched: list[_Watched] = []

    def watch(
        self, child: Child, restart_argv: list[str] | None = None, essential: bool = False
    ) -> None:
        """Supervise `child` from now on; restart it with `restart_argv` (default: the
        arguments it was started with). Children are stopped in the reverse order."""
        self._watched.append(_Watched(child, restart_argv, essential))

    def check(self, now: float) -> None:
        """Note the children that exited since the last call and start the restarts due."""
        for watched in self._watched:
            if not watched.exit_seen and watched.child.proc.poll() is not None:
                watched.exit_seen = True
                self._exited(watched, now)
            if watched.due is not None and now >= watched.due and not self.stopping.is_set():
                self._restart(watched, now)

    def stop_all(self) -> None:
        """Stop every child, the last watched first (SIGTERM, then SIGKILL if it hangs)."""
        for watched in reversed(self._watched):
            watched.child.stop()

    def _exited(self, watched: _Watched, now: float) -> None:
        name, status = watched.child.name, _status(watched.child.proc.returncode)
        recent = sum(now - t < self.policy.window_s for t in watched.restarts)
        delay = self.policy.delay(recent)
        if delay is not None:
            watched.due = now + delay
            self.log(
                f"{name} exited with status {status}; restarting it in {delay:g} s "
                f"(restart {recent + 1} of at most {self.policy.max_restarts} "
                f"per {self.policy.window_s:g} s)"
            )
            return
        after = f" after {recent} restarts within {self.policy.window_s:g} s" if recent else ""
        if watched.essential:
            raise StokeError(f"{name} exited with status {status}{after}; stopping the cluster.")
        self.log(
            f"{name} exited with status {status}{after}; giving up on it, the rest of the "
            "cluster keeps serving"
        )

    def _restart(self, watched: _Watched, now: float) -> None:
        watched.child = watched.child.restart(watched.restart_argv)
        watched.restarts.append(now)
        watched.exit_seen, watched.due = False, None
        self.log(f"{watched.child.name} restarted (pid {watched.child.proc.pid})")


def _status(returncode: int) -> str:
    """An exit status as Popen gives it, with the signal's name when one ended the process."""
    if returncode >= 0:
        return str(returncode)
    try:
        return f"{returncode} ({signal.Signals(-returncode).name})"
    except ValueError:
        return str(returncode)
