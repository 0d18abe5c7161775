"""Preemption with real processes: a node told it will be taken back (SIGTERM from an
orchestrator; an AWS spot notice from a loopback IMDS) drains by live migration before its
deadline, every request's text equals the in-process reference, the node shows as preempting,
the notice and the moves are counted, and the node exits cleanly once empty."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cloud_metadata import AWS_TOKEN_PATH, AwsImds, iso_z
from cluster_fixtures import (
    ADMIN_KEY,
    INVOKE_KEY,
    Admin,
    free_port,
    run_cli,
    start_controller,
    start_node,
    throttled,
    worker_pid,
)
from test_cluster_migrate import (  # the same streamed requests and checks
    Stream,
    _reference,
    check_equal,
    instance_on,
    requests_on,
    start_streams,
)

from stoke.client import write_credentials

NODES = ("node-a", "node-b")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("preempt")


@pytest.fixture(scope="module")
def controller(tmp: Path) -> Iterator[tuple[str, int]]:
    config = tmp / "controller.yaml"
    config.write_text("preemption_margin_s: 0.5\npreemption_max_concurrent: 4\n")
    port = free_port()
    proc, url = start_controller(
        tmp / "controller", port, "--config", str(config), "--migration-round-timeout", "5"
    )
    yield url, port
    proc.stop()


@pytest.fixture(scope="module")
def long_seeds(tiny_model_dir: Path) -> list[int | None]:
    """Greedy and seeded requests whose references run at least 900 tokens."""
    found: list[int | None] = []
    for seed in [None, *range(1, 40)]:
        if len(_reference(tiny_model_dir, seed)["token_ids"]) >= 900:
            found.append(seed)
        if len(found) == 4:
            return found
    raise AssertionError("too few long runs")


def deploy_on_both(admin: Admin, model: Path) -> None:
    spec = {"model": str(model), "autoscaling": {"min_instances": 2, "keep_alive": 600}}
    admin.deploy("mig", spec)

    def ready() -> bool:
        taking = {n["node_id"] for n in admin.nodes() if n["alive"] and not n["draining"]}
        nodes = [i["node"] for i in admin.function("mig")["instances"] if i["state"] == "ready"]
        return sorted(nodes) == sorted(taking) and len(taking) == 2

    admin.wait_for("a ready instance on each node", ready, timeout=120)


def streams_on(
    url: str, node: str, seeds: list[int | None]
) -> tuple[list[Stream], list[threading.Thread]]:
    """Concurrent streams, at least one of them on `node` (routing spreads them)."""
    streams, threads = start_streams(url, seeds)
    assert any(s.node == node for s in streams), [s.node for s in streams]
    return streams, threads


def test_sigterm_drains_the_node_by_migration_and_it_exits_cleanly(
    tmp: Path, controller: tuple[str, int], tiny_model_dir: Path, long_seeds: list[int | None]
) -> None:
    url, port = controller
    admin = Admin(url)
    grace = 2.0  # shorter than the requests have left: they must move
    doomed = start_node(
        tmp, "node-a", port, "--slots", "1", "--threads", "1",
        "--preemption", "sigterm", "--preemption-grace", str(grace),
    )  # fmt: skip
    other = start_node(tmp, "node-b", port, "--slots", "1", "--threads", "1")
    try:
        admin.wait_for("both nodes", lambda: sum(n["alive"] for n in admin.nodes()) == 2)
        deploy_on_both(admin, tiny_model_dir)
        source = worker_pid(admin, instance_on(admin, "node-a"))
        # The source at a quarter of its speed from the start: on a fast machine the tiny
        # model could end the requests before they move.
        with throttled(source):
            streams, threads = streams_on(url, "node-a", long_seeds)
        moving = [s.request_id for s in streams if s.request_id in requests_on(admin)]

        def preempting() -> bool:
            (node,) = [n for n in admin.nodes() if n["node_id"] == "node-a"]
            p = node["preemption"]
            return p is not None and p["source"] == "sigterm" and node["draining"]

        def unloaded() -> bool:
            return all(i["node"] != "node-a" for i in admin.function("mig")["instances"])

        with throttled(source):
            sent = time.monotonic()
            doomed.proc.send_signal(signal.SIGTERM)
            admin.wait_for("node-a to show the notice", preempting, timeout=10)
            admin.wait_for("node-a's instance to be stopped", unloaded, timeout=grace + 5)
        assert doomed.proc.wait(timeout=grace + 10) == 0, "the drained node did not exit cleanly"
        assert time.monotonic() - sent < grace + 10
        check_equal(streams, threads, tiny_model_dir)
        metrics = admin.http.get("/metrics").text
        assert 'stoke_preemptions_total{kind="terminate",source="sigterm"} 1.0' in metrics
        moved = [
            m
            for m in admin.http.get("/admin/migrations").json()["migrations"]
            if m["reason"] == "preemption"
        ]
        assert moved and all(m["from"] == "node-a" for m in moved), moved
        assert {m["request_id"] for m in moved} <= set(moving)
        outcomes = [(m["request_id"], m["outcome"], m["detail"]) for m in moved]
        assert all(m["outcome"] in ("completed", "finished") for m in moved), outcomes
        assert any(m["outcome"] == "completed" for m in moved), outcomes
    finally:
        for proc in (doomed, other):
            proc.stop()
        admin.http.delete("/admin/functions/mig")


def test_an_aws_spot_notice_through_imds_drains_the_node_before_its_deadline(
    tmp: Path, controller: tuple[str, int], tiny_model_dir: Path, long_seeds: list[int | None]
) -> None:
    url, port = controller
    admin = Admin(url)
    with AwsImds() as imds:
        doomed = start_node(
            tmp, "node-c", port, "--slots", "1", "--threads", "1",
            "--preemption", "aws", "--preemption-endpoint", imds.url,
            "--preemption-poll", "0.2",
        )  # fmt: skip
        other = start_node(tmp, "node-d", port, "--slots", "1", "--threads", "1")
        try:
            admin.wait_for("the new nodes", lambda: _alive(admin) == {"node-c", "node-d"})
            deploy_on_both(admin, tiny_model_dir)
            # A rebalance recommendation is advisory: shown and counted, nothing moves.
            imds.inject_rebalance()
            admin.wait_for("the recommendation", lambda: _preemption(admin, "node-c") is not None)
            assert _preemption(admin, "node-c")["deadline_in_s"] is None  # type: ignore[index]
            assert not next(n for n in admin.nodes() if n["node_id"] == "node-c")["draining"]

            streams, threads = streams_on(url, "node-c", long_seeds)
            moving = {s.request_id for s in streams if s.request_id in requests_on(admin)}
            deadline = time.time() + 3.0  # shorter than the requests have left
            imds.inject_instance_action("terminate", iso_z(deadline))
            admin.wait_for(
                "node-c to show its deadline",
                lambda: (_preemption(admin, "node-c") or {}).get("deadline_in_s") is not None,
                timeout=10,
            )
            # Without --exit-when-drained it stays, and says it is drained.
            admin.wait_for(
                "node-c to report it is drained",
                lambda: (_preemption(admin, "node-c") or {}).get("drained") is True,
                timeout=30,
            )
            assert doomed.proc.poll() is None
            home = tmp / "cli-home"
            write_credentials(home, {"url": url, "admin_key": ADMIN_KEY, "invoke_key": INVOKE_KEY})
            listing = run_cli(home, "nodes")
            assert listing.returncode == 0, listing.stderr
            (line,) = [ln for ln in listing.stdout.splitlines() if ln.startswith("node-c ")]
            assert "preempting (deadline in" in line and "aws), drained" in line, line
            check_equal(streams, threads, tiny_model_dir)
            moved = [
                m
                for m in admin.http.get("/admin/migrations").json()["migrations"]
                if m["reason"] == "preemption" and m["from"] == "node-c"
            ]
            assert moved and {m["request_id"] for m in moved} <= moving, moved
            assert all(m["outcome"] in ("completed", "finished") for m in moved), moved
            metrics = admin.http.get("/metrics").text
            assert 'stoke_preemptions_total{kind="rebalance",source="aws"} 1.0' in metrics
            assert 'stoke_preemptions_total{kind="preempt",source="aws"} 1.0' in metrics
            assert imds.count(AWS_TOKEN_PATH, method="PUT") >= 1  # IMDSv2, with a token
        finally:
            for proc in (doomed, other):
                proc.stop()
            admin.http.delete("/admin/functions/mig")


def _alive(admin: Admin) -> set[str]:
    return {n["node_id"] for n in admin.nodes() if n["alive"]}


def _preemption(admin: Admin, node_id: str) -> dict[str, Any] | None:
    (node,) = [n for n in admin.nodes() if n["node_id"] == node_id]
    return node["preemption"]


def test_a_preempted_node_is_replaced_by_the_local_provider(
    tmp: Path, tiny_model_dir: Path
) -> None:
    config = tmp / "replacing.yaml"
    config.write_text(
        "preemption_margin_s: 0.5\nreplacement: local\nreplacement_max_nodes: 1\n"
        "replacement_node_args: [--slots, '1', --threads, '1', --cpu-memory, 2GiB,"
        " --dram-cache, 512MiB, --disk-cache, 1GiB, --heartbeat, '0.5']\n"
    )
    port = free_port()
    controller, url = start_controller(tmp / "replacing", port, "--config", str(config))
    spot = start_node(
        tmp, "spot-a", port, "--slots", "1", "--threads", "1",
        "--preemption", "sigterm", "--preemption-grace", "20",
    )  # fmt: skip
    try:
        admin = Admin(url)
        admin.wait_for("the spot node", lambda: _alive(admin) == {"spot-a"})
        spec = {"model": str(tiny_model_dir), "autoscaling": {"min_instances": 1}}
        admin.deploy("mig", spec)
        admin.wait_for(
            "an instance on it",
            lambda: [i["node"] for i in admin.function("mig")["instances"]] == ["spot-a"],
            timeout=60,
        )
        spot.proc.send_signal(signal.SIGTERM)
        admin.wait_for("the replacement node", lambda: "spot-a-r1" in _alive(admin), timeout=60)
        assert spot.proc.wait(timeout=30) == 0  # drained, and gone cleanly
        admin.wait_for(
            "min_instances met on the replacement",
            lambda: (
                [(i["node"], i["state"]) for i in admin.function("mig")["instances"]]
                == [("spot-a-r1", "ready")]
            ),
            timeout=60,
        )
        reply = admin.http.post(
            "/v1/completions",
            json={"model": "mig", "prompt": "Once upon a time", "max_tokens": 4},
            headers={"authorization": f"Bearer {INVOKE_KEY}"},
        )
        assert reply.status_code == 200 and reply.headers["x-stoke-node"] == "spot-a-r1"
    finally:
        spot.stop()
        controller.stop()  # stops the replacement it started
    dram = Path(f"/dev/shm/stoke-{os.getuid()}-{controller.proc.pid}-spot-a-r1")
    assert not dram.exists(), "the replacement's DRAM tier (an arena, in memory) was left behind"
