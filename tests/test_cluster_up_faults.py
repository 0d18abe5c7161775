"""`stoke up` when one of its processes dies: the cluster logs it, keeps serving and restarts
the process (a node with its id and home, the controller on its addresses), within a bound.
Real processes killed with SIGKILL; every wait polls a condition with a deadline."""

from __future__ import annotations

import json
import os
import queue
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from cluster_fixtures import Admin, deadline

from stoke.children import Child, RestartPolicy

PROMPT = "Once upon a time"


@dataclass
class Up:
    """A running `stoke up` and what it saved."""

    home: Path
    url: str
    creds: dict[str, str]
    proc: Child

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.creds["invoke_key"], max_retries=0
        )

    def admin(self) -> Admin:
        return Admin(self.url, self.creds["admin_key"])

    def child_pid(self, name: str) -> int | None:
        """The pid of this `stoke up`'s live child `name` ("controller" or a node id)."""
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _is_child(entry, self.proc.proc.pid, name):
                return int(entry.name)
        return None

    def log_until(self, marker: str) -> list[str]:
        """`stoke up`'s stdout lines from here up to the first one holding `marker`."""
        lines: list[str] = []
        end = deadline()
        while not lines or marker not in lines[-1]:
            try:
                lines.append(self.proc.lines.get(timeout=max(0.0, end - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"no {marker!r} in stoke up's output: {lines}") from None
        return lines


def _is_child(proc_dir: Path, parent: int, name: str) -> bool:
    try:
        stat = (proc_dir / "stat").read_text()
        argv = (proc_dir / "cmdline").read_bytes().decode().split("\0")
    except OSError:  # it exited while we looked
        return False
    if int(stat.rpartition(")")[2].split()[1]) != parent or "stoke.cli" not in argv:
        return False  # a zombie's cmdline is empty
    command = argv[argv.index("stoke.cli") + 1]
    if command == "node":
        return argv[argv.index("--node-id") + 1] == name
    return command == name


@contextmanager
def stoke_up(home: Path, *extra: str) -> Iterator[Up]:
    """`stoke up --nodes 2` on a free port, stopped with SIGINT afterwards (it must exit 0)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("STOKE_SECRET", None)
    argv = ["up", "--nodes", "2", "--port", "0", "--home", str(home), "--cpu-memory", "3GiB",
            "--dram-cache", "1GiB", "--disk-cache", "2GiB", *extra]  # fmt: skip
    proc = Child.start("stoke up", argv, env)
    try:
        url = proc.wait_line("stoke up: controller at", deadline()).split()[0]
        creds = json.loads((home / "credentials.json").read_text())
        yield Up(home, url, creds, proc)
        assert proc.proc.poll() is None, "stoke up exited while the test ran"
    except BaseException:
        proc.stop(signal.SIGINT)
        raise
    assert proc.stop(signal.SIGINT) == 0, "stoke up did not exit cleanly on SIGINT"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with stoke_up(tmp_path_factory.mktemp("stoke-up-faults")) as up:
        yield up


def _node(admin: Admin, node_id: str) -> dict[str, Any]:
    return next(n for n in admin.nodes() if n["node_id"] == node_id)


def _complete(up: Up, model: str, **overrides: Any) -> Any:
    """A temperature-0 completion of PROMPT from function `model`, with its raw headers."""
    return up.client().completions.with_raw_response.create(
        model=model, prompt=PROMPT, max_tokens=48, temperature=0, **overrides
    )


def test_restart_policy_backs_off_doubling_then_gives_up() -> None:
    policy = RestartPolicy(max_restarts=4, backoff_s=0.5, max_backoff_s=2.0)
    assert [policy.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 2.0, None]
    assert RestartPolicy(max_restarts=0).delay(0) is None


def test_a_killed_node_restarts_while_the_rest_keep_serving(
    cluster: Up, tiny_model_dir: Path
) -> None:
    admin = cluster.admin()
    admin.deploy("steady", {"model": str(tiny_model_dir), "autoscaling": {"keep_alive": 600}})
    expected = _complete(cluster, "steady").parse().choices[0].text
    stream = _complete(cluster, "steady", stream=True)
    serving = stream.headers["x-stoke-node"]
    victim = next(n for n in ("node-0", "node-1") if n != serving)
    old_address = _node(admin, victim)["address"]
    old_pid = cluster.child_pid(victim)
    assert old_pid is not None
    chunks = iter(stream.parse())
    text = [next(chunks).choices[0].text]

    os.kill(old_pid, signal.SIGKILL)

    exited = cluster.log_until(f"stoke up: {victim} exited")[-1]
    assert "with status -9 (SIGKILL); restarting it in 0.5 s" in exited
    text += [c.choices[0].text for c in chunks if c.choices]
    assert "".join(text) == expected, "the stream on the other node was cut"
    cluster.log_until(f"stoke up: {victim} restarted")
    admin.wait_for(
        f"{victim} to register again",
        lambda: _node(admin, victim)["alive"] and _node(admin, victim)["address"] != old_address,
    )
    assert cluster.child_pid(victim) not in (None, old_pid)
    assert _complete(cluster, "steady").parse().choices[0].text == expected


def test_a_killed_controller_restarts_on_the_same_url_with_its_functions(
    cluster: Up, tiny_model_dir: Path
) -> None:
    cluster.admin().deploy("durable", {"model": str(tiny_model_dir)})
    before = cluster.admin().function("durable")
    expected = _complete(cluster, "durable").parse().choices[0].text
    old_pid = cluster.child_pid("controller")
    assert old_pid is not None

    os.kill(old_pid, signal.SIGKILL)

    log = cluster.log_until("stoke up: controller restarted")
    assert any("controller exited with status -9 (SIGKILL); restarting it" in line for line in log)
    admin = cluster.admin()
    admin.wait_for("the controller to answer on its URL", lambda: _healthy(cluster.url))
    assert cluster.child_pid("controller") not in (None, old_pid)
    assert admin.function("durable")["created_at"] == before["created_at"]
    admin.wait_for("both nodes to heartbeat again", lambda: all(n["alive"] for n in admin.nodes()))
    assert _complete(cluster, "durable").parse().choices[0].text == expected
    assert json.loads((cluster.home / "credentials.json").read_text())["url"] == cluster.url


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_a_node_that_keeps_dying_is_given_up_and_the_rest_keep_serving(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> None:
    with stoke_up(tmp_path_factory.mktemp("stoke-up-give-up"), "--max-restarts", "2") as up:
        up.admin().deploy("tiny", {"model": str(tiny_model_dir)})
        expected = _complete(up, "tiny").parse().choices[0].text
        # node-1's disk tier turns into a file: every start of node-1 fails at once from now
        disk = up.home / "nodes" / "node-1" / "disk"
        disk.rename(disk.with_name("disk.moved"))
        disk.write_text("not a directory\n")
        pid = up.child_pid("node-1")
        assert pid is not None

        os.kill(pid, signal.SIGKILL)

        log = up.log_until("stoke up: node-1 exited")[-1:] + up.log_until("giving up on it")
        assert "node-1 exited with status -9 (SIGKILL); restarting it in 0.5 s" in log[0]
        assert sum("node-1 restarted" in line for line in log) == 2
        assert "node-1 exited with status 2 after 2 restarts within 60 s" in log[-1]
        admin = up.admin()
        admin.wait_for("node-1 to be marked gone", lambda: not _node(admin, "node-1")["alive"])
        assert up.child_pid("node-1") is None
        after = _complete(up, "tiny")
        assert after.headers["x-stoke-node"] == "node-0"
        assert after.parse().choices[0].text == expected
