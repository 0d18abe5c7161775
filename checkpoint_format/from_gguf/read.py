"""Open a GGUF file (llama.cpp's single-file format) and read its metadata, with clear errors.

`gguf.GGUFReader` maps the file and parses the header, the key-value metadata and the tensor
index in one go; a truncated or corrupt file surfaces there as a numpy or struct error deep in
the library (a tensor whose bytes run past the end cannot be shaped). `open_gguf` turns every such
failure into one `GGUFError` naming the file and the fix, before anything is converted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from checkpoint_format.errors import ConversionError

if TYPE_CHECKING:
    from gguf import GGUFReader

GGUF_MAGIC = b"GGUF"


class GGUFError(ConversionError):
    """A GGUF file stoke cannot convert: unreadable, or describing something it does not run."""


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a regular file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return Path(path).is_file() and f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class GGUFFile:
    """An opened GGUF: its reader, metadata as Python values, and the path for messages."""

    path: Path
    reader: GGUFReader
    metadata: dict[str, Any]

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        """The value of metadata `key`; a `GGUFError` naming it if the file lacks it."""
        if key not in self.metadata:
            raise GGUFError(
                f"{self.path}: metadata key {key!r} is missing; the file was not written by a "
                "llama.cpp converter stoke knows. Re-export it with llama.cpp's "
                "convert_hf_to_gguf.py."
            )
        return self.metadata[key]


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse `path` as GGUF; raises `GGUFError` if it is not a whole, well-formed GGUF file."""
    from gguf import GGUFReader

    src = Path(path)
    if not src.is_file():
        raise GGUFError(f"{src}: no such file; pass the path of a .gguf model file.")
    if not is_gguf_file(src):
        raise GGUFError(
            f"{src}: not a GGUF file (it does not start with the bytes 'GGUF'); pass a llama.cpp "
            ".gguf model, or a Hugging Face model directory."
        )
    try:
        reader = GGUFReader(src, "r")
        metadata = {name: field.contents() for name, field in reader.fields.items()}
    except (ValueError, IndexError, OverflowError, UnicodeDecodeError, OSError) as exc:
        raise GGUFError(
            f"{src}: not a readable GGUF file ({type(exc).__name__}: {exc}); the file is "
            "truncated or corrupt. Download it again."
        ) from None
    return GGUFFile(src, reader, metadata)
