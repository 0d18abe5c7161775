"""What the controller knows about a deployed model without loading it.

At deploy time the controller reads the model's small files (config, tokenizer, manifest) from
its source — a local directory or an `s3://` prefix — to learn its size, dtype and context
length, and to tokenize prompts itself: the router records every request's prompt token ids, so
tokenization happens here and never on a node. For an S3 source those files are copied into the
controller's home (`models/<hash>/`); a local source is read in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from checkpoint_format import MANIFEST_NAME, Manifest
from node_agent.facts.errors import ConfigError, InvalidSourceError, RemoteError
from node_agent.facts.model_config import ModelConfig
from node_agent.facts.s3client import make_client
from node_agent.facts.sizing import (
    CPU_COMPUTE_ITEMSIZE,
    DEFAULT_KV_CACHE_BYTES,
    DEFAULT_MAX_MODEL_LEN,
    WORKER_OVERHEAD_BYTES,
    kv_bytes_per_token,
)
from node_agent.facts.sources import LocalKind, LocalSource, S3Source, parse_source
from node_agent.facts.tokenizer import Tokenizer
from node_agent.facts.units import format_size

# Files a tokenizer and config need; only tokenizer.json and a config are required.
META_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
_WIDE = {"bfloat16": 2, "float16": 2, "bf16": 2, "f16": 2}


class ModelSourceError(ValueError):
    """The model source cannot be read or is not a model; the message says what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """Facts about one model source, all from its small files."""

    source: str
    """Normalised source: `s3://bucket/prefix` or an absolute directory path."""
    meta_dir: Path
    """A local directory holding the model's config and tokenizer files."""
    checkpoint_bytes: int
    """Bytes a node moves to load it (partition files, or safetensors shards)."""
    dtype: str
    context_length: int
    kv_bytes_per_token: int = 0
    """K and V bytes per token as the engine holds them on a CPU node (float32, like
    `cpu_weight_bytes`), from the config's layers, KV heads and head dim; 0 if the config does
    not say (the node then checks the KV cache at load)."""

    @property
    def cpu_weight_bytes(self) -> int:
        """Weights in memory on a CPU node, where 16-bit checkpoints are upcast to float32."""
        return self.checkpoint_bytes * (2 if self.dtype in _WIDE else 1)

    def instance_bytes(self, kv_cache_bytes: int | None) -> int:
        """What one instance reserves on a node: weights + KV cache + process overhead."""
        kv = kv_cache_bytes if kv_cache_bytes is not None else DEFAULT_KV_CACHE_BYTES
        return self.cpu_weight_bytes + kv + WORKER_OVERHEAD_BYTES

    def kv_cache_problem(self, kv_cache_bytes: int | None, max_model_len: int | None) -> str | None:
        """Why a KV cache of `kv_cache_bytes` (None: the default) cannot hold one sequence of
        `max_model_len` tokens (None: the model's context), the engine's own test; None if it
        can or the model's shape is unknown."""
        kv = kv_cache_bytes if kv_cache_bytes is not None else DEFAULT_KV_CACHE_BYTES
        tokens = max_model_len or self.context_length
        need = tokens * self.kv_bytes_per_token
        if kv >= need:
            return None
        which = "engine.kv_cache" if kv_cache_bytes is not None else "engine.kv_cache (the default)"
        fits = kv // self.kv_bytes_per_token
        lower = (
            f"or lower engine.max_model_len to at most {fits} tokens"
            if fits >= 1
            else "(no max_model_len is short enough)"
        )
        return (
            f"{which} is {format_size(kv, 1)} ({kv} bytes), but one sequence of {tokens} tokens of "
            f"{self.source} needs {format_size(need, 1)} ({need} bytes: "
            f"{self.kv_bytes_per_token} bytes per token as a CPU node holds it); "
            f"raise engine.kv_cache to at least {need} bytes {lower}."
        )

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_dir(self.meta_dir)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "meta_dir": str(self.meta_dir),
            "checkpoint_bytes": self.checkpoint_bytes,
            "dtype": self.dtype,
            "context_length": self.context_length,
            "kv_bytes_per_token": self.kv_bytes_per_token,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ModelInfo:
        return cls(
            source=str(doc["source"]),
            meta_dir=Path(doc["meta_dir"]),
            checkpoint_bytes=int(doc["checkpoint_bytes"]),
            dtype=str(doc["dtype"]),
            context_length=int(doc["context_length"]),
            kv_bytes_per_token=int(doc.get("kv_bytes_per_token", 0)),  # 0: recorded before it
        )


