"""Rebuild tests/data/checkpoint/golden and tests/data/checkpoint/corrupt/* (committed files).

Run `python tests/checkpoint_fixtures.py` only when the format changes on purpose:
the golden-byte tests compare fresh writes against the committed golden files.
Each corrupt case is the golden checkpoint with one defect; `CORRUPT_CASES` in
tests/test_checkpoint_format.py names the error each must raise.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent / "data" / "checkpoint"
GOLDEN_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4, "vocab_size": 3}
PART = "partition-00000.bin"
MANIFEST = "stoke-checkpoint.json"


def golden_state_dict() -> dict[str, torch.Tensor]:
    """Small tensors covering float32, bfloat16, bool, int64 (0-dim) and a tied pair."""
    emb = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "model.embed_tokens.weight": emb,
        "lm_head.weight": emb,
        "model.norm.weight": torch.tensor([1.0, 0.5, -2.0], dtype=torch.bfloat16),
        "model.layers.0.mask": torch.tensor([True, False, True]),
        "model.step": torch.tensor(7, dtype=torch.int64),
    }


def write_golden(out: Path) -> None:
    """Write the golden checkpoint (chunk size 4096, so every tensor is its own chunk)."""
    from checkpoint_format import write_checkpoint

    src = out.parent / "config.json.src"
    src.write_text(json.dumps(GOLDEN_CONFIG, sort_keys=True) + "\n")
    try:
        tmp = out.parent / "config.json"
        shutil.copy(src, tmp)
        write_checkpoint(
            golden_state_dict(), out, config=GOLDEN_CONFIG, copy_files=[tmp], chunk_size=4096
        )
    finally:
        src.unlink()
        (out.parent / "config.json").unlink(missing_ok=True)


def _edit(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(case: Path) -> None:
        doc = json.loads((case / MANIFEST).read_text())
        change(doc)
        (case / MANIFEST).write_text(json.dumps(doc, sort_keys=True, indent=1) + "\n")

    return apply


def _tensor(name: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["tensors"][name].update(fields)


def _truncate(case: Path) -> None:
    data = (case / PART).read_bytes()
    (case / PART).write_bytes(data[:10000])


def _flip(case: Path) -> None:
    data = bytearray((case / PART).read_bytes())
    data[4096 + 2] ^= 0x01  # chunk 1 (bytes 4096..8192): model.norm.weight
    (case / PART).write_bytes(bytes(data))


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _rename(old: str, new: str, key: str = "tensors") -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc[key].__setitem__(new, doc[key].pop(old))


CASES: dict[str, Callable[[Path], None]] = {
    "truncated_partition": _truncate,
    "missing_partition": lambda case: None,  # manifest-only cases drop the partition anyway
    "flipped_byte": _flip,
    "offset_out_of_range": _edit(_tensor("model.step", offset=16384)),
    "overlapping_tensors": _edit(_tensor("model.step", offset=8192, nbytes=8, shape=[])),
    "misaligned_offset": _edit(_tensor("model.step", offset=12290)),
    "nbytes_mismatch": _edit(_tensor("model.norm.weight", nbytes=4)),
    "unknown_dtype": _edit(_tensor("model.norm.weight", dtype="float4")),
    "unsupported_version": _edit(lambda doc: doc.update(format_version=2)),
    "tensor_name_escape": _edit(_rename("model.step", "../../etc/passwd")),
    "partition_name_escape": _edit(lambda doc: doc["partitions"][0].update(file="../x.bin")),
    "copied_file_escape": _edit(_rename("config.json", "/etc/passwd", key="files")),
    "alias_to_missing": _edit(lambda doc: doc["aliases"].update({"lm_head.weight": "nope"})),
    "chunk_count_mismatch": _edit(lambda doc: doc["partitions"][0]["chunks"].pop()),
    "missing_key": _edit(lambda doc: doc.pop("tensors")),
    "not_json": lambda case: _write(case / MANIFEST, b'{"format": "stoke-checkpoint",'),
}
# Cases whose defect is in the manifest alone keep no partition file (smaller fixtures).
_NEEDS_PARTITION = {"truncated_partition", "flipped_byte"}


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    write_golden(ROOT / "golden")
    for name, damage in CASES.items():
        case = ROOT / "corrupt" / name
        shutil.copytree(ROOT / "golden", case)
        if name not in _NEEDS_PARTITION and (case / PART).exists():
            (case / PART).unlink()
        damage(case)
    print(f"wrote {ROOT}", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
