"""Where a checkpoint comes from: `s3://bucket/prefix`, or a local directory that is either a
stoke checkpoint or a Hugging Face model directory (converted once on its way in)."""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path

from checkpoint_format import MANIFEST_NAME, is_checkpoint
from node_agent.facts.errors import InvalidSourceError

S3_SCHEME = "s3://"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
HF_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class S3Source:
    """A checkpoint stored as objects `<prefix>/<file>` in an S3 bucket."""

    bucket: str
    prefix: str  # no leading or trailing '/'; may be empty (the bucket's root)

    @property
    def uri(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}".rstrip("/")

    def object_key(self, name: str) -> str:
        """The S3 key of checkpoint file `name`."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def object_uri(self, name: str) -> str:
        """`s3://bucket/prefix/name`, for messages."""
        return f"{S3_SCHEME}{self.bucket}/{self.object_key(name)}"

    def __str__(self) -> str:
        return self.uri


class LocalKind(enum.Enum):
    """What a local source directory holds."""

    CHECKPOINT = "checkpoint"  # has stoke-checkpoint.json
    HUGGING_FACE = "hugging-face"  # safetensors weights: converted with convert_hf


@dataclass(frozen=True)
class LocalSource:
    """A directory on this machine (absolute, resolved)."""

    path: Path
    kind: LocalKind

    @property
    def uri(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return self.uri


Source = S3Source | LocalSource


def parse_s3_uri(text: str) -> S3Source:
    """`s3://bucket/prefix` -> `S3Source`; raises `InvalidSourceError` naming the problem."""
    if not text.startswith(S3_SCHEME):
        raise InvalidSourceError(f"{text!r}: an S3 URI starts with s3://, e.g. s3://models/llama.")
    bucket, _, prefix = text[len(S3_SCHEME) :].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidSourceError(
            f"{text!r}: bucket {bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, "
            "digits, '.' or '-'); write s3://BUCKET/PREFIX."
        )
    prefix = prefix.strip("/")
    if "//" in prefix or any(part in (".", "..") for part in prefix.split("/") if prefix):
        raise InvalidSourceError(
            f"{text!r}: prefix {prefix!r} has an empty, '.' or '..' segment; write a plain "
            "path such as s3://models/llama-3-8b."
        )
    return S3Source(bucket, prefix)


def parse_local(path: str | os.PathLike[str]) -> LocalSource:
    """A local directory source; raises `InvalidSourceError` unless it holds a checkpoint or
    Hugging Face safetensors weights."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise InvalidSourceError(
            f"{path}: no such directory; pass a stoke checkpoint directory, a Hugging Face "
            "model directory, or an s3://bucket/prefix URI."
        )
    if is_checkpoint(resolved):
        return LocalSource(resolved, LocalKind.CHECKPOINT)
    if (resolved / HF_INDEX).is_file() or any(resolved.glob("*.safetensors")):
        return LocalSource(resolved, LocalKind.HUGGING_FACE)
    raise InvalidSourceError(
        f"{path}: neither a stoke checkpoint (no {MANIFEST_NAME}) nor a Hugging Face model "
        "directory (no *.safetensors); convert the model with `stoke convert HF_DIR OUT_DIR`."
    )


def parse_source(source: str | os.PathLike[str] | Source) -> Source:
    """A source from its text: `s3://...` URIs, anything else is a local directory."""
    if isinstance(source, S3Source | LocalSource):
        return source
    text = os.fspath(source)
    if text.startswith(S3_SCHEME):
        return parse_s3_uri(text)
    if "://" in text:
        raise InvalidSourceError(
            f"{text!r}: unsupported scheme; stoke reads s3://bucket/prefix and local directories."
        )
    return parse_local(text)
