"""Draining a node, with real processes: `stoke drain NODE` lets the requests running there
finish, stops its instances once idle, and sends every later request (and cold start) to the
other node."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from cluster_fixtures import (
    ADMIN_KEY,
    INVOKE_KEY,
    Admin,
    free_port,
    generate_json,
    run_cli,
    start_controller,
    start_node,
    throttled,
    worker_pid,
)

from stoke.children import Child
from stoke.client import write_credentials

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("drain")
    port = free_port()
    controller, url = start_controller(tmp / "controller", port)
    nodes: list[Child] = [start_node(tmp, n, port) for n in ("node-a", "node-b")]
    home = tmp / "cli-home"
    write_credentials(home, {"url": url, "admin_key": ADMIN_KEY, "invoke_key": INVOKE_KEY})
    admin = Admin(url)
    admin.wait_for("both nodes", lambda: sum(n["alive"] for n in admin.nodes()) == 2)
    yield url, home
    for proc in [*nodes, controller]:
        proc.stop()


def test_drain_finishes_running_requests_then_schedules_elsewhere(
    cluster: tuple[str, Path], tiny_model_dir: Path
) -> None:
    url, home = cluster
    admin = Admin(url)
    admin.deploy("steady", {"model": str(tiny_model_dir), "autoscaling": {"keep_alive": 600}})
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=INVOKE_KEY, max_retries=0)
    reference = generate_json(tiny_model_dir, PROMPT, "--max-tokens", "300", "--temperature", "0")
    warm = client.completions.with_raw_response.create(model="steady", prompt=PROMPT, max_tokens=1)
    drained = warm.headers["x-stoke-node"]
    other = next(n["node_id"] for n in admin.nodes() if n["node_id"] != drained)

    # Slowed, so that the request is surely still running when the drain begins, however fast
    # this machine generates.
    with throttled(worker_pid(admin, warm.headers["x-stoke-instance"])):
        stream = client.completions.with_raw_response.create(
            model="steady", prompt=PROMPT, max_tokens=300, temperature=0, stream=True,
            extra_body={"stop": None},
        )  # fmt: skip
        assert stream.headers["x-stoke-node"] == drained
        chunks = iter(stream.parse())
        text = next(chunks).choices[0].text  # the request is running on `drained` now
        cli = run_cli(home, "drain", drained, "--wait")
    assert cli.returncode == 0, cli.stderr
    assert f"draining {drained}" in cli.stdout

    finish = None
    for chunk in chunks:
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    assert (text, finish) == (reference["text"], "length"), "a drain must not cut a request"

    listed = run_cli(home, "nodes")
    assert f"{drained} (" in listed.stdout and "alive, draining" in listed.stdout
    admin.wait_for(
        "the drained node's instance to stop once idle",
        lambda: all(i["node"] != drained for i in admin.function("steady")["instances"]),
    )
    starts = []
    for _ in range(2):
        after = client.completions.with_raw_response.create(
            model="steady", prompt=PROMPT, max_tokens=8, temperature=0
        )
        starts.append((after.headers["x-stoke-node"], after.headers["x-stoke-cold-start"]))
        assert reference["text"].startswith(after.parse().choices[0].text)
    assert starts == [(other, "true"), (other, "false")]


def test_drain_of_an_unknown_node_names_the_fix(cluster: tuple[str, Path]) -> None:
    _, home = cluster
    cli = run_cli(home, "drain", "node-nope")
    assert cli.returncode == 2
    assert "no node 'node-nope'" in cli.stderr and "/admin/nodes" in cli.stderr


def test_a_stream_whose_node_fails_with_nowhere_to_resume_ends_with_an_error_event(
    cluster: tuple[str, Path], tiny_model_dir: Path
) -> None:
    """With one node draining, kill the instance streaming on the other: the resume finds no
    node to run on, and the stream ends with an OpenAI-shaped error event saying so (not a cut
    connection)."""
    url, home = cluster
    admin = Admin(url)
    if not any(n["draining"] for n in admin.nodes()):
        assert run_cli(home, "drain", admin.nodes()[0]["node_id"]).returncode == 0
    admin.deploy("lonely", {"model": str(tiny_model_dir), "autoscaling": {"keep_alive": 600}})
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=INVOKE_KEY, max_retries=0)
    warm = client.completions.with_raw_response.create(model="lonely", prompt=PROMPT, max_tokens=1)
    pid = worker_pid(admin, warm.headers["x-stoke-instance"])
    with throttled(pid):  # so the stream is surely mid-way when its instance dies
        stream = client.completions.with_raw_response.create(
            model="lonely", prompt=PROMPT, max_tokens=300, temperature=0, stream=True,
            extra_body={"stop": None},
        )  # fmt: skip
        assert stream.headers["x-stoke-instance"] == warm.headers["x-stoke-instance"]
        chunks = iter(stream.parse())
        next(chunks)
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="no other could resume it"):
        for _ in chunks:
            pass


def test_undrain_lets_a_drained_node_take_new_work_again(
    cluster: tuple[str, Path], tiny_model_dir: Path
) -> None:
    url, home = cluster
    admin = Admin(url)
    if not any(n["draining"] for n in admin.nodes()):
        assert run_cli(home, "drain", admin.nodes()[0]["node_id"]).returncode == 0
    drained = next(n["node_id"] for n in admin.nodes() if n["draining"])
    other = next(n["node_id"] for n in admin.nodes() if n["node_id"] != drained)

    cli = run_cli(home, "undrain", drained)
    assert cli.returncode == 0, cli.stderr
    assert f"{drained} takes new instances" in cli.stdout
    # Drain the other node: the only place left to run is the node just undrained.
    assert run_cli(home, "drain", other).returncode == 0
    admin.wait_for(
        "a heartbeat from the undrained node saying it is not draining",
        lambda: [n["draining"] for n in admin.nodes() if n["node_id"] == drained] == [False],
    )
    admin.deploy("back", {"model": str(tiny_model_dir), "autoscaling": {"keep_alive": 600}})
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=INVOKE_KEY, max_retries=0)
    reply = client.completions.with_raw_response.create(
        model="back", prompt=PROMPT, max_tokens=8, temperature=0
    )
    assert (reply.headers["x-stoke-node"], reply.headers["x-stoke-cold-start"]) == (drained, "true")
    reference = generate_json(tiny_model_dir, PROMPT, "--max-tokens", "8", "--temperature", "0")
    assert reply.parse().choices[0].text == reference["text"]
    assert run_cli(home, "undrain", other).returncode == 0

    missing = run_cli(home, "undrain", "node-nope")
    assert missing.returncode == 2 and "no node 'node-nope'" in missing.stderr
