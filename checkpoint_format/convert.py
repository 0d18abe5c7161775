"""Convert a Hugging Face model directory (safetensors, single or sharded) to a stoke checkpoint.

Tensors stream one at a time from the source shards (memory stays ~ the largest tensor), are
converted to `dtype` once here if asked, and are written in shard order. Non-weight files at the
top level (config.json, tokenizer files, generation_config.json, ...) are copied verbatim.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from checkpoint_format.dtypes import FLOATING, FROM_SAFETENSORS, itemsize, to_torch
from checkpoint_format.errors import ConversionError, UnknownDtypeError
from checkpoint_format.layout import TensorSpec
from checkpoint_format.manifest import DEFAULT_CHUNK_SIZE, Manifest
from checkpoint_format.names import check_name, name_problem
from checkpoint_format.writer import CheckpointWriter, tensor_bytes

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_EMBED_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")


def weight_files(hf_dir: Path) -> dict[str, list[str]]:
    """`shard file name -> tensor names` for the safetensors weights of `hf_dir`."""
    index = hf_dir / INDEX_NAME
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index}: no 'weight_map' object; the index is damaged.")
        shards: dict[str, list[str]] = {}
        for tensor, file in weight_map.items():
            check_name(file, kind="shard file", source=str(index))
            shards.setdefault(file, []).append(tensor)
        return shards
    files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if files:
        return {f: [] for f in files}
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
    hint = (
        f" It has pickle weights ({', '.join(pickles)}), which stoke never loads."
        if pickles
        else ""
    )
    raise ConversionError(
        f"{hf_dir}: no *.safetensors weights.{hint} Save the model with "
        "`model.save_pretrained(dir, safe_serialization=True)` and convert that directory."
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConversionError(
            f"{path}: cannot be read as JSON ({exc}); fix or re-download it."
        ) from None
    if not isinstance(doc, dict):
        raise ConversionError(f"{path}: expected a JSON object; fix or re-download it.")
    return doc


def _scan_shard(path: Path, listed: list[str], target: str | None) -> list[TensorSpec]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            missing = sorted(set(listed) - set(keys))
            if missing:
                raise ConversionError(
                    f"{path}: the index lists {len(missing)} tensor(s) missing from this shard "
                    f"(first: {missing[0]!r}); the download is incomplete."
                )
            specs = []
            for key in keys:
                tensor_slice = f.get_slice(key)
                raw = tensor_slice.get_dtype()
                if raw not in FROM_SAFETENSORS:
                    raise UnknownDtypeError(
                        f"{path}: tensor {key!r} has dtype {raw}, which stoke checkpoints do not "
                        f"support ({', '.join(FROM_SAFETENSORS)}). Cast it before converting."
                    )
                kind = FROM_SAFETENSORS[raw]
                kind = target if target and kind in FLOATING else kind
                specs.append(TensorSpec(key, kind, tuple(tensor_slice.get_shape())))
            return specs
    except (SafetensorError, OSError) as exc:
        raise ConversionError(f"{path}: not a readable safetensors file ({exc}).") from None


def tied_aliases(config: dict[str, Any] | None, names: set[str]) -> dict[str, str]:
    """`lm_head.weight -> embedding name` when the config ties word embeddings (as HF does)."""
    if not config or config.get("tie_word_embeddings") is not True:
        return {}
    embed = next((n for n in _EMBED_NAMES if n in names), None)
    return {"lm_head.weight": embed} if embed else {}


def _copy_extras(hf_dir: Path, shards: set[str], writer: CheckpointWriter) -> None:
    for path in sorted(hf_dir.iterdir()):
        name = path.name
        if not path.is_file() or name in shards or name == INDEX_NAME:
            continue
        if name.endswith((".safetensors", *_PICKLE_SUFFIXES)):
            continue
        if name_problem(name) is not None:
            log.warning("not copying %s: its name is not allowed in a checkpoint", path)
            continue
        writer.copy_file(path)


def convert_hf(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    fsync: bool = True,
) -> Manifest:
    """Convert the Hugging Face directory `hf_dir` into a new stoke checkpoint at `out_dir`.

    `dtype` (e.g. "float32") converts every floating tensor once, at conversion time.
    Raises `ConversionError` (or another `CheckpointError`) naming the offending file.
    """
    from tqdm import tqdm

    src = Path(hf_dir)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory; pass a Hugging Face model directory.")
    if dtype is not None and dtype not in FLOATING:
        itemsize(dtype, where="--dtype")  # unknown names raise UnknownDtypeError
        raise ConversionError(f"--dtype {dtype}: must be a floating dtype ({sorted(FLOATING)})")
    config = _read_json(src / "config.json") if (src / "config.json").is_file() else None
    shards = weight_files(src)
    plan = {file: _scan_shard(src / file, listed, dtype) for file, listed in shards.items()}
    names = [s.name for specs in plan.values() for s in specs]
    if len(set(names)) != len(names):
        raise ConversionError(f"{src}: a tensor name appears in more than one shard.")
    aliases = tied_aliases(config, set(names))
    plan = {f: [s for s in specs if s.name not in aliases] for f, specs in plan.items()}
    specs = [s for file_specs in plan.values() for s in file_specs]
    total = sum(s.nbytes for s in specs)
    with (
        CheckpointWriter(
            out_dir, specs, aliases=aliases, config=config, chunk_size=chunk_size, fsync=fsync
        ) as writer,
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc="convert",
            disable=None if progress else True,
        ) as bar,
    ):
        for file, file_specs in plan.items():
            _write_shard(src / file, file_specs, writer, bar.update)
        _copy_extras(src, set(shards), writer)
        return writer.commit()


def _write_shard(path: Path, specs: list[TensorSpec], writer: CheckpointWriter, done: Any) -> None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        for spec in specs:
            tensor = f.get_tensor(spec.name).to(to_torch(spec.dtype))
            writer.write_tensor(spec.name, tensor_bytes(tensor))
            done(spec.nbytes)
