"""Byte sizes as people write them (`8GiB`, `512MiB`, `1.5GB`, `4096`): one parser for all."""

from __future__ import annotations

import re

from node_agent.store.errors import InvalidSizeError

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | int, *, what: str = "size", minimum: int = 1) -> int:
    """`'8GiB'` -> 8589934592. Ints pass through. Raises `InvalidSizeError` naming `what`.

    Binary units (KiB, MiB, GiB, TiB; K, M, G, T) are powers of 1024, decimal ones (kB, MB,
    GB, TB) powers of 1000. The result must be a whole number of bytes >= `minimum`.
    """
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.fullmatch(text)
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _UNITS:
            raise InvalidSizeError(
                f"{what} {text!r}: not a size; write a number with an optional unit, "
                "e.g. 8GiB, 512MiB, 2GB or 4096."
            )
        scaled = float(match.group(1)) * _UNITS[unit]
        if not scaled < 2**63:  # also catches inf from an absurdly long number
            raise InvalidSizeError(f"{what} {text!r}: too large to be a size; check the number.")
        value = int(scaled)
    if value < minimum:
        raise InvalidSizeError(
            f"{what} {text!r}: must be at least {format_size(minimum)}; choose a larger value."
        )
    return value


def format_size(nbytes: int, decimals: int = 2) -> str:
    """`1536` -> `'1.50 KiB'` (`decimals=1`: `'1.5 KiB'`): binary units, for messages."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.{decimals}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
