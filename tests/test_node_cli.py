"""`stoke node` refuses unusable settings with a message and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from node_fixtures import start_agent


def _node(
    tmp: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "stoke.cli", "node", "--home", str(tmp / "home"),
           "--dram-dir", str(tmp / "dram"), "--prestart", "0", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_no_secret_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "STOKE_SECRET"}
    result = _node(tmp_path, env=env)
    assert result.returncode == 2 and "STOKE_SECRET" in result.stderr


def test_a_taken_port_is_refused(tmp_path: Path) -> None:
    first = start_agent(tmp_path / "a", "--prestart", "0")
    try:
        result = _node(tmp_path / "b", "--secret", "x", "--node-id", "b", "--listen", first.address)
        assert result.returncode == 2, result.stdout
        assert "pick a free --listen" in result.stderr
    finally:
        assert first.stop() == 0
