"""Checkpoint identity: the SHA-256 of the manifest's bytes.

The manifest lists every partition's size and per-chunk CRC-32 and every copied file's CRC-32,
so its hash names the content: the same checkpoint from two URIs is one entry, and a checkpoint
changed at the same URI is a new one.
"""

from __future__ import annotations

import hashlib
import re

_KEY = re.compile(r"[0-9a-f]{64}")


def checkpoint_key(manifest_bytes: bytes) -> str:
    """The store key of the checkpoint whose manifest is `manifest_bytes` (64 hex digits)."""
    return hashlib.sha256(manifest_bytes).hexdigest()


def is_key(text: str) -> bool:
    """True if `text` has the shape of a store key (not whether any tier holds it)."""
    return bool(_KEY.fullmatch(text))
