"""The layers hold at run time: the controller reaches the node agent only through its wire
contract and its torch-free facts (import-linter checks the imports; this checks what loads)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

# Every controller module, including ones added later: walked, not listed.
_IMPORT_ALL = """
import importlib, json, pkgutil, sys
import controller
import controller.server
for info in pkgutil.walk_packages(controller.__path__, "controller."):
    importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def _modules_loaded_by_the_controller() -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def test_importing_the_controller_does_not_import_torch() -> None:
    loaded = _modules_loaded_by_the_controller()
    assert "controller.server" in loaded
    assert not [m for m in loaded if m == "torch" or m.startswith("torch.")]


def test_the_controller_loads_only_the_node_agents_public_contract() -> None:
    public = ("node_agent.proto", "node_agent.auth", "node_agent.facts")
    ours = [m for m in _modules_loaded_by_the_controller() if m.startswith("node_agent.")]
    assert ours and all(m.startswith(public) for m in ours), ours


def test_the_import_contract_forbids_every_private_part_of_the_node_agent() -> None:
    import node_agent

    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    (public_only,) = [c for c in contracts if c["name"].startswith("Above the node agent")]
    private = {
        f"node_agent.{info.name}"
        for info in pkgutil.iter_modules(node_agent.__path__)
        if info.name not in ("proto", "auth", "facts")
    }
    assert set(public_only["forbidden_modules"]) == private
