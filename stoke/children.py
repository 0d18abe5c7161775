"""`stoke` subcommands run as child processes whose stdout lines are read in the background:
how `stoke up` starts a cluster (and the end-to-end tests start its parts)."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from stoke.errors import StokeError


@dataclass
class Child:
    """A running `python -m stoke.cli ARGV`; its stdout lines queue up in `lines`."""

    name: str
    proc: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    @classmethod
    def start(cls, name: str, argv: list[str], env: dict[str, str]) -> Child:
        """Start it (stderr is inherited, so its log shows) and read its stdout."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "stoke.cli", *argv], stdout=subprocess.PIPE, text=True, env=env
        )
        child = cls(name, proc)
        threading.Thread(target=child._pump, daemon=True).start()
        return child

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
