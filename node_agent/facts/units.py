"""Sizes and durations as people write them: one parser each, used by the function spec, the
`stoke` command's flags and the node agent's flags alike.

**Sizes** (`parse_size`): a whole number of bytes, written as

- a number: `4096` (an int, or in YAML/JSON a float with no fraction: `2048.0`);
- a number and a unit, case-insensitive, spaces allowed between: `8GiB`, `512 MiB`, `1.5GB`:
  - binary units, powers of 1024: `KiB`, `MiB`, `GiB`, `TiB`, and their one-letter short forms
    `K`, `M`, `G`, `T` (so `8G` is `8GiB`, as `docker`, `java -Xmx` and `free -g` read it);
  - decimal units, powers of 1000, always with the `B`: `kB`, `MB`, `GB`, `TB`;
  - `B`: bytes.

The result must be a whole number of bytes (`1.5GiB` is; `0.1KiB` is not), at most 1 EiB, and at
least the caller's `minimum` (0 unless the caller says: a cache budget needs at least 1 byte).
Anything else (`8 gigs`, `-1GiB`, `GiB`, `1.5B`) is an `InvalidSizeError` (a `ValueError`)
naming the value and the accepted forms.

**Durations** (`parse_duration`): seconds, written as a non-negative number (`90`, `0.25`) or
with units `h`, `m`, `s` in that order, case-insensitive, each optional: `30s`, `5m`, `1h`,
`1h30m`, `1.5h`, `1h 30m 15s`. Anything else (`1d`, `5m1h`, `-5s`, `inf`) is a `ValueError`.

**Formatting** (`format_size`): binary units for messages, `1536` -> `1.50 KiB`.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from node_agent.facts.errors import InvalidSizeError

SIZE_HINT = "write 4GiB, 512MiB, 2GB or a number of bytes"
DURATION_HINT = "write 30s, 5m, 1h or a number of seconds"

SIZE_UNITS: dict[str, int] = {
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
"""Every unit a size may carry (lower case) and its bytes."""
MAX_SIZE = 1 << 60
"""1 EiB: larger than any device or disk for decades; keeps `'9' * 400 + 'GiB'` from becoming a
huge int."""

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_SIZE_RE = re.compile(rf"\s*{_NUMBER}\s*([a-z]*)\s*", re.IGNORECASE)
_DURATION_RE = re.compile(
    rf"\s*(?:{_NUMBER}\s*h)?\s*(?:{_NUMBER}\s*m)?\s*(?:{_NUMBER}\s*s)?\s*", re.IGNORECASE
)
_PLAIN_NUMBER = re.compile(rf"[+-]?{_NUMBER}")


def parse_size(value: object, *, what: str | None = None, minimum: int = 0) -> int:
    """Bytes in `value` (see the module's rules): `'8GiB'` -> 8589934592, `'2GB'` ->
    2000000000, `4096` -> 4096. `what` (a flag or key, e.g. `--dram-cache`) starts the error
    message. Raises `InvalidSizeError` naming the value and the fix."""
    prefix = f"{what}: " if what else ""
    nbytes = _exact_bytes(value)
    if nbytes is None:
        raise InvalidSizeError(f"{prefix}{value!r} is not a size; {SIZE_HINT}")
    if nbytes > MAX_SIZE:
        raise InvalidSizeError(
            f"{prefix}{value!r} is not a size; {SIZE_HINT} up to 1 EiB (this one is too large)"
        )
    if nbytes < minimum:
        raise InvalidSizeError(
            f"{prefix}{value!r}: must be at least {format_size(minimum)}; choose a larger value."
        )
    return nbytes


def _exact_bytes(value: object) -> int | None:
    """The whole, non-negative number of bytes `value` stands for; None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() and value >= 0 else None
    if isinstance(value, int):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    match = _SIZE_RE.fullmatch(value)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in SIZE_UNITS:
        return None
    try:
        exact = Decimal(match.group(1)) * SIZE_UNITS[unit]
    except InvalidOperation:
        return None
    return int(exact) if exact == exact.to_integral_value() else None


def format_size(nbytes: int, decimals: int = 2) -> str:
    """`1536` -> `'1.50 KiB'` (`decimals=1`: `'1.5 KiB'`): binary units, for messages."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.{decimals}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_duration(value: object) -> float:
    """Seconds in `value` (see the module's rules): `'1h30m'` -> 5400.0, `'90'` -> 90.0,
    `45` -> 45.0. Raises ValueError naming the value and the accepted forms."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _seconds_in(value.strip())
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a duration; {DURATION_HINT}")
    return seconds


def _seconds_in(text: str) -> float | None:
    """`'90'` -> 90.0, `'1h30m'` -> 5400.0; None when `text` is neither a number nor h/m/s
    parts in that order."""
    if _PLAIN_NUMBER.fullmatch(text):
        return float(text)
    match = _DURATION_RE.fullmatch(text)
    if match is None or not text or all(group is None for group in match.groups()):
        return None
    hours, minutes, seconds = (float(group) if group else 0.0 for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds
