"""Prometheus against a real cluster (a controller and a node agent with --metrics-listen, one
cold start served): both /metrics expositions pass `promtool check metrics`, a real Prometheus
server on loopback with deploy/prometheus/prometheus.yml (only its target addresses changed)
scrapes both, and the Grafana dashboard asks only for series that exist."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import yaml
from cluster_fixtures import (
    ADMIN_KEY,
    INVOKE_KEY,
    Admin,
    free_port,
    start_controller,
    start_node,
)
from deploy_fixtures import DEPLOY, prometheus_tool

from stoke.children import Child

DASHBOARD = DEPLOY / "grafana" / "stoke.json"


@dataclass(frozen=True)
class Cluster:
    url: str
    metrics_url: str
    """The node agent's /metrics."""

    def controller_metrics(self) -> str:
        r = httpx.get(f"{self.url}/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 200, r.text
        return r.text

    def node_metrics(self) -> str:
        r = httpx.get(self.metrics_url)
        assert r.status_code == 200, r.text
        return r.text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("prom")
    grpc_port, metrics_port = free_port(), free_port()
    controller, url = start_controller(tmp / "controller", grpc_port)
    procs: list[Child] = [controller]
    try:
        listen = f"127.0.0.1:{metrics_port}"
        procs.append(start_node(tmp, "node-a", grpc_port, "--metrics-listen", listen))
        admin = Admin(url)
        admin.wait_for("the node", lambda: sum(n["alive"] for n in admin.nodes()) == 1)
        admin.deploy("hello", {"model": str(tiny_model_dir)})
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=INVOKE_KEY, max_retries=0)
        client.completions.create(model="hello", prompt="Once", max_tokens=4, temperature=0)
        yield Cluster(url, f"http://{listen}/metrics")
    finally:
        for proc in reversed(procs):
            proc.stop()


def _promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    promtool = prometheus_tool("promtool")
    return subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )


def test_both_expositions_pass_promtool_check_metrics(cluster: Cluster) -> None:
    for who, text in (
        ("controller", cluster.controller_metrics()),
        ("node", cluster.node_metrics()),
    ):
        out = _promtool_check(text)
        assert out.returncode == 0, f"{who}:\n{out.stdout}{out.stderr}"


def test_promtool_refuses_a_broken_exposition(cluster: Cluster) -> None:
    broken = cluster.node_metrics().replace(
        "# TYPE stoke_node_loads_total counter", "# TYPE stoke_node_loads_total nonsense"
    )
    assert _promtool_check(broken).returncode != 0


def test_node_metrics_count_the_cold_start_by_tier_and_phase(cluster: Cluster) -> None:
    samples = _samples(cluster.node_metrics())
    loads = {labels["tier"]: v for name, labels, v in samples if name == "stoke_node_loads_total"}
    assert sum(loads.values()) == 1, loads
    tier = next(iter(loads))
    counts = {
        labels["phase"]: v
        for name, labels, v in samples
        if name == "stoke_node_load_phase_seconds_count" and labels["tier"] == tier
    }
    assert counts["total"] == counts["fetch"] == counts["read_build"] == 1
    ready = [
        v for n, labels, v in samples if n == "stoke_node_instances" and labels["state"] == "ready"
    ]
    assert ready == [1]
    assert any(n == "stoke_node_tier_bytes" and v > 0 for n, _, v in samples)


def test_cold_start_histograms_span_100_ms_to_120_s(cluster: Cluster) -> None:
    from controller.metrics import COLD_START_BUCKETS as controller_buckets
    from node_agent.metrics import COLD_START_BUCKETS as node_buckets

    assert controller_buckets == node_buckets
    assert (node_buckets[0], node_buckets[-1]) == (0.1, 120)
    histograms = (
        (cluster.controller_metrics(), "stoke_instance_load_seconds_bucket"),
        (cluster.node_metrics(), "stoke_node_load_phase_seconds_bucket"),
    )
    for text, name in histograms:
        bounds = {labels["le"] for n, labels, _ in _samples(text) if n == name}
        assert bounds == {*(str(float(b)) for b in node_buckets), "+Inf"}


