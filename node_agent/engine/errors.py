"""Typed, user-actionable engine errors. Each message names the value, the reason and the fix."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises for bad input (not for its own bugs)."""


class ConfigError(EngineError):
    """config.json is missing, malformed, or describes an unsupported model."""


class WeightsError(EngineError):
    """The weights do not match the config (missing, unexpected or mis-shaped tensors)."""


class TokenizerError(EngineError):
    """Tokenizer files are missing or unusable for what was asked (e.g. no chat template)."""


class RequestError(EngineError):
    """A generation request is invalid (prompt too long, bad sampling parameters, ...)."""
