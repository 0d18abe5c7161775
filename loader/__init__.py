"""stoke's loader: a checkpoint into one contiguous buffer per partition per device.

`load_state_dict(ckpt_dir, device="cpu" | "cuda:N") -> {name: tensor}` is the entry point.
Errors derive from `checkpoint_format.errors.CheckpointError` (loader-specific ones from
`loader.errors.LoaderError`).
"""

from loader.api import LoadedCheckpoint, load_checkpoint, load_state_dict
from loader.errors import DeviceError, LoaderError, ReadError
from loader.plan import ReadTask, Strategy, choose_strategy, plan_reads

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