def test_a_real_prometheus_scrapes_the_cluster_with_the_deploy_config(
    cluster: Cluster, tmp_path: Path
) -> None:
    binary = prometheus_tool("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = {
        "stoke-controller": [cluster.url.removeprefix("http://")],
        "stoke-node": [cluster.metrics_url.removeprefix("http://").removesuffix("/metrics")],
    }
    for job in config["scrape_configs"]:  # the only change: where the targets are
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    key_file = tmp_path / config["scrape_configs"][0]["authorization"]["credentials_file"]
    key_file.parent.mkdir(parents=True)
    key_file.write_text(ADMIN_KEY)
    port = free_port()
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    api = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        up = _wait_for_series(server, api, "up == 1", 2, tmp_path / "prometheus.log")
        assert {r["metric"]["job"] for r in up} == set(targets)
        loads = _wait_for_series(
            server, api, "stoke_node_loads_total", 1, tmp_path / "prometheus.log"
        )
        assert loads[0]["metric"]["job"] == "stoke-node" and loads[0]["value"][1] == "1"
        starts = _wait_for_series(
            server, api, 'stoke_cold_starts_total{function="hello"}', 1, tmp_path / "prometheus.log"
        )
        assert starts[0]["metric"]["tier"] == loads[0]["metric"]["tier"]
    finally:
        server.terminate()
        server.wait(30)


def _wait_for_series(
    server: subprocess.Popen[bytes], api: str, query: str, count: int, log: Path
) -> list[dict[str, Any]]:
    """Poll Prometheus' query API until `query` returns `count` series (the first scrape comes
    within one scrape interval, 15 s)."""
    deadline = time.monotonic() + 90
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
        try:
            r = httpx.get(api, params={"query": query}, timeout=5)
            if r.status_code == 200:
                result = r.json()["data"]["result"]
                if len(result) >= count:
                    return result
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.2)  # polling interval, not synchronisation: the loop waits on the result
    raise AssertionError(
        f"no {count} series for {query!r} in time (last: {result})\n{log.read_text()[-3000:]}"
    )


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            name, labels, value = match.groups()
            out.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return out


def _series_names(text: str) -> set[str]:
    """Every series name the exposition can have: each family's, with a histogram's _bucket,
    _sum and _count (families with no sample yet count too)."""
    names = set()
    for kind_line in re.findall(r"^# TYPE (\S+) (\w+)$", text, flags=re.MULTILINE):
        name, kind = kind_line
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    names |= {name for name, _, _ in _samples(text)}
    return names


_NOT_METRICS = {
    "sum",
    "rate",
    "irate",
    "increase",
    "histogram_quantile",
    "by",
    "without",
    "le",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "count",
    "avg",
    "max",
    "min",
    "topk",
    "bottomk",
    "clamp_min",
    "clamp_max",
    "time",
    "vector",
    "scalar",
    "offset",
    "bool",
    "label_replace",
    "abs",
    "deriv",
    "delta",
    "avg_over_time",
    "max_over_time",
    "up",
}


def _expr_metric_names(expr: str) -> set[str]:
    """Names in a PromQL expression that are series: identifiers that are not functions,
    keywords, label names (inside {} or by/without (...)) or strings, or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables ($__rate_interval)
    words = set(re.findall(r"[a-zA-Z_:][\w:]*", expr))
    return {w for w in words if w not in _NOT_METRICS}


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query":  # label_values(SERIES, LABEL): SERIES must exist
            query = variable["query"]["query"]
            exprs.append(re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", query))
    return exprs


def test_the_grafana_dashboard_asks_only_for_series_that_exist(cluster: Cluster) -> None:
    known = _series_names(cluster.controller_metrics()) | _series_names(cluster.node_metrics())
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _dashboard_exprs(dashboard)
    assert len(exprs) >= 8
    for expr in exprs:
        names = _expr_metric_names(expr)
        assert names, f"no series in {expr!r}"
        assert names <= known, f"{expr!r}: no such series {sorted(names - known)}"
