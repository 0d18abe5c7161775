"""A copy or a download that fails part-way closes every descriptor it opened: the store
retries fills, and a node that leaked one per failure would run out of descriptors.

"Full" here is a file smaller than the file system holding it cannot be: on tmpfs,
`posix_fallocate` beyond the file system's size fails at once with ENOSPC (nothing allocated),
which is what a tier whose budget exceeds its file system meets."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpoint_format import MANIFEST_NAME, Manifest, read_manifest
from node_agent.store import NoRoomError
from node_agent.store.copy import copy_checkpoint
from node_agent.store.s3fetch import _open_files


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A private directory on /dev/shm (tmpfs with a size limit, as by default)."""
    stat = os.statvfs("/dev/shm")
    if stat.f_blocks == 0:
        pytest.skip("/dev/shm has no size limit here")
    path = Path(tempfile.mkdtemp(prefix="stoke-test-fds-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def larger_than_fs(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_blocks * stat.f_frsize + 4096


def _copy(src: Path, dst: Path, manifest: Manifest) -> None:
    copy_checkpoint(
        src, dst, manifest, (src / MANIFEST_NAME).read_bytes(),
        threads=2, read_size=1 << 20, verify=False, durable=False,
    )  # fmt: skip


def test_copy_onto_a_full_file_system_closes_every_descriptor(
    tiny_ckpt_dir: Path, shm_dir: Path
) -> None:
    manifest = read_manifest(tiny_ckpt_dir)
    first = manifest.partitions[0]
    claimed = dataclasses.replace(
        manifest, partitions=(dataclasses.replace(first, nbytes=larger_than_fs(shm_dir)),)
    )
    before = open_fds()
    with pytest.raises(NoRoomError, match="file system holding it is full"):
        _copy(tiny_ckpt_dir, shm_dir, claimed)
    assert open_fds() == before


def test_copy_to_a_destination_that_vanished_closes_every_descriptor(
    tiny_ckpt_dir: Path, tmp_path: Path
) -> None:
    before = open_fds()
    with pytest.raises(FileNotFoundError):
        _copy(tiny_ckpt_dir, tmp_path / "removed-meanwhile", read_manifest(tiny_ckpt_dir))
    assert open_fds() == before


def test_download_staging_on_a_full_file_system_closes_every_descriptor(shm_dir: Path) -> None:
    # The first file fits and is open when the second one does not.
    sizes = {"partition-00000.bin": 1 << 20, "partition-00001.bin": larger_than_fs(shm_dir)}
    before = open_fds()
    with pytest.raises(NoRoomError, match="file system holding it is full"):
        _open_files(shm_dir, sizes)
    assert open_fds() == before
