"""Convert a GGUF file (llama.cpp, Ollama) into a stoke checkpoint.

Everything is checked before the output directory is created: the file parses and is whole, its
architecture and tokenizer can be built, every tensor has a known name and a supported type.
Then tensors are dequantized one at a time into the checkpoint writer, and the generated
`config.json`, `generation_config.json`, `tokenizer.json` and `tokenizer_config.json` are added
as the checkpoint's copied files. On any failure the writer removes the directory, so nothing
half-written is left behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from checkpoint_format.dtypes import FLOATING, itemsize, to_torch
from checkpoint_format.errors import ConversionError
from checkpoint_format.from_gguf.config import family_of, hf_config
from checkpoint_format.from_gguf.read import open_gguf
from checkpoint_format.from_gguf.tensors import SourceTensor, dequantized, plan_tensors
from checkpoint_format.from_gguf.tokenizer import tokenizer_files
from checkpoint_format.layout import TensorSpec
from checkpoint_format.manifest import DEFAULT_CHUNK_SIZE, Manifest
from checkpoint_format.writer import CheckpointWriter, tensor_bytes

EMBED = "model.embed_tokens.weight"


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    fsync: bool = True,
) -> Manifest:
    """Convert the GGUF file `gguf_path` into a new stoke checkpoint at `out_dir`.

    Quantized weights are dequantized to `dtype` (float32 by default: exact, and what CPU nodes
    compute in). Raises `GGUFError` (a `ConversionError`) naming the file and the problem.
    """
    from tqdm import tqdm

    target = dtype or "float32"
    if target not in FLOATING:
        itemsize(target, where="--dtype")  # unknown names raise UnknownDtypeError
        raise ConversionError(f"--dtype {target}: must be a floating dtype ({sorted(FLOATING)})")
    gguf = open_gguf(gguf_path)
    family = family_of(gguf)
    sources = plan_tensors(gguf)
    names = {s.hf_name for s in sources}
    tied = "lm_head.weight" not in names
    config = hf_config(gguf, tied=tied, torch_dtype=target)
    files = {
        "config.json": _json_bytes(config),
        "generation_config.json": _json_bytes(_generation_config(config)),
        **tokenizer_files(gguf),
    }
    specs = [TensorSpec(s.hf_name, target, s.shape) for s in sources]
    aliases = {"lm_head.weight": EMBED} if tied and EMBED in names else {}
    with (
        CheckpointWriter(
            out_dir, specs, aliases=aliases, config=config, chunk_size=chunk_size, fsync=fsync
        ) as writer,
        tqdm(
            total=sum(s.nbytes for s in specs),
            unit="B",
            unit_scale=True,
            desc="convert",
            disable=None if progress else True,
        ) as bar,
    ):
        for source, spec in zip(sources, specs, strict=True):
            _write_tensor(writer, source, config, target, family.permuted_qk)
            bar.update(spec.nbytes)
        _write_files(writer, files)
        return writer.commit()


def _write_tensor(
    writer: CheckpointWriter,
    source: SourceTensor,
    config: dict[str, Any],
    dtype: str,
    permuted_qk: bool,
) -> None:
    import torch

    array = dequantized(
        source,
        heads=config["num_attention_heads"],
        kv_heads=config["num_key_value_heads"],
        permuted_qk=permuted_qk,
    )
    # A float32 tensor comes back as a read-only view of the mapped file: copy it (torch wants
    # writable memory), as every dequantized tensor already is.
    writable = np.require(array, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    tensor = torch.from_numpy(writable).to(to_torch(dtype))
    writer.write_tensor(source.hf_name, tensor_bytes(tensor))


def _write_files(writer: CheckpointWriter, files: dict[str, bytes]) -> None:
    """Add generated files through the writer's verbatim-copy path (checksummed, listed)."""
    with tempfile.TemporaryDirectory(prefix="stoke-gguf-") as tmp:
        for name, data in files.items():
            path = Path(tmp) / name
            path.write_bytes(data)
            writer.copy_file(path)


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """Greedy by default (GGUF carries no sampling defaults), with the end-of-sequence id."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {"do_sample": False, **{k: config[k] for k in keys if k in config}}


def _json_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
