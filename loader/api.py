"""`load_state_dict`: a stoke checkpoint to `{name: tensor}`, each a view of one buffer per
partition per device, tied weights under every name that refers to them (sharing storage)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from checkpoint_format import Manifest, read_manifest
from checkpoint_format.checksum import crc32_hex
from checkpoint_format.dtypes import to_torch
from checkpoint_format.errors import BadChunk, ChecksumMismatchError
from checkpoint_format.verify import check_partition_size, verify_checkpoint
from loader.arena import ArenaMap, Placement, read_placement
from loader.cpu import arena_partitions, map_partition, read_partitions
from loader.cuda import arena_to_device, check_cuda_device, read_partitions_cuda
from loader.errors import DeviceError, LoaderError
from loader.plan import DEFAULT_READ_SIZE, DEFAULT_THREADS, Strategy, choose_strategy
from loader.sysio import is_memory_fs, resident_fraction


@dataclass
class LoadedCheckpoint:
    """The result of a load: tensors, the buffers they view, and how each partition came in."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    buffers: dict[int, torch.Tensor]
    strategies: dict[int, Strategy] = field(default_factory=dict)
    direct: bool = False
    seconds: float = 0.0


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        check_cuda_device(dev)
    elif dev.type != "cpu":
        raise DeviceError(f"device {dev}: stoke loads onto 'cpu' or 'cuda:N' only.")
    return dev


def _strategies(
    root: Path, manifest: Manifest, parts: Sequence[int], cuda: bool, forced: Strategy | None
) -> tuple[dict[int, Strategy], dict[int, float]]:
    """Each partition's strategy, and the fraction of it already in memory."""
    chosen, resident = {}, {}
    for p in parts:
        path = root / manifest.partitions[p].file
        memfs = is_memory_fs(path)
        resident[p] = 1.0 if memfs else resident_fraction(path)
        if forced is not None:
            chosen[p] = Strategy.READ_BUFFERED if cuda and forced is Strategy.MAP else forced
        else:
            chosen[p] = choose_strategy(cuda=cuda, in_memory_fs=memfs, resident=resident[p])
    return chosen, resident


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a C-contiguous tensor of `shape`."""
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def bind_views(manifest: Manifest, buffers: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every stored tensor of the loaded partitions as a view of its partition's buffer.

    One typed view of each buffer per dtype, then one `as_strided` per tensor: a few
    microseconds each, which matters at hundreds of tensors per model.
    """
    typed: dict[tuple[int, str], torch.Tensor] = {}
    tensors = {}
    for name, e in manifest.tensors.items():
        if e.partition not in buffers:
            continue
        key = (e.partition, e.dtype)
        if key not in typed:
            typed[key] = buffers[e.partition].view(to_torch(e.dtype, where=f"tensor {name!r}"))
        base = typed[key]
        # as_strided's offset counts from the start of the storage, not of `base`: a buffer
        # may be a slice of a larger one (an extent of the DRAM arena's mapping)
        offset = base.storage_offset() + e.offset // base.element_size()
        tensors[name] = base.as_strided(e.shape, contiguous_strides(e.shape), offset)
    return tensors


def _verify_buffers(root: Path, manifest: Manifest, buffers: dict[int, torch.Tensor]) -> None:
    size = manifest.chunk_size
    jobs = [(p, i) for p in buffers for i in range(len(manifest.partitions[p].chunks))]

    def check(job: tuple[int, int]) -> BadChunk | None:
        p, i = job
        part = manifest.partitions[p]
        data: Any = buffers[p][i * size : min((i + 1) * size, part.nbytes)].numpy()
        actual = crc32_hex(data)
        if actual == part.chunks[i]:
            return None
        return BadChunk(part.file, i, i * size, i * size + len(data), part.chunks[i], actual)

    with ThreadPoolExecutor(max_workers=2) as pool:
        bad = [b for b in pool.map(check, jobs) if b is not None]
    if bad:
        raise ChecksumMismatchError(str(root), bad)


def load_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    partitions: Sequence[int] | None = None,
    strategy: Strategy | str | None = None,
    threads: int = DEFAULT_THREADS,
    read_size: int = DEFAULT_READ_SIZE,
    verify: bool = False,
    arena: ArenaMap | None = None,
) -> LoadedCheckpoint:
    """Load checkpoint `ckpt_dir` onto `device`; see `load_state_dict` for the arguments.

    Returns the tensors plus the per-partition buffers and strategies (for benchmarks/tests).
    """
    start = time.perf_counter()
    root, dev = Path(ckpt_dir), _device(device)
    manifest = read_manifest(root)
    placement = read_placement(root)
    if placement is not None:
        placement.check(manifest, str(root))
    count = len(manifest.partitions)
    parts = list(range(count)) if partitions is None else list(partitions)
    for p in parts:
        if not 0 <= p < count:
            raise LoaderError(
                f"{root}: partition {p} asked for, but it has {count} (0..{count - 1})."
            )
        if placement is None:
            check_partition_size(root, manifest.partitions[p])
    cuda = dev.type == "cuda"
    if placement is not None:
        buffers, chosen, direct = _from_arena(placement, parts, dev, arena, threads, read_size)
    else:
        forced = Strategy(strategy) if strategy is not None else None
        if verify and cuda:  # checks the files; bytes then go straight to GPU
            verify_checkpoint(root).raise_if_bad()
        chosen, resident = _strategies(root, manifest, parts, cuda, forced)
        buffers, direct = _fill(root, manifest, chosen, resident, dev, threads, read_size)
    if verify and (not cuda or placement is not None):
        _verify_buffers(root, manifest, buffers)
    tensors = bind_views(manifest, buffers)
    tensors.update({a: tensors[t] for a, t in manifest.aliases.items() if t in tensors})
    seconds = time.perf_counter() - start
    return LoadedCheckpoint(manifest, tensors, buffers, chosen, direct, seconds)


