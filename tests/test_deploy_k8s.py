"""deploy/k8s: both overlays render with kustomize, every object is valid for the Kubernetes
versions we support (the API schemas, strict: an unknown field fails), every `stoke` container's
arguments parse with the real CLI and build a real configuration, and every Secret, ConfigMap
and port a manifest refers to exists."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_fixtures import (
    OVERLAYS,
    expand_env_refs,
    flag_value,
    parse_stoke,
    pod_specs,
    render_overlay,
    stoke_containers,
)

from controller.config import load_config
from node_agent.facts.units import parse_size
from stoke.commands.node import build_config

KUBERNETES_VERSIONS = ("1.31.0", "1.34.0", "1.37.0")
"""The oldest and newest we support, and one between (deploy/README.md says the same)."""

SAMPLE_ENV = {"POD_IP": "10.1.2.3", "NODE_NAME": "gpu-node-1"}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return request.param, render_overlay(request.param, tmp_path_factory.mktemp("k8s"))


def _named(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _daemonset(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return _named(objects, "DaemonSet")["stoke-node"]


def test_every_object_is_valid_against_the_api_schemas_strictly(rendered: Any) -> None:
    _, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert {
        "Deployment",
        "DaemonSet",
        "Service",
        "Secret",
        "ConfigMap",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "ServiceAccount",
        "Ingress",
    } <= kinds
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_refuses_an_unknown_field(rendered: Any) -> None:
    _, objects = rendered
    broken = yaml.safe_load(yaml.safe_dump(_daemonset(objects)))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolice"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_stoke_container_passes_flags_the_cli_has(
    rendered: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, objects = rendered
    monkeypatch.setenv("STOKE_SECRET", "a-secret-for-the-test")
    seen = set()
    for _, spec in pod_specs(objects):
        for container in stoke_containers(spec):
            argv = expand_env_refs(container["args"], SAMPLE_ENV)
            args = parse_stoke(argv)
            seen.add(args.command)
            if args.command == "node":
                build_config(args)  # sizes, secret, heartbeat: what `stoke node` checks first
    assert seen == {"controller", "node"}


def test_the_controller_config_map_is_a_valid_controller_config(
    rendered: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, objects = rendered
    text = _named(objects, "ConfigMap")["stoke-controller"]["data"]["controller.yaml"]
    (tmp_path / "controller.yaml").write_text(text)
    for name, value in _named(objects, "Secret")["stoke-keys"]["data"].items():
        monkeypatch.setenv(name, base64.b64decode(value).decode())  # as the pod's env has them
    load_config(tmp_path / "controller.yaml", {}).check_ready()


def test_every_secret_and_config_key_referenced_exists(rendered: Any) -> None:
    _, objects = rendered
    secrets = {n: set(o.get("data", {})) for n, o in _named(objects, "Secret").items()}
    maps = {n: set(o.get("data", {})) for n, o in _named(objects, "ConfigMap").items()}
    refs = 0
    for where, spec in pod_specs(objects):
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                for kind, known in (("secretKeyRef", secrets), ("configMapKeyRef", maps)):
                    if kind in ref:
                        name, key = ref[kind]["name"], ref[kind]["key"]
                        assert key in known.get(name, ()), f"{where}: {kind} {name}/{key}"
                        refs += 1
        for volume in spec.get("volumes", []):
            for kind, known, field in (
                ("secret", secrets, "secretName"),
                ("configMap", maps, "name"),
            ):
                if kind in volume:
                    name = volume[kind][field]
                    for item in volume[kind].get("items", []):
                        assert item["key"] in known.get(name, ()), f"{where}: {name}/{item}"
                        refs += 1
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in _named(objects, "PersistentVolumeClaim"), f"{where}: {claim}"
    assert refs >= 5


def test_services_probes_and_policies_name_ports_that_exist(rendered: Any) -> None:
    _, objects = rendered
    workloads = dict(pod_specs(objects))
    ports = {
        where: {
            (p.get("name"), p["containerPort"])
            for c in spec["containers"]
            for p in c.get("ports", [])
        }
        for where, spec in workloads.items()
    }
    controller = ports["Deployment/stoke-controller"]
    for name, service in _named(objects, "Service").items():
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in {n for n, _ in controller}, f"Service {name}: {port}"
    for where, spec in workloads.items():
        for c in spec["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                action = c[probe].get("httpGet") or c[probe].get("tcpSocket")
                assert action["port"] in {n for n, _ in ports[where]}, f"{where} {probe}"
            if "httpGet" in c["readinessProbe"]:
                assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    node_ports = {n: p for n, p in ports["DaemonSet/stoke-node"]}
    policy = _named(objects, "NetworkPolicy")["stoke-node-agent"]["spec"]
    from_controller = policy["ingress"][0]
    assert (
        from_controller["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        == "controller"
    )
    assert [p["port"] for p in from_controller["ports"]] == [node_ports["grpc"]]


def test_node_agents_drain_within_their_grace_period_and_size_the_dram_tier(
    rendered: Any,
) -> None:
    overlay, objects = rendered
    spec = _daemonset(objects)["spec"]["template"]["spec"]
    agent = next(c for c in spec["containers"] if c["name"] == "node-agent")
    args = agent["args"]
    assert flag_value(args, "--preemption") == "sigterm"
    assert float(flag_value(args, "--preemption-grace")) == spec["terminationGracePeriodSeconds"]
    dram = next(v for v in spec["volumes"] if v["name"] == "dram-tier")["emptyDir"]
    assert dram["medium"] == "Memory"
    tier = parse_size(flag_value(args, "--dram-cache"))
    assert parse_size(dram["sizeLimit"].replace("Gi", "GiB")) == tier
    mount = next(m for m in agent["volumeMounts"] if m["name"] == "dram-tier")
    assert mount["mountPath"] == flag_value(args, "--dram-dir")
    limit = parse_size(agent["resources"]["limits"]["memory"].replace("Gi", "GiB"))
    assert limit >= tier + parse_size(flag_value(args, "--cpu-memory")), "the tier counts"
    if overlay == "gpu":
        assert agent["resources"]["limits"]["nvidia.com/gpu"]
        assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
        assert agent["image"].endswith(":cuda")
    else:
        assert agent["image"].endswith(":cpu")


def test_the_prometheus_scrape_config_finds_ports_and_the_key_that_exist(rendered: Any) -> None:
    _, objects = rendered
    config = yaml.safe_load(
        _named(objects, "ConfigMap")["stoke-prometheus"]["data"]["prometheus.yml"]
    )
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    port_names = {
        "stoke-controller": "Deployment/stoke-controller",
        "stoke-node": "DaemonSet/stoke-node",
    }
    workloads = dict(pod_specs(objects))
    for job, where in port_names.items():
        keep = next(r for r in jobs[job]["relabel_configs"] if r.get("action") == "keep")
        assert keep["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]
        names = {p["name"] for c in workloads[where]["containers"] for p in c["ports"]}
        assert keep["regex"] in names, f"{job}: no port named {keep['regex']} in {where}"
    key_file = Path(jobs["stoke-controller"]["authorization"]["credentials_file"])
    secret_name, key = key_file.parts[-2:]
    assert key in _named(objects, "Secret")[secret_name]["data"]
