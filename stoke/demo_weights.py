"""Deterministic random weights, streamed to safetensors files one tensor at a time.

Each tensor gets its own generator seeded from (seed, tensor name), so its values do not depend
on which other tensors exist or on which shard it lands in, and a bfloat16 model is exactly the
float32 model rounded. The safetensors header is computed from the shapes up front, so a file is
written tensor by tensor and peak memory is one tensor, not one shard or one model.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from stoke.demo_spec import TensorSpec

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
SAFETENSORS_DTYPES: dict[str, str] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed derived from the model seed and the tensor's name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def materialize(spec: TensorSpec, seed: int, dtype: str) -> torch.Tensor:
    """The values of one weight: ones for norms, seeded N(0, std²) otherwise."""
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=TORCH_DTYPES[dtype])
    generator = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    values = torch.randn(spec.shape, generator=generator, dtype=torch.float32)
    return values.mul_(spec.std).to(TORCH_DTYPES[dtype])


def nbytes(spec: TensorSpec, dtype: str) -> int:
    """Size of `spec` on disk in `dtype`."""
    return spec.numel * TORCH_DTYPES[dtype].itemsize


def plan_shards(
    specs: Sequence[TensorSpec], dtype: str, shard_bytes: int
) -> list[list[TensorSpec]]:
    """Split `specs`, in order, into shards of at most `shard_bytes` (or one oversized tensor)."""
    shards: list[list[TensorSpec]] = [[]]
    filled = 0
    for spec in specs:
        size = nbytes(spec, dtype)
        if shards[-1] and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(spec)
        filled += size
    return shards


def _header(specs: Sequence[TensorSpec], dtype: str) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        end = offset + nbytes(spec, dtype)
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned


def write_safetensors(
    path: Path, specs: Sequence[TensorSpec], *, seed: int, dtype: str, bar: tqdm | None = None
) -> None:
    """Write one safetensors file holding `specs`, generating each tensor just before writing it."""
    header = _header(specs, dtype)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for spec in specs:
            tensor = materialize(spec, seed, dtype)
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            if bar is not None:
                bar.update(nbytes(spec, dtype))


def write_weights(
    out_dir: Path,
    specs: Sequence[TensorSpec],
    *,
    seed: int,
    dtype: str,
    shard_bytes: int,
    progress: bool,
) -> list[str]:
    """Write `model.safetensors`, or shards plus `model.safetensors.index.json` when the weights
    exceed `shard_bytes`. Returns the names of the weight files written."""
    shards = plan_shards(specs, dtype, shard_bytes)
    total = sum(nbytes(spec, dtype) for spec in specs)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="writing weights",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        for name, shard in zip(names, shards, strict=True):
            write_safetensors(out_dir / name, shard, seed=seed, dtype=dtype, bar=bar)
    if len(shards) > 1:
        weight_map = {
            spec.name: name for name, shard in zip(names, shards, strict=True) for spec in shard
        }
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names
