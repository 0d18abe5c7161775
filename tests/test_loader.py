"""loader: round trips on every path, zero copy, residency, RSS bound, and device errors."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint_format as cf
from loader import DeviceError, LoaderError, Strategy, load_checkpoint, load_state_dict
from loader.sysio import (
    evict_from_page_cache,
    is_memory_fs,
    open_read,
    present_pages,
    resident_fraction,
    resident_pages,
)

REPO = Path(__file__).resolve().parents[1]
PATHS = [Strategy.MAP, Strategy.READ_DIRECT, Strategy.READ_BUFFERED]


def all_dtypes_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(33, 70, generator=gen)
    sd = {f"w.{d}": base.to(getattr(torch, d)) for d in cf.dtypes.FLOATING}
    sd |= {f"i.{d}": (base * 50).to(getattr(torch, d)) for d in ("int64", "int32", "int16")}
    sd |= {"i.int8": (base * 20).to(torch.int8), "u8": (base * 20).abs().to(torch.uint8)}
    sd |= {"mask": base > 0, "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 5)}
    sd["tied"] = sd["w.bfloat16"]
    return sd


def supports_direct(path: Path) -> bool:
    fd, direct = open_read(path, direct=True)
    os.close(fd)
    return direct


def mapped_file_of(address: int) -> str:
    """The path /proc/self/maps shows for the mapping containing `address` ('' if anonymous)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 else ""
    raise AssertionError(f"address {address:#x} is not mapped")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = all_dtypes_state_dict()
    out = tmp_path_factory.mktemp("loader") / "ckpt"
    cf.write_checkpoint(sd, out, chunk_size=8192)
    return out, sd


@pytest.mark.parametrize("strategy", PATHS, ids=lambda s: s.value)
def test_round_trip_every_dtype(ckpt: tuple[Path, dict], strategy: Strategy) -> None:
    path, sd = ckpt
    got = load_state_dict(path, strategy=strategy, verify=True)
    assert got.keys() == sd.keys()
    for name, want in sd.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert torch.equal(got[name], want), name


@pytest.mark.parametrize("strategy", PATHS, ids=lambda s: s.value)
def test_tensors_view_one_buffer_and_tied_share_storage(
    ckpt: tuple[Path, dict], strategy: Strategy
) -> None:
    result = load_checkpoint(ckpt[0], strategy=strategy)
    base = result.buffers[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in result.tensors.values())
    assert result.tensors["tied"].data_ptr() == result.tensors["w.bfloat16"].data_ptr()


def test_direct_path_uses_o_direct_where_supported(ckpt: tuple[Path, dict]) -> None:
    if not supports_direct(ckpt[0] / "partition-00000.bin"):
        pytest.skip(f"{ckpt[0]} is on a file system without O_DIRECT")
    assert load_checkpoint(ckpt[0], strategy=Strategy.READ_DIRECT).direct


def test_tmpfs_loads_on_every_path(ckpt: tuple[Path, dict]) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not is_memory_fs(shm):
        pytest.skip("no tmpfs at /dev/shm")
    out = Path(shm) / f"stoke-test-{os.getpid()}"
    try:
        cf.write_checkpoint(ckpt[1], out)
        for strategy in PATHS:
            result = load_checkpoint(out, strategy=strategy)
            assert torch.equal(result.tensors["w.float32"], ckpt[1]["w.float32"])
        # Linux < 6.6 tmpfs refuses O_DIRECT; then the read is buffered instead.
        direct = load_checkpoint(out, strategy=Strategy.READ_DIRECT).direct
        assert direct == supports_direct(out / "partition-00000.bin")
        assert load_checkpoint(out).strategies == {0: Strategy.MAP}  # the DRAM tier is mapped
    finally:
        for f in out.iterdir():
            f.unlink()
        out.rmdir()


def test_warm_load_maps_the_file_zero_copy(ckpt: tuple[Path, dict]) -> None:
    path = ckpt[0]
    os.listdir(path)
    result = load_checkpoint(path)  # just written, so its pages are cached
    assert result.strategies == {0: Strategy.MAP}
    backing = mapped_file_of(result.tensors["w.float32"].data_ptr())
    assert backing == str((path / "partition-00000.bin").resolve())


