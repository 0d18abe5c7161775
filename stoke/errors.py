"""The base of every error a user can act on; the CLI prints these without a traceback."""

from __future__ import annotations


class StokeError(Exception):
    """An error with a message that names the value, the reason and the fix."""
