"""Typed errors for checkpoint files: each names the file, tensor or chunk, the reason and a fix.

`CheckpointError` is the base the CLI catches; everything here (and `loader.errors`) derives
from it, so a bad checkpoint is reported as one line a user can act on, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class CheckpointError(Exception):
    """Base of every error about a stoke checkpoint or a source model directory."""


class NotACheckpointError(CheckpointError):
    """The directory has no stoke manifest."""


class ManifestError(CheckpointError):
    """The manifest is not valid JSON or misses a key or has a value of the wrong type."""


class UnsupportedFormatError(ManifestError):
    """The manifest is for another format or a format version this reader does not know."""


class UnknownDtypeError(ManifestError):
    """A tensor's dtype is not one the format defines."""


class UnsafeNameError(ManifestError):
    """A tensor or file name could escape the checkpoint directory or is otherwise not allowed."""


class LayoutError(ManifestError):
    """Tensor byte ranges are misaligned, out of range, overlapping or of the wrong size."""


class TruncatedPartitionError(CheckpointError):
    """A partition file is shorter (or longer) than the manifest says."""


class ConversionError(CheckpointError):
    """A source model directory cannot be converted (missing or unsupported weight files)."""


class OutputExistsError(CheckpointError):
    """The output directory exists and is not empty."""


@dataclass(frozen=True)
class BadChunk:
    """One chunk whose bytes do not match the checksum in the manifest."""

    file: str
    index: int
    start: int
    end: int
    expected: str
    actual: str

    def describe(self) -> str:
        """One line naming the file, the chunk and its byte range."""
        return (
            f"{self.file}: chunk {self.index} (bytes {self.start}..{self.end}) has crc32 "
            f"{self.actual}, manifest says {self.expected}"
        )


class ChecksumMismatchError(CheckpointError):
    """One or more chunks (or copied files) do not match their manifest checksums."""

    def __init__(self, ckpt_dir: str, bad: list[BadChunk]) -> None:
        self.bad = bad
        lines = "\n  ".join(b.describe() for b in bad)
        super().__init__(
            f"checkpoint {ckpt_dir} is corrupt: {len(bad)} chunk(s) fail their checksum:\n"
            f"  {lines}\nRe-copy or re-convert the checkpoint; do not load it."
        )
