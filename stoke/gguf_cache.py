"""A `.gguf` file given where a model directory is expected is converted once, on the way in.

`stoke deploy --model X.gguf` and `stoke generate X.gguf` call `model_path(X.gguf)`, which
returns the stoke checkpoint converted from it, under `$STOKE_CACHE_DIR/gguf` (default
`~/.cache/stoke/gguf`). The checkpoint's name carries a fingerprint of the file (resolved path,
size, modification time), so an unchanged file is converted only the first time and a replaced
one is converted again. A conversion writes to a temporary sibling and is renamed into place
only when complete, so an interrupted one leaves nothing a later call could mistake for a
checkpoint. Directories and `s3://` URIs pass through unchanged.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path


def cache_root() -> Path:
    """Where converted models live: $STOKE_CACHE_DIR, else ~/.cache/stoke."""
    env = os.environ.get("STOKE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stoke"


def model_path(model: str, *, progress: bool = True) -> str:
    """`model` itself, or for a local regular file (a GGUF) its converted checkpoint directory.

    Raises `CheckpointError` (a `GGUFError`) if the file cannot be converted.
    """
    if "://" in model or not Path(model).expanduser().is_file():
        return model
    return str(converted(Path(model).expanduser().resolve(), progress=progress))


def converted(gguf: Path, *, progress: bool = True) -> Path:
    """The checkpoint converted from `gguf` (converting it now if this file never was)."""
    from checkpoint_format import is_checkpoint
    from checkpoint_format.from_gguf import convert_gguf

    target = cache_root() / "gguf" / checkpoint_name(gguf)
    if is_checkpoint(target):
        return target
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"converting {gguf} to a stoke checkpoint (once): {target}", file=sys.stderr)
    try:
        convert_gguf(gguf, partial, progress=progress)
        if not is_checkpoint(target):  # another process may have finished the same file first
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover
            os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def checkpoint_name(gguf: Path) -> str:
    """`<file stem>-<16 hex digits>`: the fingerprint changes when the file is replaced."""
    st = gguf.stat()
    digest = hashlib.sha256(f"{gguf}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", gguf.stem)[:80].lstrip(".") or "model"
    return f"{stem}-{digest[:16]}"
