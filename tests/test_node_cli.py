"""`stoke node` refuses unusable settings with a message and exit status 2, and fills in
defaults that depend on the machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from node_fixtures import start_agent

from node_agent.heartbeat import MIN_INTERVAL_S
from stoke.cli import build_parser
from stoke.cli import main as cli_main
from stoke.commands.node import build_config


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


@pytest.mark.parametrize("interval", ["0.05", "0", "nan"])
def test_heartbeat_below_the_floor_is_refused(
    interval: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["node", "--secret", "x", "--heartbeat", interval]) == 2
    assert f"must be at least {MIN_INTERVAL_S} s" in capsys.readouterr().err


def test_threads_below_one_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["node", "--secret", "x", "--threads", "0"]) == 2
    assert "--threads 0: must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(("slots", "threads"), [(1, None), (64, None), (2, 5)])
def test_threads_default_to_a_share_of_the_cores(slots: int, threads: int | None) -> None:
    argv = ["node", "--secret", "x", "--slots", str(slots)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    config = build_config(build_parser().parse_args(argv))
    cores = os.cpu_count() or 1
    assert config.threads == (threads or max(1, cores // slots))


def test_sizes_follow_the_one_rule_set(tmp_path: Path) -> None:
    argv = ["node", "--secret", "x", "--home", str(tmp_path), "--cpu-memory", "8G",
            "--dram-cache", "512MiB", "--disk-cache", "2GB"]  # fmt: skip
    config = build_config(build_parser().parse_args(argv))
    assert config.cpu_memory == 8 << 30 and config.store.dram_budget == 512 << 20
    assert config.store.disk_budget == 2 * 10**9


@pytest.mark.parametrize(("flag", "value"), [("--cpu-memory", "0"), ("--dram-cache", "8 gigs")])
def test_an_unusable_size_is_refused_naming_the_flag(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["node", "--secret", "x", flag, value]) == 2
    assert f"{flag}: '{value}'" in capsys.readouterr().err
