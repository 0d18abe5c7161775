"""The controller under failure and abuse, with real processes: restarts, a killed node agent,
overload, a client that goes away, and every malformed request's status code and message."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from cluster_fixtures import (
    ADMIN_KEY,
    INVOKE_KEY,
    Admin,
    free_port,
    generate_json,
    start_controller,
    start_node,
    throttled,
    worker_pid,
)

from stoke.children import Child

PROMPT = "Once upon a time"


@dataclass
class Cluster:
    tmp: Path
    grpc_port: int
    controller: Child
    url: str
    nodes: dict[str, Child]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=INVOKE_KEY, max_retries=0)

    def admin(self) -> Admin:
        return Admin(self.url)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    config = tmp / "controller.yaml"
    config.write_text("queue_limit: 0\nmax_body_bytes: 65536\n")
    port = free_port()
    controller, url = start_controller(tmp / "controller", port, "--config", str(config))
    nodes = {n: start_node(tmp, n, port) for n in ("node-a", "node-b")}
    c = Cluster(tmp, port, controller, url, nodes)
    admin = c.admin()
    admin.wait_for("both nodes", lambda: sum(n["alive"] for n in admin.nodes()) == 2)
    yield c
    for proc in [*c.nodes.values(), c.controller]:
        proc.stop()


def _raw(cluster: Cluster, path: str, body: Any, key: str | None = INVOKE_KEY) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(cluster.url + path, content=body, headers=headers, timeout=120)
    return httpx.post(cluster.url + path, json=body, headers=headers, timeout=120)


def _error(response: httpx.Response) -> dict[str, Any]:
    doc = response.json()
    assert set(doc) == {"error"}, doc
    assert {"message", "type", "code"} <= set(doc["error"]), doc
    return dict(doc["error"])


def test_every_bad_input_gets_its_status_and_a_message(
    cluster: Cluster, tiny_model_dir: Path
) -> None:
    cluster.admin().deploy("tiny", {"model": str(tiny_model_dir)})
    ok = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}

    missing = _raw(cluster, "/v1/completions", ok, key=None)
    assert missing.status_code == 401 and "Authorization: Bearer" in _error(missing)["message"]
    wrong = _raw(cluster, "/v1/completions", ok, key="sk-wrong-key-123")
    assert wrong.status_code == 401 and _error(wrong)["code"] == "invalid_api_key"
    admin_with_invoke = httpx.get(
        cluster.url + "/admin/functions", headers={"authorization": f"Bearer {INVOKE_KEY}"}
    )
    assert admin_with_invoke.status_code == 401, "the invoke key must not open the admin API"

    unknown = _raw(cluster, "/v1/completions", {**ok, "model": "nope"})
    assert unknown.status_code == 404
    assert "stoke deploy nope" in _error(unknown)["message"]
    assert _error(unknown)["code"] == "model_not_found"

    not_json = _raw(cluster, "/v1/completions", b"{not json")
    assert not_json.status_code == 400 and "not valid JSON" in _error(not_json)["message"]
    too_deep = _raw(cluster, "/v1/completions", b"[" * 5000 + b"]" * 5000)
    assert too_deep.status_code == 400 and _error(too_deep)["code"] == "invalid_json"
    # JSON that pydantic's fast parser refuses but json accepts is still JSON to us: a byte-
    # order mark, and an ignored field nested deeper than pydantic's 200 levels
    deep_extra = (
        json.dumps({**ok, "metadata": "u"}).encode().replace(b'"u"', b"[" * 300 + b"]" * 300)
    )
    for body in (b"\xef\xbb\xbf" + json.dumps(ok).encode(), deep_extra):
        accepted = _raw(cluster, "/v1/completions", body)
        assert accepted.status_code == 200, accepted.text
    wrong_type = _raw(cluster, "/v1/completions", {**ok, "max_tokens": "many"})
    assert wrong_type.status_code in (400, 422)
    assert "max_tokens" in _error(wrong_type)["message"]
    no_prompt = _raw(cluster, "/v1/completions", {"model": "tiny"})
    assert no_prompt.status_code in (400, 422) and "prompt" in _error(no_prompt)["message"]
    too_hot = _raw(
        cluster,
        "/v1/chat/completions",
        {"model": "tiny", "temperature": 9, "messages": [{"role": "user", "content": "x"}]},
    )
    assert too_hot.status_code in (400, 422) and "temperature" in _error(too_hot)["message"]
    too_many = _raw(cluster, "/v1/completions", {**ok, "n": 17})
    assert too_many.status_code == 400 and "16" in _error(too_many)["message"]

    too_long = _raw(cluster, "/v1/completions", {**ok, "max_tokens": 100_000})
    assert too_long.status_code == 400
    err = _error(too_long)
    assert err["code"] == "context_length_exceeded" and "maximum context length" in err["message"]

    huge = _raw(cluster, "/v1/completions", {**ok, "prompt": "x" * 100_000})
    assert huge.status_code == 413 and "larger than 65536 bytes" in _error(huge)["message"]

    cluster.admin().deploy(
        "no-room", {"model": str(tiny_model_dir), "resources": {"memory": "1TiB"}}
    )
    no_room = _raw(cluster, "/v1/completions", {**ok, "model": "no-room"})
    assert no_room.status_code == 503
    assert int(no_room.headers["retry-after"]) >= 1
    assert "memory" in _error(no_room)["message"]

    bad_spec = cluster.admin().http.put(
        "/admin/functions/bad",
        json={"model": str(tiny_model_dir), "autoscaling": {"max_instance": 2}},
    )
    assert bad_spec.status_code == 422
    assert "did you mean max_instances" in _error(bad_spec)["message"]


def test_openai_client_raises_typed_errors(cluster: Cluster, tiny_model_dir: Path) -> None:
    cluster.admin().deploy("tiny", {"model": str(tiny_model_dir)})
    with pytest.raises(openai.NotFoundError):
        cluster.client().completions.create(model="nope", prompt=PROMPT)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{cluster.url}/v1", api_key="sk-bad-key-0000", max_retries=0
        ).models.list()
    with pytest.raises(openai.BadRequestError):
        cluster.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=1_000_000)
    assert "tiny" in [m.id for m in cluster.client().models.list()]


def test_overload_is_429_with_retry_after(cluster: Cluster, small_model_dir: Path) -> None:
    """One instance, one request at a time, no queue: a second concurrent request is refused."""
    admin = cluster.admin()
    admin.deploy(
        "one", {"model": str(small_model_dir),
                "autoscaling": {"max_instances": 1, "target_concurrency": 1, "keep_alive": 600}},
    )  # fmt: skip
    client = cluster.client()
    client.completions.create(model="one", prompt=PROMPT, max_tokens=1)  # warm it up
    stream = client.completions.create(
        model="one", prompt=PROMPT, max_tokens=1000, temperature=0, stream=True
    )
    next(iter(stream))  # the first request holds the only slot now
    refused = _raw(cluster, "/v1/completions", {"model": "one", "prompt": PROMPT, "max_tokens": 1})
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert _error(refused)["type"] == "overloaded_error"
    stream.close()


def test_client_disconnect_cancels_the_generation_on_the_node(
    cluster: Cluster, small_model_dir: Path
) -> None:
    admin = cluster.admin()
    admin.deploy("cancel", {"model": str(small_model_dir), "autoscaling": {"keep_alive": 600}})
    client = cluster.client()
    # 2000 tokens of the small model take well over a minute here; a cancelled one is gone in
    # about a heartbeat.
    stream = client.completions.create(
        model="cancel", prompt=PROMPT, max_tokens=2000, temperature=0, stream=True
    )
    next(iter(stream))
    assert admin.function("cancel")["in_flight"] == 1
    admin.wait_for(
        "a heartbeat showing the request running on the node",
        lambda: any(
            i["running_requests"] == 1 for n in admin.nodes() for i in n["reported_instances"]
        ),
        20,
    )
    stream.close()
    admin.wait_for(
        "the controller to drop the request", lambda: admin.function("cancel")["in_flight"] == 0, 20
    )
    admin.wait_for(
        "the node to report no running requests",
        lambda: all(
            i["running_requests"] == 0 for n in admin.nodes() for i in n["reported_instances"]
        ),
        20,
    )


def test_killed_node_agent_cold_starts_elsewhere(cluster: Cluster, tiny_model_dir: Path) -> None:
    admin = cluster.admin()
    admin.deploy("survivor", {"model": str(tiny_model_dir), "autoscaling": {"keep_alive": 600}})
    client = cluster.client()
    reference = generate_json(tiny_model_dir, PROMPT, "--max-tokens", "8", "--temperature", "0")
    first = client.completions.with_raw_response.create(
        model="survivor", prompt=PROMPT, max_tokens=8, temperature=0
    )
    victim = first.headers["x-stoke-node"]
    cluster.nodes[victim].stop(signal.SIGKILL)
    admin.wait_for(
        f"{victim} to be marked gone",
        lambda: not next(n for n in admin.nodes() if n["node_id"] == victim)["alive"],
        30,
    )
    assert admin.function("survivor")["instances"] == [], "instances on a gone node are gone"
    after = client.completions.with_raw_response.create(
        model="survivor", prompt=PROMPT, max_tokens=8, temperature=0
    )
    assert after.headers["x-stoke-node"] != victim
    assert after.headers["x-stoke-cold-start"] == "true"
    assert after.parse().choices[0].text == reference["text"]
    # bring a node back under the same name for the tests that follow
    cluster.nodes[victim] = start_node(cluster.tmp, victim, cluster.grpc_port)
    admin.wait_for(f"{victim} to come back", lambda: all(n["alive"] for n in admin.nodes()), 30)


def test_killed_instance_mid_stream_resumes_elsewhere_without_losing_a_token(
    cluster: Cluster, tiny_model_dir: Path
) -> None:
    """SIGKILL the instance process while it streams: the router resumes the request on
    another node from its token-level state, and the client's text equals an unbroken run."""
    admin = cluster.admin()
    admin.deploy("phoenix", {"model": str(tiny_model_dir), "autoscaling": {"keep_alive": 600}})
    client = cluster.client()
    reference = generate_json(tiny_model_dir, PROMPT, "--max-tokens", "1200", "--temperature", "0")
    warm = client.completions.with_raw_response.create(model="phoenix", prompt=PROMPT, max_tokens=1)
    node_id, instance_id = warm.headers["x-stoke-node"], warm.headers["x-stoke-instance"]
    pid = worker_pid(admin, instance_id)
    with throttled(pid):  # so the stream is surely mid-way when its instance dies
        stream = client.completions.with_raw_response.create(
            model="phoenix", prompt=PROMPT, max_tokens=1200, temperature=0, stream=True,
            extra_body={"stop": None},
        )  # fmt: skip
        assert stream.headers["x-stoke-instance"] == instance_id
        chunks = iter(stream.parse())
        text = [next(chunks).choices[0].text for _ in range(3)]
        os.kill(pid, signal.SIGKILL)
    text += [c.choices[0].text for c in chunks if c.choices]
    assert "".join(text) == reference["text"]
    instances = admin.function("phoenix")["instances"]
    assert any(i["node"] != node_id for i in instances), "the resume ran on the other node"


