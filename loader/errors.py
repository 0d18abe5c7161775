"""Errors raised while loading a checkpoint; all are `CheckpointError`s, which the CLI catches."""

from __future__ import annotations

from checkpoint_format.errors import CheckpointError


class LoaderError(CheckpointError):
    """Base of errors raised by `loader` itself (as opposed to a malformed checkpoint)."""


class DeviceError(LoaderError):
    """The requested device does not exist here (e.g. "cuda:0" on a machine without a GPU)."""


class ReadError(LoaderError):
    """Reading a partition failed (I/O error, or the file shrank while it was being read)."""
