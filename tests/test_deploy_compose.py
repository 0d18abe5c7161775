"""deploy/compose.yaml: valid against the Compose specification's JSON schema, its `stoke`
services pass flags the CLI has, every ${VARIABLE} it reads is in deploy/env.example, and the
Prometheus it runs scrapes services and ports that exist there."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_fixtures import DEPLOY, flag_value, parse_stoke

from stoke.commands.node import build_config

COMPOSE = DEPLOY / "compose.yaml"


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    if tool is None:
        pytest.skip("check-jsonschema not found: it comes with the dev extra")
    return subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    out = _check_jsonschema(COMPOSE)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_schema_check_refuses_a_broken_compose_file(tmp_path: Path) -> None:
    broken = _compose()
    broken["services"]["controller"]["restart_policy"] = "always"  # not a service key
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    out = _check_jsonschema(tmp_path / "compose.yaml")
    assert out.returncode != 0 and "restart_policy" in out.stdout + out.stderr


def test_the_cluster_has_a_controller_two_nodes_minio_and_prometheus() -> None:
    services = _compose()["services"]
    commands = {name: s.get("command", [None])[0] for name, s in services.items()}
    assert sorted(commands.values(), key=str).count("node") == 2
    assert "controller" in commands.values()
    assert any(s["image"].startswith("minio/") for s in services.values())
    assert any(s["image"].startswith("prom/prometheus") for s in services.values())


def test_every_stoke_service_passes_flags_the_cli_has(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOKE_SECRET", "a-secret-for-the-test")
    services = _compose()["services"]
    seen = []
    for name, service in services.items():
        if service.get("image", "").startswith("stoke"):
            args = parse_stoke(service["command"])
            seen.append(args.command)
            if args.command == "node":
                build_config(args)
                assert flag_value(service["command"], "--advertise") == f"{name}:7071"
                grace = float(flag_value(service["command"], "--preemption-grace"))
                assert service["stop_grace_period"] == f"{grace:.0f}s"
    assert sorted(seen) == ["controller", "node", "node"]


def test_every_variable_it_reads_is_in_the_example_env_file() -> None:
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    used |= {s["environment"] for s in _compose().get("secrets", {}).values()}
    example = (DEPLOY / "env.example").read_text()
    known = set(re.findall(r"^(\w+)=", example, flags=re.MULTILINE))
    assert used and used <= known, f"not in deploy/env.example: {sorted(used - known)}"


def test_prometheus_scrapes_the_compose_services_on_their_ports() -> None:
    compose = _compose()
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    services = compose["services"]
    for job in config["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            host, port = target.rsplit(":", 1)
            command = services[host]["command"]
            listen = "--metrics-listen" if command[0] == "node" else "--listen"
            assert flag_value(command, listen).endswith(f":{port}"), f"{job['job_name']}: {target}"
    prometheus = next(s for s in services.values() if s["image"].startswith("prom/"))
    key = config["scrape_configs"][0]["authorization"]["credentials_file"]
    assert prometheus["secrets"][0]["target"] == f"/etc/prometheus/{key}"
    assert prometheus["configs"][0]["target"] == "/etc/prometheus/prometheus.yml"
