"""`make_demo_model`: a random-weight Llama-family model in Hugging Face layout.

The directory holds what `transformers` and stoke's engine expect of a real model: config.json,
generation_config.json, safetensors weights (sharded with an index above `shard_bytes`),
tokenizer.json and tokenizer_config.json with a ChatML chat template. Output is byte-identical
for equal arguments. A `stoke_demo.json` marker, written last, records how the model was made
and marks the directory as a complete demo model that a later call may replace.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from checkpoint_format import MANIFEST_NAME
from stoke.demo_spec import (
    ARCHS,
    DTYPES,
    MAX_POSITION_EMBEDDINGS,
    SIZE_SPECS,
    SIZES,
    build_config,
    check_choice,
    tensor_specs,
)
from stoke.demo_tokenizer import (
    demo_tokenizer_json,
    special_token_ids,
    vocab_size_of,
    write_json,
    write_tokenizer_files,
)
from stoke.demo_weights import INDEX_FILE, nbytes, write_weights
from stoke.errors import StokeError

DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB: `1b` is sharded, `small` is one file
PROGRESS_MIN_BYTES = 256 << 20  # show a progress bar from this many weight bytes up
MARKER_FILE = "stoke_demo.json"
_OWNED_FILES = (
    MARKER_FILE,
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    INDEX_FILE,
)


def make_demo_model(
    out_dir: str | os.PathLike[str],
    *,
    size: str = "tiny",
    arch: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
    config_overrides: dict[str, Any] | None = None,
    shard_bytes: int | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write a random-weight demo model into `out_dir` and return its path.

    `out_dir` may be missing, empty, or a previous demo model (which is replaced); any other
    non-empty directory is refused unless `force`, which overwrites only the files a demo model
    consists of. `config_overrides` replace config.json keys (shapes included) before the weights
    are derived from it. `progress` (default: only for big models) shows a bar on stderr.
    """
    check_choice("size", size, SIZES)
    check_choice("arch", arch, ARCHS)
    check_choice("dtype", dtype, DTYPES)
    shard_bytes = DEFAULT_SHARD_BYTES if shard_bytes is None else shard_bytes
    if shard_bytes <= 0:
        raise StokeError(f"shard_bytes={shard_bytes} must be positive")
    out = Path(out_dir)
    _prepare_out_dir(out, force=force)

    overrides = dict(config_overrides or {})
    tokenizer_json = demo_tokenizer_json(SIZE_SPECS[size].target_vocab, overrides.get("vocab_size"))
    ids = special_token_ids(tokenizer_json)
    vocab_size = vocab_size_of(tokenizer_json)
    config = build_config(
        size, arch, vocab_size=vocab_size, dtype=dtype, special_ids=ids, overrides=overrides
    )
    specs = tensor_specs(config)
    weight_bytes = sum(nbytes(spec, dtype) for spec in specs)
    show = weight_bytes >= PROGRESS_MIN_BYTES if progress is None else progress
    files = write_weights(
        out, specs, seed=seed, dtype=dtype, shard_bytes=shard_bytes, progress=show
    )
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", _generation_config(ids))
    write_tokenizer_files(out, tokenizer_json, MAX_POSITION_EMBEDDINGS)
    marker = {
        "generator": "stoke demo-model",
        "size": size,
        "arch": arch,
        "seed": seed,
        "dtype": dtype,
        "parameters": sum(spec.numel for spec in specs),
        "weight_bytes": weight_bytes,
        "weight_files": files,
    }
    write_json(out / MARKER_FILE, marker)
    return out


def read_demo_info(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The marker `make_demo_model` wrote: size, arch, seed, dtype, parameters, weight_bytes."""
    path = Path(model_dir) / MARKER_FILE
    try:
        info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StokeError(f"{path} not found: {model_dir} is not a stoke demo model") from None
    return info


def _generation_config(ids: dict[str, int]) -> dict[str, Any]:
    return {
        "bos_token_id": ids["bos"],
        "eos_token_id": [ids["im_end"], ids["endoftext"]],
        "pad_token_id": ids["pad"],
    }


def _prepare_out_dir(out: Path, *, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise StokeError(f"{out} exists and is not a directory: choose a directory for OUT_DIR")
    if (out / MANIFEST_NAME).exists():
        # A converted demo model keeps the marker; rewriting its HF files would leave the old
        # checkpoint's weights in place under a new config.
        raise StokeError(
            f"{out} holds a stoke checkpoint ({MANIFEST_NAME}): choose another directory, or "
            "delete it first"
        )
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER_FILE).is_file() and not force:
            raise StokeError(
                f"{out} is not empty and does not hold a stoke demo model: choose a new or empty "
                "directory, or pass --force to overwrite the model files in it"
            )
        _remove_model_files(out)
    out.mkdir(parents=True, exist_ok=True)


def _remove_model_files(out: Path) -> None:
    """Remove what a demo model consists of (marker first), so no stale shard survives."""
    for name in _OWNED_FILES:
        (out / name).unlink(missing_ok=True)
    for shard in out.glob("model*.safetensors"):
        shard.unlink()
