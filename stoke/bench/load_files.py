"""The files `stoke bench load` measures: one set of tensors in stoke's format, as a
.safetensors file and as a torch.save pickle (the torch.load baseline only)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from node_agent.facts.errors import InvalidSizeError
from node_agent.facts.units import parse_size
from stoke.errors import StokeError


def synthetic_size(text: str) -> int:
    """`--size` in bytes (`1GiB`, `512MiB`, `2GB`, `1073741824`: `node_agent.facts.units`'s
    rules); a `StokeError` naming the value and the fix."""
    try:
        return parse_size(text, what="--size")
    except InvalidSizeError as exc:
        raise StokeError(str(exc)) from None


@dataclass(frozen=True)
class BenchFiles:
    """Paths of the same tensors in each format, and how many tensor bytes they hold."""

    stoke: Path  # checkpoint directory
    safetensors: Path  # a .safetensors file or a directory of shards
    torch_pt: Path
    partition: Path  # stoke's partition file: what the raw-read ceiling reads
    nbytes: int

    def all_files(self) -> list[Path]:
        """Every file whose page-cache state the benchmark controls."""
        st = sorted(self.safetensors.glob("*.safetensors")) if self.safetensors.is_dir() else []
        return [self.partition, *(st or [self.safetensors]), self.torch_pt]


def synthetic_state_dict(nbytes: int) -> dict[str, object]:
    """LLM-shaped float32 tensors totalling about `nbytes`: 16 MiB matrices plus small norms."""
    import torch

    side = 2048  # 2048 x 2048 float32 = 16 MiB
    tensors: dict[str, object] = {}
    for i in range(max(1, nbytes // (side * side * 4))):
        tensors[f"model.layers.{i}.weight"] = torch.full((side, side), i * 1e-3)
        tensors[f"model.layers.{i}.norm.weight"] = torch.ones(side)
    return tensors


def prepare_synthetic(workdir: Path, nbytes: int) -> BenchFiles:
    """Write `nbytes` of synthetic tensors in all three formats under `workdir`."""
    import torch
    from safetensors.torch import save_file

    from checkpoint_format import write_checkpoint

    sd = synthetic_state_dict(nbytes)
    _say(f"writing {nbytes / 2**30:.2f} GiB as stoke, safetensors and torch.save files...")
    write_checkpoint(sd, workdir / "stoke")  # type: ignore[arg-type]
    save_file(sd, workdir / "model.safetensors")  # type: ignore[arg-type]
    torch.save(sd, workdir / "model.pt")
    return _files(workdir, workdir / "model.safetensors")


def prepare_model(workdir: Path, model_dir: Path) -> BenchFiles:
    """Convert a Hugging Face directory; its own safetensors shards are the baseline."""
    import torch
    from safetensors.torch import load_file

    from checkpoint_format import convert_hf

    _say(f"converting {model_dir}...")
    convert_hf(model_dir, workdir / "stoke")
    sd = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        sd.update(load_file(shard))
    torch.save(sd, workdir / "model.pt")
    return _files(workdir, model_dir)


def _files(workdir: Path, safetensors: Path) -> BenchFiles:
    from checkpoint_format import read_manifest

    manifest = read_manifest(workdir / "stoke")
    nbytes = sum(t.nbytes for t in manifest.tensors.values())
    partition = workdir / "stoke" / manifest.partitions[0].file
    return BenchFiles(workdir / "stoke", safetensors, workdir / "model.pt", partition, nbytes)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
