"""Write a checkpoint: plan the layout, stream tensor bytes in order, write the manifest last.

`CheckpointWriter` is the streaming core (used by `convert`, which never holds a whole model in
memory); `write_checkpoint` writes a state dict in one call and stores tied weights once.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from checkpoint_format.checksum import ChunkHasher, crc32_hex
from checkpoint_format.dtypes import FLOATING, from_torch, to_torch
from checkpoint_format.errors import LayoutError, OutputExistsError
from checkpoint_format.layout import TensorSpec, plan_layout
from checkpoint_format.manifest import (
    ALIGNMENT,
    DEFAULT_CHUNK_SIZE,
    MANIFEST_NAME,
    MAX_CHUNK_SIZE,
    FileEntry,
    Manifest,
    PartitionEntry,
)
from checkpoint_format.names import check_name

if TYPE_CHECKING:
    import torch


def partition_file_name(index: int) -> str:
    """The file name of partition `index`, e.g. `partition-00000.bin`."""
    return f"partition-{index:05d}.bin"


class _PartitionFile:
    """One partition being written sequentially, hashed as it goes."""

    def __init__(self, path: Path, nbytes: int, chunk_size: int) -> None:
        self.path, self.nbytes = path, nbytes
        self._file = open(path, "wb")  # noqa: SIM115 (closed in finish/close)
        self._hasher = ChunkHasher(chunk_size)
        self._pos = 0

    def write_at(self, offset: int, data: memoryview) -> None:
        if offset < self._pos:
            raise ValueError(f"{self.path.name}: write at {offset} behind cursor {self._pos}")
        self._pad(offset - self._pos)
        self._file.write(data)
        self._hasher.update(data)
        self._pos += len(data)

    def finish(self, fsync: bool) -> PartitionEntry:
        self._pad(self.nbytes - self._pos)
        self._file.flush()
        if fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        return PartitionEntry(self.path.name, self.nbytes, self._hasher.finish())

    def close(self) -> None:
        self._file.close()

    def _pad(self, count: int) -> None:
        self._file.write(bytes(count))
        self._hasher.update_zeros(count)
        self._pos += count


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, C-contiguous on the CPU, as a flat memoryview (no copy if possible)."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array).cast("B")


class CheckpointWriter:
    """Writes one checkpoint directory. Use as a context manager: `commit` or `abort`.

    Call `write_tensor` for every spec, in the order given (per partition), then `commit`,
    which pads and fsyncs the partitions and writes the manifest last under a temporary name.
    On an exception inside the `with` block, `abort` removes everything written.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        *,
        aliases: Mapping[str, str] | None = None,
        config: dict[str, Any] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        fsync: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.layout = plan_layout(specs)
        self.aliases = dict(aliases or {})
        if chunk_size <= 0 or chunk_size % ALIGNMENT or chunk_size > MAX_CHUNK_SIZE:
            raise LayoutError(
                f"chunk_size {chunk_size} must be a positive multiple of {ALIGNMENT} of at most "
                f"{MAX_CHUNK_SIZE} bytes (1 GiB)"
            )
        self.config, self.chunk_size, self.fsync = config, chunk_size, fsync
        self._files: dict[str, FileEntry] = {}
        _prepare_output(self.out_dir)
        self._parts = [
            _PartitionFile(self.out_dir / partition_file_name(i), size, chunk_size)
            for i, size in enumerate(self.layout.partition_sizes)
        ]

    def write_tensor(self, name: str, data: memoryview) -> None:
        """Write the bytes of tensor `name` (exactly its planned nbytes)."""
        entry = self.layout.tensors[name]
        if len(data) != entry.nbytes:
            raise ValueError(f"tensor {name!r}: got {len(data)} bytes, planned {entry.nbytes}")
        self._parts[entry.partition].write_at(entry.offset, data)

    def copy_file(self, src: str | os.PathLike[str], name: str | None = None) -> None:
        """Copy a source file (config, tokenizer) into the checkpoint verbatim."""
        name = check_name(name or Path(src).name, kind="copied file", source=str(src))
        data = Path(src).read_bytes()
        (self.out_dir / name).write_bytes(data)
        self._files[name] = FileEntry(nbytes=len(data), crc32=crc32_hex(data))

    def commit(self) -> Manifest:
        """Finish the partitions and write the manifest; the checkpoint is complete after this."""
        parts = tuple(p.finish(self.fsync) for p in self._parts)
        manifest = Manifest(
            chunk_size=self.chunk_size,
            partitions=parts,
            tensors=self.layout.tensors,
            aliases=self.aliases,
            files=dict(sorted(self._files.items())),
            config=self.config,
        )
        Manifest.from_json(manifest.to_json(), source="new manifest")  # validate our own output
        tmp = self.out_dir / f".{MANIFEST_NAME}.tmp"
        tmp.write_bytes(manifest.to_json())
        os.replace(tmp, self.out_dir / MANIFEST_NAME)
        return manifest

    def abort(self) -> None:
        """Close and remove everything this writer created."""
        for part in self._parts:
            part.close()
        shutil.rmtree(self.out_dir, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()


def _prepare_output(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExistsError(
            f"{out_dir}: exists and is not an empty directory; choose a new output directory "
            "or remove this one first."
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    storage = t.untyped_storage()
    return (t.device, storage.data_ptr(), t.storage_offset(), t.dtype, t.shape, t.stride())


def find_tied(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """`alias -> first name` for tensors that are the same view of the same storage."""
    first: dict[tuple[Any, ...], str] = {}
    aliases = {}
    for name, t in state_dict.items():
        key = _storage_key(t)
        if t.numel() and key in first:
            aliases[name] = first[key]
        else:
            first.setdefault(key, name)
    return aliases


def write_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    config: dict[str, Any] | None = None,
    copy_files: Iterable[str | os.PathLike[str]] = (),
    dtype: torch.dtype | None = None,
    partition_of: Callable[[str], int] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fsync: bool = True,
) -> Manifest:
    """Write `state_dict` as a stoke checkpoint in the new directory `out_dir`.

    Tied weights (names that are the same view of one storage) are stored once and listed as
    aliases. `dtype` converts floating tensors once, now, instead of at every load.
    `partition_of(name)` picks each tensor's partition (tensor-parallel rank); default 0.
    """
    aliases = find_tied(state_dict)
    target = from_torch(dtype) if dtype is not None else None
    specs = []
    for name, t in state_dict.items():
        if name in aliases:
            continue
        kind = from_torch(t.dtype, where=f"tensor {name!r}")
        kind = target if target and kind in FLOATING else kind
        part = partition_of(name) if partition_of else 0
        specs.append(TensorSpec(name, kind, tuple(t.shape), part))
    with CheckpointWriter(
        out_dir, specs, aliases=aliases, config=config, chunk_size=chunk_size, fsync=fsync
    ) as writer:
        for spec in specs:
            tensor = state_dict[spec.name].to(to_torch(spec.dtype))
            writer.write_tensor(spec.name, tensor_bytes(tensor))
        for path in copy_files:
            writer.copy_file(path)
        return writer.commit()
