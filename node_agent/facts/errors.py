"""Typed errors of the node's public contract; each message names the value, the reason and the
fix.

Two families, both raised on purpose and both safe to show a user:
- `EngineError`: bad model files, bad request parameters and the like. Callers (the node agent,
  the controller, the CLI) turn one into a message for the user; anything else escaping the
  engine is a bug.
- `StoreError`: where checkpoints are kept — a source that is not one, a size that is not one,
  S3 refusing. The checkpoint store's own errors (`node_agent.store.errors`) derive from it.
"""

from __future__ import annotations


class EngineError(Exception):
    """A user-actionable engine error: bad model files, bad request parameters and the like."""


class ConfigError(EngineError):
    """The model's config.json is missing, invalid, or describes an unsupported model."""


class WeightsError(EngineError):
    """The model's weight files are missing, inconsistent with the config, or unreadable."""


class RequestError(EngineError):
    """A generation request is invalid (prompt, sampling parameters, ids, lengths)."""


class TokenizerError(EngineError):
    """The model directory's tokenizer files are missing or invalid, or a chat template failed."""


class StoreError(Exception):
    """Base of every error the checkpoint store (and the source and size parsers it shares with
    the controller) raises on purpose."""


class InvalidSizeError(StoreError, ValueError):
    """A byte size (budget, part size, spec value) could not be parsed or is out of range."""


class InvalidSourceError(StoreError, ValueError):
    """A checkpoint source is neither `s3://bucket/prefix` nor a usable local directory."""


class RemoteError(StoreError):
    """S3 (or an S3-compatible server) refused or failed a request."""