def test_cold_load_prefetches_and_maps(ckpt: tuple[Path, dict]) -> None:
    part = ckpt[0] / "partition-00000.bin"
    if is_memory_fs(part):
        pytest.skip("tmpfs pages cannot be evicted")
    evict_from_page_cache(part)
    assert resident_fraction(part) < 0.5
    result = load_checkpoint(ckpt[0])
    assert result.strategies == {0: Strategy.MAP}
    assert torch.equal(result.tensors["w.float32"], ckpt[1]["w.float32"])
    buffer = result.buffers[0]
    assert present_pages(buffer.data_ptr(), buffer.numel())[0] == buffer.numel() // 4096


def test_direct_reads_land_in_anonymous_memory(ckpt: tuple[Path, dict]) -> None:
    result = load_checkpoint(ckpt[0], strategy=Strategy.READ_DIRECT)
    assert mapped_file_of(result.tensors["w.float32"].data_ptr()) == ""


def test_open_falls_back_when_o_direct_is_refused(
    ckpt: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refuse_direct(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    result = load_checkpoint(ckpt[0], strategy=Strategy.READ_DIRECT)
    assert not result.direct and torch.equal(result.tensors["u8"], ckpt[1]["u8"])


def test_read_falls_back_when_a_direct_read_is_refused(
    ckpt: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_preadv = os.preadv
    direct_fds: set[int] = set()

    def refuse_direct_reads(fd: int, buffers: list, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_fds.add(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", refuse_direct_reads)
    result = load_checkpoint(ckpt[0], strategy=Strategy.READ_DIRECT)
    assert not result.direct and torch.equal(result.tensors["mask"], ckpt[1]["mask"])
    assert direct_fds or not supports_direct(ckpt[0] / "partition-00000.bin")


@pytest.mark.parametrize("strategy", PATHS, ids=lambda s: s.value)
def test_every_page_is_present_after_load(big_ckpt: Path, strategy: Strategy) -> None:
    buffer = load_checkpoint(big_ckpt, strategy=strategy).buffers[0]
    resident, total = resident_pages(buffer.data_ptr(), buffer.numel())
    assert resident == total  # in memory (page cache or anonymous)
    assert present_pages(buffer.data_ptr(), buffer.numel()) == (total, total)  # and mapped here
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer.amax()  # reads every byte (no temporary copy); must not fault pages in now
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < total // 100, (faults, total)


def test_partitions_load_alone(tmp_path: Path) -> None:
    sd = {f"w{i}": torch.full((4,), float(i)) for i in range(4)}
    cf.write_checkpoint(sd, tmp_path / "c", partition_of=lambda n: int(n[1]) % 2)
    got = load_state_dict(tmp_path / "c", partitions=[1])
    assert sorted(got) == ["w1", "w3"] and torch.equal(got["w3"], sd["w3"])


def test_missing_partition_index_is_a_typed_error(ckpt: tuple[Path, dict]) -> None:
    with pytest.raises(LoaderError, match="partition 3 asked for"):
        load_state_dict(ckpt[0], partitions=[3])


def test_cuda_without_a_gpu_is_a_typed_error(ckpt: tuple[Path, dict]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        load_state_dict(ckpt[0], device="cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("strategy", [Strategy.READ_DIRECT, Strategy.READ_BUFFERED])
def test_cuda_round_trip(ckpt: tuple[Path, dict], strategy: Strategy) -> None:
    got = load_state_dict(ckpt[0], device="cuda:0", strategy=strategy)
    assert all(torch.equal(got[n].cpu(), t) for n, t in ckpt[1].items())


_RSS_CHILD = """
import json, sys
from loader import load_checkpoint
from loader.sysio import evict_from_page_cache
def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024
path, strategy, cold = sys.argv[1], sys.argv[2], sys.argv[3] == "cold"
if cold:
    evict_from_page_cache(path + "/partition-00000.bin")
before = hwm()
result = load_checkpoint(path, strategy=strategy)
print(json.dumps({"growth": hwm() - before, "bytes": result.manifest.total_bytes}))
"""


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rss") / "ckpt"
    cf.write_checkpoint({f"w{i}": torch.ones(8 << 20) for i in range(4)}, out)  # 128 MiB
    return out


@pytest.mark.parametrize(
    ("strategy", "cache"), [("read-direct", "cold"), ("map", "cold"), ("map", "warm")]
)
def test_peak_rss_growth_is_one_copy(big_ckpt: Path, strategy: str, cache: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(big_ckpt), strategy, cache],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    report = json.loads(out.stdout)
    assert report["bytes"] == 128 << 20
    assert report["growth"] <= report["bytes"] * 1.1 + (64 << 20), report
    assert report["growth"] >= report["bytes"] * 0.9, report  # every page really is resident
