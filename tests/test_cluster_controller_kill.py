"""The controller killed (SIGKILL) under concurrent load: the node cancels every generation
whose client went with it (nothing keeps running, nothing holds a slot), and a controller
restarted on the same home and gRPC port re-adopts the running instance and serves again."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import httpx2 as httpx
from cluster_fixtures import (
    INVOKE_KEY,
    SECRET,
    Admin,
    free_port,
    generate_json,
    start_controller,
    start_node,
)

from node_agent.auth import open_channel
from node_agent.proto import node_agent_pb2 as pb
from node_agent.proto import node_agent_pb2_grpc as pb_grpc

PROMPT = "Once upon a time"
STREAMS = 3
MAX_TOKENS = 1500  # the small model needs ~30 ms a token: each stream runs for most of a minute


def running_on(address: str) -> int:
    """Requests the node's instances are generating now (its own Status, not the controller's)."""

    async def status() -> pb.NodeStatus:
        async with open_channel(address, secret=SECRET) as channel:
            return await pb_grpc.NodeAgentStub(channel).Status(pb.StatusRequest(), timeout=10)

    return sum(i.running_requests for i in asyncio.run(status()).instances)


def stream(url: str, chunks: list[int], started: threading.Event, errors: list[str]) -> None:
    body = {"model": "k", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True,
            "temperature": 0.0, "stop": None}  # fmt: skip
    headers = {"authorization": f"Bearer {INVOKE_KEY}"}
    try:
        with httpx.stream(
            "POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(1)
                    if len(chunks) >= 5:
                        started.set()
    except httpx.HTTPError as exc:
        errors.append(type(exc).__name__)
    finally:
        started.set()


def test_a_killed_controller_leaks_no_generation_and_its_successor_readopts_the_instance(
    tmp_path: Path, small_model_dir: Path
) -> None:
    port = free_port()
    controller, url = start_controller(tmp_path / "controller", port)
    node = start_node(tmp_path, "node-a", port, "--slots", "1", "--threads", "1")
    try:
        admin = Admin(url)
        admin.wait_for("the node", lambda: any(n["alive"] for n in admin.nodes()))
        (address,) = [n["address"] for n in admin.nodes()]
        spec = {"model": str(small_model_dir), "autoscaling": {"min_instances": 1,
                                                              "keep_alive": 600}}  # fmt: skip
        admin.deploy("k", spec)
        admin.wait_for(
            "the instance",
            lambda: [i["state"] for i in admin.function("k")["instances"]] == ["ready"],
            timeout=120,
        )
        (instance_id,) = [i["instance_id"] for i in admin.function("k")["instances"]]

        errors: list[str] = []
        streams: list[tuple[list[int], threading.Event]] = [
            ([], threading.Event()) for _ in range(STREAMS)
        ]
        threads = [
            threading.Thread(target=stream, args=(url, c, s, errors), daemon=True)
            for c, s in streams
        ]
        for t in threads:
            t.start()
        for _, started in streams:
            assert started.wait(120)
        assert not errors, errors
        assert running_on(address) == STREAMS

        controller.proc.send_signal(signal.SIGKILL)
        assert controller.proc.wait(timeout=10) == -signal.SIGKILL
        killed = time.monotonic()
        deadline = killed + 20
        while running_on(address) > 0:  # the node's view, polled until it has let them go
            assert time.monotonic() < deadline, "the node still generates for a dead controller"
            time.sleep(0.2)
        # Far sooner than they would have finished (MAX_TOKENS at ~30 ms a token).
        assert time.monotonic() - killed < 20
        for t in threads:
            t.join(30)
        assert len(errors) == STREAMS  # each client saw its stream break, none finished

        controller, url = start_controller(tmp_path / "controller", port)
        admin = Admin(url)
        admin.wait_for(
            "the instance re-adopted",
            lambda: (
                [(i["instance_id"], i["state"]) for i in admin.function("k")["instances"]]
                == [(instance_id, "ready")]
            ),
            timeout=30,
        )
        reply = httpx.post(
            f"{url}/v1/completions",
            json={"model": "k", "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
            headers={"authorization": f"Bearer {INVOKE_KEY}"},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        reference = generate_json(
            small_model_dir, PROMPT, "--max-tokens", "8", "--temperature", "0"
        )
        assert reply.json()["choices"][0]["text"] == reference["text"]
        assert running_on(address) == 0
    finally:
        node.stop()
        controller.stop()