def test_choices_of_a_killed_instance_resume_each_as_if_unbroken(
    cluster: Cluster, tiny_model_dir: Path
) -> None:
    """n=2, sampled, streamed; SIGKILL their instance mid-way: each choice resumes elsewhere
    from its own token-level state and ends with the text of an unbroken run of its seed."""
    admin = cluster.admin()
    admin.deploy("twins", {"model": str(tiny_model_dir), "autoscaling": {"keep_alive": 600}})
    client = cluster.client()
    sampled: dict[str, Any] = dict(model="twins", prompt=PROMPT, max_tokens=400, temperature=0.8,
                                   extra_body={"stop": None, "ignore_eos": True})  # fmt: skip
    warm = client.completions.with_raw_response.create(model="twins", prompt=PROMPT, max_tokens=1)
    pid = worker_pid(admin, warm.headers["x-stoke-instance"])
    texts = ["", ""]
    with throttled(pid):  # so both choices are surely mid-way when their instance dies
        stream = client.completions.with_raw_response.create(**sampled, n=2, seed=11, stream=True)
        assert stream.headers["x-stoke-instance"] == warm.headers["x-stoke-instance"]
        chunks = iter(stream.parse())
        while not all(texts):
            for choice in next(chunks).choices:
                texts[choice.index] += choice.text
        os.kill(pid, signal.SIGKILL)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    unbroken = [client.completions.create(**sampled, seed=11 + i).choices[0].text for i in (0, 1)]
    assert texts == unbroken


