"""End to end through `stoke up --nodes 2`: real controller and node processes, the CLI, and
the official `openai` client against the HTTP API."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from cluster_fixtures import Admin, deadline, generate_json, run_cli

from stoke.children import Child

PROMPT = "Once upon a time"


@dataclass
class Cluster:
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("stoke-up")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("STOKE_SECRET", None)
    argv = ["up", "--nodes", "2", "--port", "0", "--home", str(home), "--cpu-memory", "3GiB",
            "--dram-cache", "1GiB", "--disk-cache", "2GiB"]  # fmt: skip
    proc = Child.start("stoke up", argv, env)
    url = proc.wait_line("stoke up: controller at", deadline()).split()[0]
    creds = json.loads((home / "credentials.json").read_text())
    yield Cluster(home, url, creds, proc)
    assert proc.stop(signal.SIGINT) == 0, "stoke up did not exit cleanly on SIGINT"


def test_keys_are_saved_privately_and_cli_finds_them(cluster: Cluster) -> None:
    path = cluster.home / "credentials.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert cluster.creds["url"] == cluster.url
    assert cluster.creds["admin_key"] != cluster.creds["invoke_key"]
    out = run_cli(cluster.home, "nodes", "--json")
    assert out.returncode == 0, out.stderr
    nodes = json.loads(out.stdout)
    assert sorted(n["node_id"] for n in nodes) == ["node-0", "node-1"]
    assert all(n["alive"] for n in nodes)


def test_deploy_and_invoke_match_stoke_generate(cluster: Cluster, tiny_model_dir: Path) -> None:
    out = run_cli(cluster.home, "deploy", "tiny", "--model", str(tiny_model_dir))
    assert out.returncode == 0, out.stderr
    reference = generate_json(tiny_model_dir, PROMPT, "--max-tokens", "24", "--temperature", "0")
    client = cluster.client()

    first = client.completions.with_raw_response.create(
        model="tiny", prompt=PROMPT, max_tokens=24, temperature=0
    )
    assert first.headers["x-stoke-cold-start"] == "true"
    assert first.headers["x-stoke-node"] in ("node-0", "node-1")
    assert float(first.headers["x-stoke-load-ms"]) > 0
    completion = first.parse()
    assert completion.choices[0].text == reference["text"]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(reference["prompt_token_ids"])
    assert completion.usage.completion_tokens == len(reference["token_ids"])

    second = client.completions.with_raw_response.create(
        model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stream=True
    )
    assert second.headers["x-stoke-cold-start"] == "false"
    assert second.headers["x-stoke-node"] == first.headers["x-stoke-node"]
    chunks = list(second.parse())
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == reference["text"]
    assert chunks[-1].choices[0].finish_reason == reference["finish_reason"]


def test_chat_streaming_and_not_match_stoke_generate(
    cluster: Cluster, tiny_model_dir: Path
) -> None:
    run_cli(cluster.home, "deploy", "tiny", "--model", str(tiny_model_dir))
    message = "What is a serverless function?"
    reference = generate_json(
        tiny_model_dir, message, "--chat", "--max-tokens", "16", "--temperature", "0.8",
        "--seed", "7",
    )  # fmt: skip
    client = cluster.client()
    messages: Any = [{"role": "user", "content": message}]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, temperature=0.8, seed=7
    )
    assert whole.choices[0].message.content == reference["text"]
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, temperature=0.8, seed=7, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["text"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(reference["token_ids"])


def test_cli_invoke_reports_where_it_ran(cluster: Cluster, tiny_model_dir: Path) -> None:
    run_cli(cluster.home, "deploy", "tiny", "--model", str(tiny_model_dir))
    reference = generate_json(tiny_model_dir, PROMPT, "--max-tokens", "8", "--temperature", "0")
    out = run_cli(
        cluster.home, "invoke", "tiny", PROMPT, "--max-tokens", "8", "--temperature", "0", "--json"
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["text"] == reference["text"]
    assert doc["node"] in ("node-0", "node-1")
    streamed = run_cli(
        cluster.home, "invoke", "tiny", PROMPT, "--max-tokens", "8", "--temperature", "0",
        "--stream",
    )  # fmt: skip
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.rstrip("\n") == reference["text"]
    assert "warm on node-" in streamed.stderr


def test_list_status_delete(cluster: Cluster, tiny_model_dir: Path) -> None:
    assert (
        run_cli(cluster.home, "deploy", "gone-soon", "--model", str(tiny_model_dir)).returncode == 0
    )
    listed = run_cli(cluster.home, "list")
    assert "gone-soon" in listed.stdout
    status = run_cli(cluster.home, "status", "gone-soon", "--json")
    assert json.loads(status.stdout)["model"] == str(tiny_model_dir.resolve())
    assert run_cli(cluster.home, "delete", "gone-soon").returncode == 0
    missing = run_cli(cluster.home, "status", "gone-soon")
    assert missing.returncode == 2
    assert "HTTP 404" in missing.stderr and "stoke deploy gone-soon" in missing.stderr


def test_deploy_errors_name_the_problem(cluster: Cluster, tmp_path: Path) -> None:
    spec = tmp_path / "fn.yaml"
    spec.write_text("model: /nowhere\nautoscaling:\n  keep_alive: 30x\n")
    bad_spec = run_cli(cluster.home, "deploy", "bad", "--config", str(spec))
    assert bad_spec.returncode == 2
    assert "autoscaling.keep_alive" in bad_spec.stderr and "30s" in bad_spec.stderr
    no_model = run_cli(cluster.home, "deploy", "bad", "--model", str(tmp_path / "nothing"))
    assert no_model.returncode == 2
    assert "no such directory" in no_model.stderr
    bad_name = run_cli(cluster.home, "deploy", "Bad Name", "--model", str(tmp_path))
    assert bad_name.returncode == 2 and "function name" in bad_name.stderr


def test_locality_dram_start_after_keep_alive_beats_disk_start(
    cluster: Cluster, small_model_dir: Path
) -> None:
    """After keep-alive stops the instance, the next cold start goes to the node that still
    holds the checkpoint in DRAM, and is faster than a start from its disk tier."""
    admin = cluster.admin()
    admin.deploy("loc", {"model": str(small_model_dir), "autoscaling": {"keep_alive": 0}})
    client = cluster.client()

    def cold_start() -> dict[str, str]:
        # A start that waits for the pool to pre-start a worker (a torch import: seconds on a
        # busy 2-core machine) measures the pool, not the tier; start each with one ready.
        admin.wait_for("a pre-started worker on every node", lambda: _workers_ready(cluster))
        start = time.perf_counter()
        r = client.completions.with_raw_response.create(
            model="loc", prompt=PROMPT, max_tokens=2, temperature=0
        )
        seconds = time.perf_counter() - start
        admin.wait_for(
            "keep-alive to stop the instance", lambda: not admin.function("loc")["instances"]
        )
        assert r.headers["x-stoke-cold-start"] == "true"
        return dict(r.headers) | {"seconds": str(seconds)}

    first = cold_start()  # converted on the way in: from the source directory
    node = first["x-stoke-node"]
    source = str(small_model_dir.resolve())
    admin.wait_for(
        "a heartbeat reporting the DRAM copy", lambda: _held(admin, node, "dram", source)
    )
    again = cold_start()
    assert again["x-stoke-node"] == node, "the DRAM holder must win"
    assert again["x-stoke-tier"] == "dram"

    _evict_dram_and_page_cache(cluster, node, source)
    admin.wait_for(
        "a heartbeat reporting the eviction", lambda: not _held(admin, node, "dram", source)
    )
    from_disk = cold_start()
    assert from_disk["x-stoke-node"] == node, "the disk holder must win over a node with nothing"
    assert from_disk["x-stoke-tier"] == "disk"
    from_dram = cold_start()
    assert from_dram["x-stoke-tier"] == "dram"
    # A start from disk is streamed (the instance serves while the copy runs, so its load-ms
    # ends early): the request's own time is what a start from DRAM must beat.
    dram_s, disk_s = float(from_dram["seconds"]), float(from_disk["seconds"])
    assert dram_s < disk_s, f"from DRAM {dram_s:.3f} s, from disk {disk_s:.3f} s"


def test_stoke_nodes_shows_each_dram_arena_and_what_is_free_in_it(
    cluster: Cluster, small_model_dir: Path
) -> None:
    """Each node's DRAM tier is one arena of --dram-cache (1 GiB here), in memory whatever it
    holds; what its checkpoints take is no longer free (after the locality test, one node holds
    the small model in DRAM)."""
    admin = cluster.admin()
    source = str(small_model_dir.resolve())
    admin.wait_for(
        "a node reporting the small model in DRAM",
        lambda: any(_held(admin, n["node_id"], "dram", source) for n in admin.nodes()),
    )
    out = run_cli(cluster.home, "nodes", "--json")
    assert out.returncode == 0, out.stderr
    for node in json.loads(out.stdout):
        dram = next(t for t in node["tiers"] if t["tier"] == "dram")
        disk = next(t for t in node["tiers"] if t["tier"] == "disk")
        arena = dram["arena"]
        assert disk["arena"] is None
        assert arena["size_bytes"] == 1 << 30
        assert arena["path"].startswith("/dev/shm/") and arena["path"].endswith("/arena")
        # A holding's bytes include its small files (config, tokenizer), kept beside the arena.
        held = sum(-(-h["bytes"] // 4096) * 4096 for h in dram["holdings"])
        free, size = arena["free_bytes"], arena["size_bytes"]
        assert size - held <= free < size if held else free == size
        assert 0 < arena["largest_free_bytes"] <= arena["free_bytes"]
        assert arena["startup_s"] > 0  # made fresh at this node's start
    assert any(
        next(t for t in n["tiers"] if t["tier"] == "dram")["holdings"]
        for n in json.loads(out.stdout)
    )
    text = run_cli(cluster.home, "nodes")
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("arena 1.0 GiB of memory in /dev/shm/") == 2, text.stdout


def _workers_ready(cluster: Cluster) -> bool:
    """Asked of the nodes themselves: a heartbeat may predate the load that took the worker."""
    import asyncio

    from node_agent.auth import open_channel
    from node_agent.proto import node_agent_pb2 as pb
    from node_agent.proto import node_agent_pb2_grpc as pb_grpc

    async def idle(address: str) -> int:
        async with open_channel(address, secret=cluster.creds["node_secret"]) as channel:
            status = await pb_grpc.NodeAgentStub(channel).Status(pb.StatusRequest())
            return int(status.idle_workers)

    addresses = [n["address"] for n in cluster.admin().nodes() if n["alive"]]
    return all(asyncio.run(idle(a)) >= 1 for a in addresses)


def _held(admin: Admin, node_id: str, tier: str, source: str) -> bool:
    node = next(n for n in admin.nodes() if n["node_id"] == node_id)
    held = next(t for t in node["tiers"] if t["tier"] == tier)["holdings"]
    return any(h["source"] == source for h in held)


def _evict_dram_and_page_cache(cluster: Cluster, node_id: str, source: str) -> None:
    """Drop the checkpoint from `node_id`'s DRAM tier (gRPC Evict) and its disk copy from the
    page cache, so the next load reads the disk."""
    import asyncio

    from node_agent.auth import open_channel
    from node_agent.proto import node_agent_pb2 as pb
    from node_agent.proto import node_agent_pb2_grpc as pb_grpc

    node = next(n for n in cluster.admin().nodes() if n["node_id"] == node_id)
    dram = next(t for t in node["tiers"] if t["tier"] == "dram")
    key = next(h["key"] for h in dram["holdings"] if h["source"] == source)

    async def evict() -> None:
        async with open_channel(node["address"], secret=cluster.creds["node_secret"]) as channel:
            await pb_grpc.NodeAgentStub(channel).Evict(
                pb.EvictRequest(checkpoint_key=key, tier="dram")
            )

    asyncio.run(evict())
    for path in (cluster.home / "nodes" / node_id / "disk").rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
