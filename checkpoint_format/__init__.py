"""stoke's checkpoint format: a directory of aligned raw partitions plus a JSON manifest.

See SPEC.md. No pickle anywhere. Public surface:

- `is_checkpoint(path)`, `read_manifest(dir)`, `read_config(dir)`: inspect a checkpoint.
- `write_checkpoint(state_dict, out_dir, ...)`: write one from tensors (tied weights once).
- `convert_hf(hf_dir, out_dir, dtype=...)`: convert a Hugging Face safetensors directory.
- `verify_checkpoint(dir)`: check every chunk checksum.
- `CheckpointError` and its subclasses in `checkpoint_format.errors`.
"""

from checkpoint_format.convert import convert_hf
from checkpoint_format.errors import (
    BadChunk,
    CheckpointError,
    ChecksumMismatchError,
    ConversionError,
    LayoutError,
    ManifestError,
    NotACheckpointError,
    OutputExistsError,
    TruncatedPartitionError,
    UnknownDtypeError,
    UnsafeNameError,
    UnsupportedFormatError,
)
from checkpoint_format.layout import TensorSpec
from checkpoint_format.manifest import (
    ALIGNMENT,
    DEFAULT_CHUNK_SIZE,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    PartitionEntry,
    TensorEntry,
    is_checkpoint,
    read_config,
    read_manifest,
)
from checkpoint_format.validate import parse_manifest
from checkpoint_format.verify import VerifyReport, verify_checkpoint
from checkpoint_format.writer import CheckpointWriter, write_checkpoint

__all__ = [
    "ALIGNMENT",
    "DEFAULT_CHUNK_SIZE",
    "MANIFEST_NAME",
    "BadChunk",
    "CheckpointError",
    "CheckpointWriter",
    "ChecksumMismatchError",
    "ConversionError",
    "FileEntry",
    "LayoutError",
    "Manifest",
    "ManifestError",
    "NotACheckpointError",
    "OutputExistsError",
    "PartitionEntry",
    "TensorEntry",
    "TensorSpec",
    "TruncatedPartitionError",
    "UnknownDtypeError",
    "UnsafeNameError",
    "UnsupportedFormatError",
    "VerifyReport",
    "convert_hf",
    "is_checkpoint",
    "parse_manifest",
    "read_config",
    "read_manifest",
    "verify_checkpoint",
    "write_checkpoint",
]