def normalise_source(text: str) -> str:
    """The canonical form nodes report holdings under (raises `ModelSourceError`)."""
    try:
        return parse_source(text).uri
    except InvalidSourceError as exc:
        raise ModelSourceError(str(exc)) from None


def inspect_model(text: str, cache_dir: Path) -> ModelInfo:
    """Read a model source's small files; S3 ones are copied under `cache_dir`."""
    try:
        source = parse_source(text)
    except InvalidSourceError as exc:
        raise ModelSourceError(str(exc)) from None
    if isinstance(source, LocalSource):
        return _inspect_local(source)
    return _inspect_s3(source, cache_dir)


def _inspect_local(source: LocalSource) -> ModelInfo:
    path = source.path
    if source.kind is LocalKind.CHECKPOINT:
        manifest = Manifest.from_json(
            (path / MANIFEST_NAME).read_bytes(), source=str(path / MANIFEST_NAME)
        )
        config = manifest.config or _read_json(path / "config.json")
        nbytes = manifest.total_bytes
        dtype = _manifest_dtype(manifest, config)
    else:
        config = _read_json(path / "config.json")
        nbytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    _require_tokenizer(path, source.uri)
    return ModelInfo(
        source.uri, path, nbytes, dtype, _context(config, source.uri), _kv_per_token(config)
    )


def _inspect_s3(source: S3Source, cache_dir: Path) -> ModelInfo:

    meta = cache_dir / hashlib.sha256(source.uri.encode()).hexdigest()[:24]
    staging = meta.with_name(meta.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, mode=0o700)
    client = make_client(pool_size=4, max_attempts=3)
    try:
        for name in (MANIFEST_NAME, *META_FILES):
            try:
                body = client.get_object(Bucket=source.bucket, Key=source.object_key(name))
            except Exception as exc:  # botocore's error classes are generated at run time
                code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404") and name != MANIFEST_NAME:
                    continue
                if code in ("NoSuchKey", "404"):
                    raise ModelSourceError(
                        f"{source.uri}: no {MANIFEST_NAME} there, so it is not a stoke checkpoint; "
                        "upload one with `stoke push CKPT_DIR s3://...`."
                    ) from None
                raise ModelSourceError(f"{source.uri}: cannot read {name}: {exc}") from None
            (staging / name).write_bytes(body["Body"].read())
    except RemoteError as exc:
        raise ModelSourceError(str(exc)) from None
    manifest = Manifest.from_json(
        (staging / MANIFEST_NAME).read_bytes(), source=source.object_uri(MANIFEST_NAME)
    )
    config = manifest.config or _read_json(staging / "config.json")
    if not (staging / "config.json").exists():
        (staging / "config.json").write_text(json.dumps(config))
    _require_tokenizer(staging, source.uri)
    shutil.rmtree(meta, ignore_errors=True)
    os.replace(staging, meta)
    return ModelInfo(
        source.uri,
        meta,
        manifest.total_bytes,
        _manifest_dtype(manifest, config),
        _context(config, source.uri),
        _kv_per_token(config),
    )


def _manifest_dtype(manifest: Manifest, config: dict[str, Any]) -> str:
    dtypes = {t.dtype for t in manifest.tensors.values()}
    if len(dtypes) == 1:
        return str(dtypes.pop())
    return str(config.get("torch_dtype") or "float32")


def _kv_per_token(config: dict[str, Any]) -> int:
    """`ModelInfo.kv_bytes_per_token` by the engine's formula; 0 for a config the engine
    would refuse (the node says why at load)."""
    try:
        cfg = ModelConfig.from_dict(config)
    except ConfigError:
        return 0
    return kv_bytes_per_token(cfg, CPU_COMPUTE_ITEMSIZE)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelSourceError(
            f"{path}: missing; a model directory needs its config.json."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSourceError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(doc, dict):
        raise ModelSourceError(f"{path}: expected a JSON object.")
    return doc


def _require_tokenizer(path: Path, uri: str) -> None:
    if not (path / "tokenizer.json").is_file():
        raise ModelSourceError(
            f"{uri}: no tokenizer.json; stoke tokenizes prompts with the model's own "
            "tokenizer, so the model directory must include it."
        )


def _context(config: dict[str, Any], uri: str) -> int:
    value = config.get("max_position_embeddings")
    if not isinstance(value, int) or value < 1:
        raise ModelSourceError(f"{uri}: config.json has no positive max_position_embeddings.")
    return min(value, DEFAULT_MAX_MODEL_LEN)
