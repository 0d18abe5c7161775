"""stoke's loader: a checkpoint into one contiguous buffer per partition per device.

`load_state_dict(ckpt_dir, device="cpu" | "cuda:N") -> {name: tensor}` is the entry point.
Errors derive from `checkpoint_format.errors.CheckpointError` (loader-specific ones from
`loader.errors.LoaderError`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loader.api import LoadedCheckpoint, load_checkpoint, load_state_dict
    from loader.errors import DeviceError, LoaderError, ReadError
    from loader.plan import ReadTask, Strategy, choose_strategy, plan_reads

# Imported on first use, so torch-free helpers (`loader.sysio`) import without torch.
_EXPORTS = {
    "LoadedCheckpoint": "loader.api",
    "load_checkpoint": "loader.api",
    "load_state_dict": "loader.api",
    "DeviceError": "loader.errors",
    "LoaderError": "loader.errors",
    "ReadError": "loader.errors",
    "ReadTask": "loader.plan",
    "Strategy": "loader.plan",
    "choose_strategy": "loader.plan",
    "plan_reads": "loader.plan",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DeviceError",
    "LoadedCheckpoint",
    "LoaderError",
    "ReadError",
    "ReadTask",
    "Strategy",
    "choose_strategy",
    "load_checkpoint",
    "load_state_dict",
    "plan_reads",
]
