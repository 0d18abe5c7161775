"""The manifest: frozen dataclasses, their canonical JSON encoding, and reading one from disk.

See SPEC.md. `Manifest.from_json` validates everything it can without reading partition files
(`validate.py`); sizes on disk are checked by the loader and by `verify`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkpoint_format.errors import ManifestError, NotACheckpointError

MANIFEST_NAME = "stoke-checkpoint.json"
FORMAT_NAME = "stoke-checkpoint"
FORMAT_VERSION = 1
ALIGNMENT = 4096
DEFAULT_CHUNK_SIZE = 16 << 20
# Bounds one checksum read (Linux reads at most ~2 GiB per call) and its buffer.
MAX_CHUNK_SIZE = 1 << 30
CHECKSUM = "crc32"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: `nbytes` at `offset` of partition `partition`."""

    partition: int
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "dtype": self.dtype,
            "shape": list(self.shape),
        }


@dataclass(frozen=True)
class PartitionEntry:
    """One raw partition file: its name, exact size and one checksum per chunk."""

    file: str
    nbytes: int
    chunks: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "nbytes": self.nbytes, "chunks": list(self.chunks)}


@dataclass(frozen=True)
class FileEntry:
    """A source file copied verbatim (config, tokenizer): its size and CRC-32."""

    nbytes: int
    crc32: str

    def to_json(self) -> dict[str, Any]:
        return {"nbytes": self.nbytes, "crc32": self.crc32}


@dataclass(frozen=True)
class Manifest:
    """A whole checkpoint's index. Tied weights appear once in `tensors`, again in `aliases`."""

    chunk_size: int
    partitions: tuple[PartitionEntry, ...]
    tensors: dict[str, TensorEntry]
    aliases: dict[str, str] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    alignment: int = ALIGNMENT
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        """Bytes of all partition files together."""
        return sum(p.nbytes for p in self.partitions)

    def names(self) -> list[str]:
        """Every tensor name a loaded state dict has: stored tensors, then aliases."""
        return [*self.tensors, *self.aliases]

    def to_json(self) -> bytes:
        """Canonical bytes: sorted keys, 1-space indent, trailing newline (SPEC.md)."""
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "alignment": self.alignment,
            "chunk_size": self.chunk_size,
            "checksum": CHECKSUM,
            "config": self.config,
            "partitions": [p.to_json() for p in self.partitions],
            "tensors": {name: t.to_json() for name, t in self.tensors.items()},
            "aliases": dict(self.aliases),
            "files": {name: f.to_json() for name, f in self.files.items()},
        }
        text = json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False)
        return (text + "\n").encode("ascii")

    @classmethod
    def from_json(cls, data: bytes, *, source: str) -> Manifest:
        """Parse and validate manifest bytes; `source` names the file in error messages."""
        from checkpoint_format.validate import parse_manifest

        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(
                f"{source}: not valid JSON ({exc}); the manifest is damaged. Re-convert the "
                "checkpoint or restore it from its source."
            ) from None
        return parse_manifest(doc, source=source)


def manifest_path(ckpt_dir: str | os.PathLike[str]) -> Path:
    """Path of the manifest inside checkpoint directory `ckpt_dir`."""
    return Path(ckpt_dir) / MANIFEST_NAME


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if `path` is a directory holding a stoke manifest (cheap: no validation)."""
    return manifest_path(path).is_file()


def read_manifest(ckpt_dir: str | os.PathLike[str]) -> Manifest:
    """Read and validate the manifest of `ckpt_dir`."""
    path = manifest_path(ckpt_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotACheckpointError(
            f"{ckpt_dir}: no {MANIFEST_NAME}, so this is not a stoke checkpoint. Create one with "
            "`stoke convert HF_DIR OUT_DIR`."
        ) from None
    return Manifest.from_json(data, source=str(path))


def read_config(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The model config stored in the manifest (the source's config.json), or None."""
    return read_manifest(ckpt_dir).config
