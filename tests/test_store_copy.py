"""`copy_checkpoint` (disk -> DRAM promotion, local imports): byte-exact copies whether the
source is cached (sendfile) or not (O_DIRECT reads through a buffer), truncated sources, tails
that are not a multiple of 4096, and the fallback where sendfile is refused."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from checkpoint_format import MANIFEST_NAME, Manifest, read_manifest
from loader.sysio import evict_from_page_cache, resident_fraction
from node_agent.store import ShortFileError
from node_agent.store.copy import CopyResult, copy_checkpoint

PART = "partition-00000.bin"


@pytest.fixture
def src(tiny_ckpt_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint on a real disk (tmp_path), free to change."""
    return Path(shutil.copytree(tiny_ckpt_dir, tmp_path / "src"))


def set_cache(path: Path, *, cached: bool) -> None:
    if cached:
        path.read_bytes()
    else:
        evict_from_page_cache(path)


def copy(src: Path, dst: Path, manifest: Manifest | None = None, **overrides: Any) -> CopyResult:
    dst.mkdir(exist_ok=True)
    options = {"threads": 3, "read_size": 64 << 10, "verify": False, "durable": False}
    return copy_checkpoint(
        src,
        dst,
        manifest or read_manifest(src),
        (src / MANIFEST_NAME).read_bytes(),
        **(options | overrides),
    )


def spy_sendfile(monkeypatch: pytest.MonkeyPatch, fails: int | None = None) -> list[int]:
    """Count os.sendfile calls; with `fails`, every call raises OSError(fails) instead."""
    calls: list[int] = []
    real: Callable[..., int] = os.sendfile

    def spy(*args: Any) -> int:
        calls.append(args[3])
        if fails is not None:
            raise OSError(fails, os.strerror(fails))
        return real(*args)

    monkeypatch.setattr(os, "sendfile", spy)
    return calls


def direct_reads_work(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("verify", [True, False])
def test_copy_is_byte_exact(src: Path, tmp_path: Path, cached: bool, verify: bool) -> None:
    set_cache(src / PART, cached=cached)
    copy(src, tmp_path / "dst", verify=verify)
    assert (tmp_path / "dst" / PART).read_bytes() == (src / PART).read_bytes()
    assert (tmp_path / "dst" / MANIFEST_NAME).read_bytes() == (src / MANIFEST_NAME).read_bytes()


def test_an_unverified_copy_of_a_cached_source_moves_bytes_in_the_kernel(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_cache(src / PART, cached=True)
    calls = spy_sendfile(monkeypatch)
    result = copy(src, tmp_path / "dst")
    assert not result.direct
    assert sum(calls) == (src / PART).stat().st_size
    assert (tmp_path / "dst" / PART).read_bytes() == (src / PART).read_bytes()


def test_a_verified_or_cold_copy_reads_through_a_buffer(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_sendfile(monkeypatch)
    set_cache(src / PART, cached=True)
    copy(src, tmp_path / "verified", verify=True)
    set_cache(src / PART, cached=False)
    copy(src, tmp_path / "cold")
    assert calls == []


def test_a_refused_sendfile_falls_back_to_reads(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_cache(src / PART, cached=True)
    calls = spy_sendfile(monkeypatch, fails=errno.EINVAL)
    copy(src, tmp_path / "dst", threads=1)
    assert len(calls) == 1  # refused once, then never tried again
    assert (tmp_path / "dst" / PART).read_bytes() == (src / PART).read_bytes()


def test_a_cold_copy_reads_direct_and_leaves_no_page_cache_copy(src: Path, tmp_path: Path) -> None:
    if not direct_reads_work(src / PART):
        pytest.skip("the file system under tmp_path refuses O_DIRECT")
    set_cache(src / PART, cached=False)
    assert copy(src, tmp_path / "dst").direct
    assert resident_fraction(src / PART) < 0.5
    assert (tmp_path / "dst" / PART).read_bytes() == (src / PART).read_bytes()


@pytest.mark.parametrize("cached", [True, False])
def test_a_source_truncated_mid_page_is_a_short_file_error(
    src: Path, tmp_path: Path, cached: bool
) -> None:
    # Ends at an offset an O_DIRECT read cannot start at: the end must still be recognised.
    os.truncate(src / PART, 3 * 65536 + 1000)
    set_cache(src / PART, cached=cached)
    with pytest.raises(ShortFileError, match=r"partition-00000\.bin: ended at byte"):
        copy(src, tmp_path / "dst")
    assert not (tmp_path / "dst" / MANIFEST_NAME).exists()


@pytest.mark.parametrize("cached", [True, False])
def test_a_partition_whose_length_is_not_a_multiple_of_4096_is_copied_whole(
    src: Path, tmp_path: Path, cached: bool
) -> None:
    # SPEC.md forbids such a partition, but the copy must not depend on it: the tail of a
    # direct read is read as a whole page and cut.
    nbytes = (src / PART).stat().st_size - 100
    os.truncate(src / PART, nbytes)
    manifest = read_manifest(src)
    first = dataclasses.replace(manifest.partitions[0], nbytes=nbytes)
    odd = dataclasses.replace(manifest, partitions=(first,))
    set_cache(src / PART, cached=cached)
    copy(src, tmp_path / "dst", odd, read_size=1 << 20)
    assert (tmp_path / "dst" / PART).read_bytes() == (src / PART).read_bytes()
