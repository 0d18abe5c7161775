"""Reading the two kinds of real trace the simulator replays.

- **Requests**: the Azure LLM inference trace format (`TIMESTAMP,ContextTokens,GeneratedTokens`,
  one request a row, timestamps `2023-11-16 18:15:46.6805900`), as in
  `../shared/traces/azure-llm-2023/`. Arrival times become seconds from the first request.
- **Spot capacity**: skypilot's spot traces (`{"metadata": {"gap_seconds": G}, "data": [n...]}`),
  `data[i]` the spot nodes available or alive at tick i. A drop is a preemption, a rise capacity
  coming back.

A trace that cannot be replayed faithfully is refused, never patched: a bad row, an empty file
or a timestamp earlier than the one before it is a `TraceError` naming the file, the line and
the fix (sorting a file silently would hide a broken export).
"""

from __future__ import annotations

import csv
import datetime
import json
from dataclasses import dataclass
from pathlib import Path

from stoke.errors import StokeError

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


class TraceError(StokeError):
    """A trace file the simulator cannot replay; the message names the file, line and fix."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float
    """Seconds after the trace's first request."""
    context_tokens: int
    generated_tokens: int


@dataclass(frozen=True, slots=True)
class SpotTrace:
    name: str
    """The file's stem: it names the zone the trace stands for."""
    gap_s: float
    counts: tuple[int, ...]

    @property
    def peak(self) -> int:
        return max(self.counts)

    def at(self, t: float) -> int:
        """Nodes available at `t` seconds into the trace (it wraps around past its end)."""
        return self.counts[int(t // self.gap_s) % len(self.counts)]


def read_requests(path: Path) -> list[TraceRequest]:
    """The requests of an Azure-format trace, in arrival order."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the request trace ({exc.strerror})") from None
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    if header is None or tuple(c.strip() for c in header) != AZURE_COLUMNS:
        raise TraceError(
            f"{path} line 1: expected the header {','.join(AZURE_COLUMNS)} (the Azure LLM "
            f"inference trace format), got {header!r}"
        )
    out: list[TraceRequest] = []
    first: datetime.datetime | None = None
    for line, row in enumerate(rows, start=2):
        if not row:
            continue
        stamp, context, generated = _azure_row(path, line, row)
        first = first or stamp
        arrival = (stamp - first).total_seconds()
        if out and arrival < out[-1].arrival_s:
            raise TraceError(
                f"{path} line {line}: timestamp {row[0]} is earlier than the row before it; "
                f"the trace must be in arrival order (sort it by TIMESTAMP)"
            )
        out.append(TraceRequest(arrival, context, generated))
    if not out:
        raise TraceError(f"{path}: no requests after the header; give a trace with at least one")
    return out


def _azure_row(path: Path, line: int, row: list[str]) -> tuple[datetime.datetime, int, int]:
    if len(row) != len(AZURE_COLUMNS):
        raise TraceError(
            f"{path} line {line}: {len(row)} fields, expected 3 "
            f"({','.join(AZURE_COLUMNS)}); fix or remove the row"
        )
    try:
        stamp = datetime.datetime.fromisoformat(_seven_digits_to_six(row[0].strip()))
    except ValueError:
        raise TraceError(
            f"{path} line {line}: {row[0]!r} is not a timestamp like 2023-11-16 18:15:46.6805900"
        ) from None
    counts = []
    for name, value in zip(AZURE_COLUMNS[1:], row[1:], strict=True):
        if not value.strip().isdigit():
            raise TraceError(
                f"{path} line {line}: {name} {value!r} is not a whole number of tokens >= 0"
            )
        counts.append(int(value))
    return stamp, counts[0], counts[1]


def _seven_digits_to_six(stamp: str) -> str:
    """Azure's timestamps carry 100 ns digits (7); Python parses at most microseconds (6)."""
    head, dot, frac = stamp.partition(".")
    return f"{head}.{frac[:6]}" if dot and frac.isdigit() else stamp


def read_spot(path: Path) -> SpotTrace:
    """A skypilot spot trace: gap_seconds and counts of nodes (whole numbers >= 0)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the spot trace ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path} line {exc.lineno}: not JSON ({exc.msg})") from None
    meta = data.get("metadata") if isinstance(data, dict) else None
    gap = meta.get("gap_seconds") if isinstance(meta, dict) else None
    if not isinstance(gap, int | float) or isinstance(gap, bool) or gap <= 0:
        raise TraceError(
            f"{path}: metadata.gap_seconds {gap!r} is not a positive number; a spot trace is "
            '{"metadata": {"gap_seconds": G}, "data": [n0, n1, ...]}'
        )
    counts = data.get("data")
    if not isinstance(counts, list) or not counts:
        raise TraceError(f"{path}: `data` must be a non-empty list of node counts")
    for i, n in enumerate(counts):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise TraceError(f"{path}: data[{i}] {n!r} is not a whole number of nodes >= 0")
    if max(counts) == 0:
        raise TraceError(f"{path}: every count is 0; a trace with no spot capacity at all")
    return SpotTrace(path.stem, float(gap), tuple(counts))
