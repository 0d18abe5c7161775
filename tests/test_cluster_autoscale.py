"""The node autoscaler end to end on the local provider: a controller started with a cluster
policy launches its min_nodes; load beyond them launches a node of the next cheapest pool and
the queued request is served there; when load falls, the most expensive node is drained by
live migration (the request it ran finishes elsewhere, equal to the reference), retired and
terminated, and the spend per hour falls to the cheap node's price."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_fixtures import (
    ADMIN_KEY,
    INVOKE_KEY,
    Admin,
    free_port,
    run_cli,
    start_controller,
    throttled,
    worker_pid,
)
from test_cluster_migrate import Stream, check_equal, instance_on, start_streams
from test_cluster_migrate import long_runs as long_runs  # a fixture: the same long requests

from autoscaler.providers.local import LocalProvider
from stoke.children import Child
from stoke.client import write_credentials

NODE_ARGS = ["--threads", "1", "--dram-cache", "512MiB", "--disk-cache", "1GiB",
             "--heartbeat", "0.5"]  # fmt: skip


def policy(tmp: Path) -> Path:
    path = tmp / "cluster.yaml"
    pool = {"provider": "local", "offers": {"slots": 1, "cpu_memory": "1GiB"},
            "node_args": NODE_ARGS}  # fmt: skip
    path.write_text(
        json.dumps(
            {  # JSON is YAML
                "pools": [
                    {
                        "name": "cheap",
                        "market": "spot",
                        "price_per_hour": 0.1,
                        "min_nodes": 1,
                        "max_nodes": 1,
                        **pool,
                    },
                    {
                        "name": "pricey",
                        "market": "on_demand",
                        "price_per_hour": 0.3,
                        "max_nodes": 1,
                        **pool,
                    },
                ],
                "budget": {"max_per_hour": 1.0},
                "scaling": {"downscale_delay": "0s", "cooldown": "0s"},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Child]]:
    tmp = tmp_path_factory.mktemp("autoscale")
    controller, url = start_controller(
        tmp / "controller", free_port(), "--autoscale", str(policy(tmp))
    )
    home = tmp / "cli-home"
    write_credentials(home, {"url": url, "admin_key": ADMIN_KEY, "invoke_key": INVOKE_KEY})
    yield url, home, controller
    controller.stop()


def report(admin: Admin) -> dict[str, Any]:
    r = admin.http.get("/admin/autoscaler")
    assert r.status_code == 200, r.text
    return dict(r.json())


def nodes_of(admin: Admin, pool: str, phase: str = "ready") -> list[str]:
    (p,) = [p for p in report(admin)["pools"] if p["name"] == pool]
    return [n["node_id"] for n in p["nodes"] if n["phase"] == phase]


def test_load_launches_a_node_and_its_fall_retires_the_priciest_by_migration(
    cluster: tuple[str, Path, Child], tiny_model_dir: Path, long_runs: list[int | None]
) -> None:
    url, home, controller = cluster
    admin = Admin(url)
    admin.wait_for("min_nodes: one cheap node", lambda: nodes_of(admin, "cheap") == ["cheap-1"])
    assert nodes_of(admin, "pricey") == [] and nodes_of(admin, "pricey", "launching") == []
    # keep-alive 2s: once the cheap node's request ends, its instance stops soon, and with it
    # the need for the second node (a node is not retired from under a warm instance).
    spec = {"model": str(tiny_model_dir),
            "autoscaling": {"target_concurrency": 1, "keep_alive": "2s"}}  # fmt: skip
    admin.deploy("mig", spec)  # the name the shared streams ask for

    # Two long requests, one instance slot: the second waits while a pricey node comes up.
    streams = [Stream(long_runs[0]), Stream(long_runs[1])]
    first, first_threads = _start(url, streams[:1])
    (a,) = first
    with contextlib.ExitStack() as slowed:
        # The first request runs at a quarter of its speed meanwhile: the tiny model could end
        # it before the second is served on a fast machine.
        slowed.enter_context(throttled(worker_pid(admin, instance_on(admin, "cheap-1"))))
        second, second_threads = _start(url, streams[1:], wait=False)
        (b,) = second
        admin.wait_for("a pricey node for the second request",
                       lambda: bool(nodes_of(admin, "pricey")), timeout=90)  # fmt: skip
        assert b.started.wait(90) and b.error is None, b.error
        # The second at a tenth of its speed from its 20th token until its node has retired
        # (its workers found in /proc at once, not in a heartbeat): it must still be running
        # then on any machine, and the retirement waits out the cheap instance's keep-alive.
        pricey = _workers_of(_node_pid(controller, "pricey-1"))
        slowed.enter_context(throttled(*pricey, run_s=0.002, stopped_s=0.018))
        assert {a.node, b.node} == {"cheap-1", "pricey-1"}
        launched = [e for e in report(admin)["events"] if e["action"] == "launch"]
        assert [e["target"] for e in launched] == ["cheap-1", "pricey-1"]
        assert "min_nodes is 1" in launched[0]["reason"]
        assert "need 1 more" in launched[1]["reason"]

        # Load falls: the cheap node's request ends; the pricey one is drained by migration.
        on_pricey = a if a.node == "pricey-1" else b
        gone = b if on_pricey is a else a
        gone.response.close()  # the client goes away: the request is cancelled
        admin.wait_for("pricey-1 to be terminated", lambda: _terminated(admin, "pricey-1"),
                       timeout=90)  # fmt: skip
    check_equal([on_pricey], [*first_threads, *second_threads], tiny_model_dir)
    moved = [m for m in admin.http.get("/admin/migrations").json()["migrations"]
             if m["request_id"] == on_pricey.request_id]  # fmt: skip
    assert moved and moved[-1]["from"] == "pricey-1" and moved[-1]["outcome"] == "completed"
    retired = [e for e in report(admin)["events"] if e["action"] == "retire"]
    assert retired[-1]["target"] == "pricey-1" and "costs $0.3/h" in retired[-1]["reason"]
    assert all(n["node_id"] != "pricey-1" for n in admin.nodes())

    def spend_stopped() -> bool:  # the next tick bills what runs now: the cheap node alone
        return bool(admin.http.get("/admin/cost").json()["per_hour"] == pytest.approx(0.1))

    admin.wait_for("the spend per hour to fall to the cheap node's", spend_stopped)
    launched = [e["target"] for e in report(admin)["events"] if e["action"] == "launch"]
    assert launched == ["cheap-1", "pricey-1"]  # nothing launched again for the moved request
    cost = admin.http.get("/admin/cost").json()
    assert cost["by_pool"]["pricey"] > 0 and cost["total"] >= cost["by_pool"]["cheap"]
    assert cost["by_function"]["mig"] > 0
    metrics = admin.http.get("/metrics").text
    assert "stoke_spend_per_hour_usd 0.1" in metrics
    assert 'stoke_autoscaler_actions_total{action="launch",pool="pricey"} 1.0' in metrics
    assert 'stoke_autoscaler_actions_total{action="retire",pool="pricey"} 1.0' in metrics

    shown = run_cli(home, "autoscaler")
    assert shown.returncode == 0, shown.stderr
    assert "cheap (local, spot" in shown.stdout and "cheap-1 ready" in shown.stdout
    assert "retire pricey-1" in shown.stdout
    spent = run_cli(home, "cost", "--json")
    assert spent.returncode == 0 and json.loads(spent.stdout)["per_hour"] == pytest.approx(0.1)


def test_a_restarted_controller_adopts_the_nodes_it_launched(
    cluster: tuple[str, Path, Child],
) -> None:
    url, _, controller = cluster
    admin = Admin(url)
    admin.wait_for("the cheap node", lambda: nodes_of(admin, "cheap") == ["cheap-1"])
    before = admin.http.get("/admin/cost").json()["total"]
    pid = _node_pid(controller, "cheap-1")
    controller.proc.kill()  # a crash: the node processes it launched keep running
    controller.proc.wait()
    os.kill(pid, 0)
    restarted = controller.restart()
    try:
        new = Admin("http://" + restarted.wait_line("http listening on", time.monotonic() + 60))
        new.wait_for("cheap-1 back", lambda: nodes_of(new, "cheap") == ["cheap-1"], timeout=30)
        assert nodes_of(new, "cheap", "launching") == []  # adopted, not launched again
        assert [e for e in report(new)["events"] if e["action"] == "launch"] == []
        assert new.http.get("/admin/cost").json()["total"] >= before  # the ledger persisted
    finally:
        restarted.stop()  # stops the local nodes it adopted, too
    assert not _alive(pid)


def _start(url: str, streams: list[Stream], wait: bool = True) -> tuple[list[Stream], list[Any]]:
    if wait:
        started, threads = start_streams(url, [s.seed for s in streams])
        return started, threads
    import threading

    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=INVOKE_KEY, max_retries=0)
    threads = [threading.Thread(target=s.run, args=(client,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    return streams, threads


def _terminated(admin: Admin, node_id: str) -> bool:
    return any(e["action"] == "terminated" and e["target"] == node_id
               for e in report(admin)["events"])  # fmt: skip


def _node_pid(controller: Child, node_id: str) -> int:
    index = Path(controller.argv[controller.argv.index("--home") + 1]) / "local-nodes/nodes.json"
    return int(json.loads(index.read_text())[node_id]["pid"])


def _workers_of(agent: int) -> list[int]:
    """The node agent's child processes (its instance workers, busy or pre-started)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        if parent == agent:
            found.append(int(stat.parent.name))
    assert found, f"node agent {agent} has no worker process"
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_a_preempted_spot_node_is_replaced_on_demand_while_spot_is_short(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """SIGTERM on a spot node (its notice): the autoscaler takes its zone for short and, the
    function's min_instances still wanted, launches an on-demand node where the instance
    starts again and serves."""
    path = policy(tmp_path)
    data = json.loads(path.read_text())
    data["spot"] = {"return_to_spot_after": "10m"}
    path.write_text(json.dumps(data))
    controller, url = start_controller(
        tmp_path / "controller", free_port(), "--autoscale", str(path)
    )
    try:
        admin = Admin(url)
        admin.wait_for("the spot node", lambda: nodes_of(admin, "cheap") == ["cheap-1"])
        spec = {"model": str(tiny_model_dir), "autoscaling": {"min_instances": 1}}
        admin.deploy("mig", spec)
        admin.wait_for(
            "an instance on cheap-1", lambda: _instances(admin) == [("cheap-1", "ready")]
        )
        spot = _node_pid(controller, "cheap-1")
        os.kill(spot, signal.SIGTERM)  # a spot node's notice (--preemption sigterm)
        admin.wait_for(
            "the instance again, on an on-demand node",
            lambda: _instances(admin) == [("pricey-1", "ready")],
            timeout=90,
        )
        events = report(admin)["events"]
        assert any(e["action"] == "preempted" and e["target"] == "cheap-1" for e in events)
        (launch,) = [e for e in events if e["action"] == "launch" and e["target"] == "pricey-1"]
        assert "falling back to on-demand" in launch["reason"]
        (cheap,) = [p for p in report(admin)["pools"] if p["name"] == "cheap"]
        assert set(cheap["short_zones_s"]) == {"local"}
        reply = admin.http.post(
            "/v1/completions",
            json={"model": "mig", "prompt": "Once upon a time", "max_tokens": 4},
            headers={"authorization": f"Bearer {INVOKE_KEY}"},
        )
        assert reply.status_code == 200 and reply.headers["x-stoke-node"] == "pricey-1"
        admin.wait_for("the spot node to exit", lambda: not _alive(spot))
        # its DRAM tier (an arena the size of --dram-cache, in memory) goes with it, once the
        # provider sees it gone (reconciled every 15 s)
        dram = LocalProvider(tmp_path / "controller" / "local-nodes").dram_dir("cheap-1")
        admin.wait_for(f"{dram} to be removed", lambda: not dram.exists(), timeout=40)
    finally:
        controller.stop()


def _instances(admin: Admin) -> list[tuple[str, str]]:
    return [(i["node"], i["state"]) for i in admin.function("mig")["instances"]]
