"""Adaptive keep-alive: the hybrid histogram policy of "Serverless in the Wild" (Shahrad et al.,
ATC'20), as pure functions.

A function's *idle time* is the time from its last in-flight request finishing (none other in
flight) to the next request arriving. Its idle times go into a histogram of fixed-width bins
(1-minute bins up to 4 h by default, as in the paper); idle times past the range are counted
apart as out of bounds. From the histogram, `windows` picks two windows measured from the moment
the function goes idle:

- pre-warm: the head (5th percentile, rounded down to its bin's lower edge) less a 10% margin.
  Nothing runs before it: the instance is unloaded when the function goes idle and started again
  when the pre-warm window ends, just before the next request is expected.
- keep-alive: from there to the tail (99th percentile, rounded up to its bin's upper edge) plus
  a 10% margin; past it the instance stops. With no pre-warm window (the head is in the first
  bin) the instance simply stays loaded that long.

A histogram that says little falls back to the fixed keep-alive the caller gives: too few idle
times, bin counts too even (coefficient of variation below 2: the paper's test that the idle
times have a pattern at all), or mostly out-of-bounds idle times (the paper forecasts those with
ARIMA; stoke keeps the fixed keep-alive instead).

Histograms are values (`recorded` returns a new one) and persist as plain JSON (`to_json`,
`from_json`), sparse: only the bins that hold something.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeGuard

JSON_VERSION = 1


@dataclass(frozen=True, slots=True)
class KeepAliveConfig:
    """The policy's knobs; the defaults are the paper's."""

    bin_s: float = 60.0
    """Width of one histogram bin in seconds (the windows' resolution)."""
    range_s: float = 4 * 3600.0
    """Idle times up to this many seconds are binned; longer ones are out of bounds."""
    head_percentile: float = 5.0
    """The percentile of idle times that ends the pre-warm window."""
    tail_percentile: float = 99.0
    """The percentile of idle times that ends the keep-alive window."""
    margin: float = 0.10
    """Pre-warm ends this fraction earlier and keep-alive this fraction later, for noise."""
    min_samples: int = 10
    """Fewer idle times than this: not representative, use the fixed keep-alive."""
    min_cv: float = 2.0
    """Coefficient of variation of the bin counts below this: no pattern, use the fixed one."""
    max_out_of_bounds: float = 0.5
    """More than this fraction of idle times past `range_s`: use the fixed keep-alive."""

    @property
    def bins(self) -> int:
        return math.ceil(self.range_s / self.bin_s)


DEFAULT_CONFIG = KeepAliveConfig()


@dataclass(frozen=True, slots=True)
class IdleHistogram:
    """One function's idle times: `counts[i]` of them in [i·bin_s, (i+1)·bin_s), and
    `out_of_bounds` of them at or past `bins · bin_s`."""

    bin_s: float
    counts: tuple[int, ...]
    out_of_bounds: int = 0

    @classmethod
    def empty(cls, config: KeepAliveConfig = DEFAULT_CONFIG) -> IdleHistogram:
        return cls(config.bin_s, (0,) * config.bins)

    @property
    def range_s(self) -> float:
        return self.bin_s * len(self.counts)

    @property
    def in_range(self) -> int:
        return sum(self.counts)

    @property
    def total(self) -> int:
        return self.in_range + self.out_of_bounds

    def recorded(self, idle_s: float) -> IdleHistogram:
        """This histogram with one more idle time of `idle_s` seconds (negative counts as 0)."""
        index = int(max(0.0, idle_s) // self.bin_s)
        if index >= len(self.counts):
            return IdleHistogram(self.bin_s, self.counts, self.out_of_bounds + 1)
        counts = list(self.counts)
        counts[index] += 1
        return IdleHistogram(self.bin_s, tuple(counts), self.out_of_bounds)

    def percentile_bin(self, percentile: float) -> int:
        """The bin holding the `percentile`th in-range idle time (nearest rank); the histogram
        must hold at least one."""
        assert self.in_range > 0, "percentile of an empty histogram"
        rank = max(1, math.ceil(percentile / 100 * self.in_range))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return index
        raise AssertionError("rank past the histogram's total")

    def bin_cv(self) -> float:
        """Coefficient of variation (population) of the bin counts: high when idle times
        cluster in a few bins, 0 when they are spread evenly. 0 for an empty histogram."""
        n, total = len(self.counts), self.in_range
        if total == 0:
            return 0.0
        mean = total / n
        variance = sum((c - mean) ** 2 for c in self.counts) / n
        return math.sqrt(variance) / mean

    # ---- JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: the bin width, the number of bins, and the non-empty bins by index."""
        return {
            "version": JSON_VERSION,
            "bin_s": self.bin_s,
            "bins": len(self.counts),
            "counts": {str(i): c for i, c in enumerate(self.counts) if c},
            "out_of_bounds": self.out_of_bounds,
        }

    @classmethod
    def from_json(cls, data: object) -> IdleHistogram:
        """The histogram `to_json` wrote. Raises ValueError naming the field that is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"idle histogram: {type(data).__name__}, not an object")
        if data.get("version") != JSON_VERSION:
            raise ValueError(f"idle histogram: version {data.get('version')!r}, not 1")
        bin_s, bins = data.get("bin_s"), data.get("bins")
        if not _number(bin_s) or not bin_s > 0:
            raise ValueError(f"idle histogram: bin_s {bin_s!r} is not a positive number")
        if not _count(bins) or bins == 0:
            raise ValueError(f"idle histogram: bins {bins!r} is not a positive whole number")
        out = data.get("out_of_bounds")
        if not _count(out):
            raise ValueError(f"idle histogram: out_of_bounds {out!r} is not a count")
        return cls(float(bin_s), _counts(data.get("counts"), bins), out)


@dataclass(frozen=True, slots=True)
class Windows:
    """When to have an instance loaded, measured from the moment the function went idle: none
    in [0, prewarm_s), one in [prewarm_s, prewarm_s + keep_alive_s), none after."""

    prewarm_s: float
    keep_alive_s: float
    reason: str
    """Why these windows, for logs and scale actions."""
    from_histogram: bool
    """False: the histogram was not representative and these are the fixed fallback."""

    @property
    def end_s(self) -> float:
        return self.prewarm_s + self.keep_alive_s

    def wants_instance(self, idle_s: float) -> bool:
        """Whether an instance should be loaded `idle_s` seconds after the function went idle."""
        return self.prewarm_s <= idle_s < self.end_s


def windows(
    histogram: IdleHistogram, fallback_s: float, config: KeepAliveConfig = DEFAULT_CONFIG
) -> Windows:
    """The pre-warm and keep-alive windows the histogram supports, or no pre-warm and
    `fallback_s` of keep-alive when it is not representative (see the module docstring)."""
    unfit = _not_representative(histogram, config)
    if unfit is not None:
        reason = f"{unfit}: fixed keep-alive {format_duration(fallback_s)}"
        return Windows(0.0, fallback_s, reason, from_histogram=False)
    head = histogram.percentile_bin(config.head_percentile) * histogram.bin_s
    tail = (histogram.percentile_bin(config.tail_percentile) + 1) * histogram.bin_s
    prewarm = head * (1 - config.margin)
    end = tail * (1 + config.margin)
    reason = (
        f"p{config.head_percentile:g} idle {format_duration(head)}, "
        f"p{config.tail_percentile:g} idle {format_duration(tail)} over "
        f"{histogram.total} idle times: pre-warm {format_duration(prewarm)}, "
        f"keep alive {format_duration(end - prewarm)}"
    )
    return Windows(prewarm, end - prewarm, reason, from_histogram=True)


def _not_representative(histogram: IdleHistogram, config: KeepAliveConfig) -> str | None:
    """Why the histogram cannot choose the windows, or None when it can."""
    total = histogram.total
    if total < config.min_samples:
        return f"{total} idle times recorded, fewer than {config.min_samples}"
    if histogram.out_of_bounds > config.max_out_of_bounds * total:
        return (
            f"{histogram.out_of_bounds} of {total} idle times exceed "
            f"{format_duration(histogram.range_s)}"
        )
    cv = histogram.bin_cv()
    if cv < config.min_cv:
        return f"idle times have no pattern (bin counts' CV {cv:.2f} < {config.min_cv:g})"
    return None


def format_duration(seconds: float) -> str:
    """`7m`, `1h30m`, `45s`, `1m30s`: whole seconds in the spec's duration syntax."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{v}{unit}" for v, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if v]
    return "".join(parts) or "0s"


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _counts(data: object, bins: int) -> tuple[int, ...]:
    if not isinstance(data, dict):
        raise ValueError(f"idle histogram: counts {data!r} is not an object of bin: count")
    counts = [0] * bins
    for key, count in data.items():
        index = int(key) if isinstance(key, str) and key.isdigit() else -1
        if not 0 <= index < bins:
            raise ValueError(f"idle histogram: bin {key!r} is not one of 0..{bins - 1}")
        if not _count(count):
            raise ValueError(f"idle histogram: bin {key} count {count!r} is not a count")
        counts[index] = count
    return tuple(counts)
