"""Helpers for the tests of deploy/: rendering the Kubernetes overlays, finding the containers
that run `stoke`, parsing their arguments with the real CLI, and getting Prometheus' tools."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from stoke.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")

PROMETHEUS_HOW = (
    "install Debian's prometheus package (`apt-get install prometheus`, which provides "
    "promtool and prometheus) or put both on PATH"
)


def render_overlay(overlay: str, tmp: Path, k8s: Path = DEPLOY / "k8s") -> list[dict[str, Any]]:
    """`kubectl kustomize` of deploy/k8s/overlays/OVERLAY, from a copy of `k8s` whose keys.env
    is the example's (the real one is never committed): the rendered objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: it renders the kustomize overlays (install kubectl)")
    work = tmp / f"k8s-{overlay}"
    shutil.copytree(k8s, work, ignore=shutil.ignore_patterns("keys.env"))
    shutil.copy(work / "base" / "keys.env.example", work / "base" / "keys.env")
    out = subprocess.run(
        [kubectl, "kustomize", str(work / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"kustomize failed for {overlay}:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(KIND/NAME, pod spec) of every workload."""
    for obj in objects:
        spec = obj.get("spec", {}).get("template", {}).get("spec")
        if spec is not None:
            yield f"{obj['kind']}/{obj['metadata']['name']}", spec


def stoke_containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Containers (init ones too) that run the image's entrypoint, `stoke`."""
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        if container.get("command") in (None, ["stoke"]):
            yield container


def parse_stoke(argv: list[str]) -> argparse.Namespace:
    """`argv` parsed by the real `stoke` parser; an AssertionError quoting argparse's message
    when it refuses them (an unknown flag, a bad choice, a missing value), or naming a flag
    that is only a prefix of a real one (argparse takes `--slot` for `--slots`; a manifest
    should not rely on that)."""
    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"stoke {' '.join(argv)}:\n{err.getvalue()}") from None
    command = _subparser(parser, args.command)
    known = {flag for action in command._actions for flag in action.option_strings}
    for token in argv[1:]:
        flag = token.split("=", 1)[0]
        assert not flag.startswith("--") or flag in known, (
            f"stoke {args.command}: {flag} is not a flag of its own (only a prefix of one)"
        )
    return args


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("the stoke parser has no subcommands")


def expand_env_refs(argv: list[str], values: dict[str, str]) -> list[str]:
    """Kubernetes' `$(VAR)` expansion in container args, with `values` standing in."""
    return [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], arg) for arg in argv]


def flag_value(argv: list[str], flag: str) -> str:
    """The value after `flag` in `argv` (its last occurrence)."""
    at = len(argv) - 1 - argv[::-1].index(flag)
    return argv[at + 1]


def prometheus_tool(name: str) -> str:
    """The path of `promtool` or `prometheus`. Where it is missing and this runs as root with
    apt-get (a fresh CI machine), Debian's prometheus package is installed first; otherwise
    (or if that fails) the test is skipped, saying how to get it. STOKE_TEST_NO_APT=1 turns the
    install off."""
    found = shutil.which(name)
    if found is None and _can_apt():
        _apt_install("prometheus")
        found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found: {PROMETHEUS_HOW}")
    return found


def _can_apt() -> bool:
    return (
        os.geteuid() == 0
        and shutil.which("apt-get") is not None
        and os.environ.get("STOKE_TEST_NO_APT") != "1"
    )


@functools.cache  # tried once per session, however many tests ask
def _apt_install(package: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        if subprocess.run(install, env=env, capture_output=True, timeout=180).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=180)
            subprocess.run(install, env=env, capture_output=True, timeout=180)
