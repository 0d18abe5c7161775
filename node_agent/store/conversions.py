"""Hugging Face directories become stoke checkpoints once: convert on the way into the disk
tier, and remember which key each directory produced.

The memo maps a directory to the key its conversion produced and a fingerprint of its files
(names, sizes, modification times). While the fingerprint holds and a tier still has the key,
`ensure` skips the conversion; an edited directory is converted again (and, if its content
changed, becomes a new key).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from checkpoint_format import MANIFEST_NAME, convert_hf
from node_agent.facts.sources import LocalSource
from node_agent.store.identity import checkpoint_key, is_key
from node_agent.store.index import atomic_write_json, read_json
from node_agent.store.layout import remove_tree

MEMO_NAME = "conversions.json"
_ALIGN_SLACK = 4096  # per file; converted tensors are padded to 4 KiB


def fingerprint(directory: Path) -> str:
    """A hash of the directory's top-level files' names, sizes and modification times."""
    digest = hashlib.sha256()
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_file():
            st = entry.stat()
            digest.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def estimate_converted_nbytes(directory: Path) -> int:
    """An upper bound on the converted checkpoint's size, for reserving budget before the
    conversion: the bytes conversion reads plus alignment slack (the exact size replaces it
    after). Weights in other formats beside the safetensors (`pytorch_model.bin`, `.gguf`, ...)
    and safetensors files the index does not name are not converted, so not counted."""
    shards = _indexed_shards(directory)
    files = [
        e
        for e in os.scandir(directory)
        if e.is_file()
        and not e.name.endswith(_OTHER_WEIGHT_FORMATS)
        and not (e.name.endswith(".safetensors") and shards is not None and e.name not in shards)
    ]
    return sum(e.stat().st_size for e in files) + _ALIGN_SLACK * (len(files) + 1024)


# Weight files `convert_hf` never reads (it refuses pickles and converts only safetensors).
_OTHER_WEIGHT_FORMATS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def _indexed_shards(directory: Path) -> set[str] | None:
    """The shard names `model.safetensors.index.json` lists; None if there is no usable index."""
    try:
        weight_map = json.loads((directory / "model.safetensors.index.json").read_text())[
            "weight_map"
        ]
        return {str(name) for name in weight_map.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class ConversionMemo:
    """`directory -> (fingerprint, key)`, persisted as JSON in the disk tier (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        doc = read_json(path)
        memo = doc.get("conversions", {}) if isinstance(doc, dict) else {}
        self._memo: dict[str, tuple[str, str]] = {
            src: (str(v["fingerprint"]), str(v["key"]))
            for src, v in memo.items()
            if isinstance(v, dict) and is_key(str(v.get("key", "")))
        }

    def lookup(self, source: LocalSource) -> str | None:
        """The key `source` converted to, if its files are unchanged since."""
        with self._lock:
            recorded = self._memo.get(source.uri)
        if recorded is None or recorded[0] != fingerprint(source.path):
            return None
        return recorded[1]

    def record(self, source: LocalSource, print_: str, key: str) -> None:
        """Remember that `source` (with fingerprint `print_`) converted to `key`."""
        with self._lock:
            self._memo[source.uri] = (print_, key)
            doc = {s: {"fingerprint": f, "key": k} for s, (f, k) in self._memo.items()}
            atomic_write_json(self.path, {"conversions": doc})


def convert_into(source: LocalSource, staging: Path) -> tuple[str, bytes]:
    """Convert Hugging Face directory `source` into the (emptied) `staging` directory.

    Returns `(fingerprint_before, manifest_bytes)`. The fingerprint is taken before reading,
    so an edit during the conversion makes the memo miss next time rather than lie.
    """
    print_ = fingerprint(source.path)
    remove_tree(staging)
    convert_hf(source.path, staging, progress=False, fsync=True)
    return print_, (staging / MANIFEST_NAME).read_bytes()


def conversion_staging_key(source: LocalSource) -> str:
    """A key-shaped name for the staging directory of a conversion (its real key is only known
    once it is done)."""
    return checkpoint_key(f"convert:{source.uri}".encode())