def test_controller_restart_keeps_functions(cluster: Cluster, tiny_model_dir: Path) -> None:
    admin = cluster.admin()
    admin.deploy("durable", {"model": str(tiny_model_dir), "autoscaling": {"max_instances": 2}})
    before = admin.function("durable")
    cluster.controller.stop()
    config = cluster.tmp / "controller.yaml"
    cluster.controller, cluster.url = start_controller(
        cluster.tmp / "controller", cluster.grpc_port, "--config", str(config)
    )
    admin = cluster.admin()
    after = admin.function("durable")
    assert after["spec"] == before["spec"] and after["created_at"] == before["created_at"]
    admin.wait_for("nodes to heartbeat again", lambda: sum(n["alive"] for n in admin.nodes()) == 2)
    reply = cluster.client().completions.create(
        model="durable", prompt=PROMPT, max_tokens=4, temperature=0
    )
    reference = generate_json(tiny_model_dir, PROMPT, "--max-tokens", "4", "--temperature", "0")
    assert reply.choices[0].text == reference["text"]


def test_healthz_and_metrics(cluster: Cluster, tiny_model_dir: Path) -> None:
    health = httpx.get(cluster.url + "/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert httpx.get(cluster.url + "/metrics").status_code == 401
    cluster.admin().deploy("tiny", {"model": str(tiny_model_dir)})
    cluster.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    text = httpx.get(
        cluster.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}
    ).text
    assert 'stoke_requests_total{endpoint="completions",function="tiny",status="200"}' in text
    assert "stoke_ttft_seconds_bucket" in text
    assert "stoke_queue_length" in text
    assert json.loads(httpx.get(cluster.url + "/healthz").text)["nodes_alive"] == 2


