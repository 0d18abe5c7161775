"""Session-wide fixtures shared by the test modules."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stoke.demo_model import make_demo_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama demo model (seed 0), built once per session. Do not modify it;
    copy it (shutil.copytree) to change files."""
    return make_demo_model(tmp_path_factory.mktemp("tiny-llama"), size="tiny", arch="llama", seed=0)


# -- checkpoint store fixtures (node_agent.store) -------------------------------------------------


@pytest.fixture(scope="session")
def tiny_ckpt_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_model_dir` converted to a stoke checkpoint with 64 KiB chunks (21 chunks), so
    downloads have many parts. Do not modify it; copy it to change files."""
    from checkpoint_format import convert_hf

    out = tmp_path_factory.mktemp("tiny-ckpt") / "ckpt"
    convert_hf(tiny_model_dir, out, chunk_size=64 << 10, progress=False)
    return out


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto's server mode) on a free 127.0.0.1 port."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the loopback server; the AWS environment points only there (fake
    credentials, no config files, no instance metadata), for this process and children."""
    import uuid

    import boto3

    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """`make_store(**overrides)` -> an opened `CheckpointStore` with a disk tier under tmp_path
    and a DRAM tier in a fresh /dev/shm directory (both 64 MiB unless overridden). Stores are
    closed and the DRAM directories removed at teardown. `make_store(node_id=same)` reopens."""
    import shutil
    import uuid

    from node_agent.store import CheckpointStore, FetchConfig, StoreConfig

    node = f"test-{uuid.uuid4().hex[:12]}"
    stores: list[Any] = []
    roots: set[Path] = set()

    def build(**overrides: Any) -> Any:
        fields: dict[str, Any] = {
            "node_id": node,
            "disk_dir": tmp_path / "disk",
            "disk_budget": 64 << 20,
            "dram_budget": 64 << 20,
            "fetch": FetchConfig(part_size=128 << 10, concurrency=4),
        }
        config = StoreConfig(**(fields | overrides))
        roots.add(config.dram_root)  # before opening: a store that fails to open made it too
        store = CheckpointStore(config).open()
        stores.append(store)
        return store

    yield build
    for store in stores:
        store.close()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ~96M-parameter demo model (seed 0), for tests where load time must be visible."""
    return make_demo_model(tmp_path_factory.mktemp("small-llama"), size="small", seed=0)