def _from_arena(
    placement: Placement,
    parts: list[int],
    dev: torch.device,
    arena: ArenaMap | None,
    threads: int,
    read_size: int,
) -> tuple[dict[int, torch.Tensor], dict[int, Strategy], bool]:
    """Partitions placed in a DRAM arena: views of it on the CPU (of `arena` itself when this
    process has it mapped); onto a GPU, copied straight from `arena` when this process pinned
    it, else read from the arena file through the pinned ring."""
    if dev.type == "cuda":
        if arena is not None and arena.pinned and arena.holds(placement):
            copied = arena_to_device(arena, placement, parts, dev)
            return copied, dict.fromkeys(parts, Strategy.READ_BUFFERED), False
        paths = dict.fromkeys(parts, placement.arena)
        sizes = {p: placement.sizes[p] for p in parts}
        bases = {p: placement.offsets[p] for p in parts}
        got, _ = read_partitions_cuda(
            paths, sizes, dev, direct=False, threads=threads, read_size=read_size, bases=bases
        )
        return got, dict.fromkeys(parts, Strategy.READ_BUFFERED), False
    return arena_partitions(placement, parts, arena), dict.fromkeys(parts, Strategy.MAP), False


def _fill(
    root: Path,
    manifest: Manifest,
    chosen: dict[int, Strategy],
    resident: dict[int, float],
    dev: torch.device,
    threads: int,
    read_size: int,
) -> tuple[dict[int, torch.Tensor], bool]:
    buffers: dict[int, torch.Tensor] = {}
    direct_used = False
    sizes = {p: manifest.partitions[p].nbytes for p in chosen}
    for kind in (Strategy.MAP, Strategy.READ_DIRECT, Strategy.READ_BUFFERED):
        paths = {p: root / manifest.partitions[p].file for p, s in chosen.items() if s is kind}
        if not paths:
            continue
        if kind is Strategy.MAP:
            for p, path in paths.items():
                # Fully cached: one populate call is fastest (no page-table lock contention).
                workers = 1 if resident[p] >= 1.0 else threads
                buffers[p] = map_partition(path, sizes[p], workers)
            continue
        direct = kind is Strategy.READ_DIRECT
        if dev.type == "cuda":
            got, _ = read_partitions_cuda(
                paths, sizes, dev, direct=direct, threads=threads, read_size=read_size
            )
            used = direct
        else:
            got, used = read_partitions(
                paths, sizes, direct=direct, threads=threads, read_size=read_size
            )
        buffers.update(got)
        direct_used = direct_used or used
    return buffers, direct_used


def load_state_dict(
    ckpt_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    partitions: Sequence[int] | None = None,
    strategy: Strategy | str | None = None,
    threads: int = DEFAULT_THREADS,
    read_size: int = DEFAULT_READ_SIZE,
    verify: bool = False,
    arena: ArenaMap | None = None,
) -> dict[str, torch.Tensor]:
    """Load a stoke checkpoint as `{name: tensor}` on `device` ("cpu" or "cuda:N").

    Each partition becomes one contiguous buffer on the device and every tensor is a view of
    it; tied weights come back under every name, as the same tensor. On the CPU, partitions are
    mapped, not copied: bytes already in memory (tmpfs/shm, cached pages) cost nothing, missing
    ones are prefetched with deep parallel reads first (see `loader.plan.choose_strategy`). On a
    GPU, reads (O_DIRECT when cold) stream through a bounded pinned ring. On the CPU every page
    is present (mapped in this process) when this returns.

    A checkpoint placed in a DRAM arena (`loader.arena`: the node's DRAM tier) is bound at
    offsets into the arena; pass `arena` (this process's `ArenaMap` of it, made once) and
    nothing is mapped or faulted at all. `strategy` does not apply to it.

    `strategy` forces "map", "read-direct" or "read-buffered"; `partitions` picks
    tensor-parallel ranks (default: all); `verify` checks every chunk checksum.
    Raises `CheckpointError` subclasses naming the file, tensor or chunk.
    """
    return load_checkpoint(
        ckpt_dir,
        device,
        partitions=partitions,
        strategy=strategy,
        threads=threads,
        read_size=read_size,
        verify=verify,
        arena=arena,
    ).tensors