def test_a_kv_cache_too_small_for_one_sequence_is_refused_at_deploy(
    cluster: Cluster, tiny_model_dir: Path
) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4
    need = 512 * per_token  # float32 K and V for one sequence of max_model_len tokens
    refused = cluster.admin().http.put(
        "/admin/functions/cramped",
        json={"model": str(tiny_model_dir), "engine": {"kv_cache": 1024, "max_model_len": 512}},
    )
    assert refused.status_code == 422
    message = _error(refused)["message"]
    assert "engine.kv_cache" in message and f"{need} bytes" in message
    assert "raise engine.kv_cache" in message and "lower engine.max_model_len" in message
    assert cluster.admin().http.get("/admin/functions/cramped").status_code == 404
    fits = {"model": str(tiny_model_dir), "engine": {"kv_cache": need, "max_model_len": 512}}
    assert cluster.admin().http.put("/admin/functions/cramped", json=fits).status_code == 201


def test_tier_header_and_metric_say_where_the_node_found_the_checkpoint(
    cluster: Cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """No node holds anything from a fresh directory, so the policy expects a remote fetch; the
    node converts it. The header (cold and warm) and the metric carry what the node did."""
    fresh = shutil.copytree(tiny_model_dir, tmp_path / "fresh-hf")
    cluster.admin().deploy("truth", {"model": str(fresh), "autoscaling": {"keep_alive": 600}})
    client = cluster.client()
    cold = client.completions.with_raw_response.create(model="truth", prompt=PROMPT, max_tokens=2)
    warm = client.completions.with_raw_response.create(model="truth", prompt=PROMPT, max_tokens=2)
    assert cold.headers["x-stoke-cold-start"] == "true"
    assert cold.headers["x-stoke-tier"] == "converted"
    assert warm.headers["x-stoke-cold-start"] == "false"
    assert warm.headers["x-stoke-tier"] == "converted"
    text = httpx.get(
        cluster.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}
    ).text
    assert 'stoke_cold_starts_total{function="truth",tier="converted"} 1.0' in text
