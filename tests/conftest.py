"""Session-wide fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from stoke.demo_model import make_demo_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama demo model (seed 0), built once per session. Do not modify it;
    copy it (shutil.copytree) to change files."""
    return make_demo_model(tmp_path_factory.mktemp("tiny-llama"), size="tiny", arch="llama", seed=0)
