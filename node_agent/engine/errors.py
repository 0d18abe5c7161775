"""Typed engine errors: each names the value, the reason and the fix.

Callers (the node agent, the CLI) turn an `EngineError` into a message for the user; anything
else escaping the engine is a bug.
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
