"""The side-by-side table `stoke simulate` prints: one column per run, one row per measure."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from stoke.simulate.metrics import RunResult

Row = tuple[str, Callable[[dict[str, Any]], str]]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _dict(values: dict[str, Any], fmt: str = "{}") -> str:
    return ", ".join(f"{k} {fmt.format(v)}" for k, v in values.items()) or "-"


ROWS: tuple[Row, ...] = (
    ("cost (total)", lambda s: f"${s['cost_total_usd']:.2f}"),
    ("cost per hour", lambda s: f"${s['cost_per_hour_usd']:.2f}"),
    ("TTFT p50", lambda s: _ms(s["ttft_p50_s"])),
    ("TTFT p95", lambda s: _ms(s["ttft_p95_s"])),
    ("TTFT p99", lambda s: _ms(s["ttft_p99_s"])),
    ("SLO attainment", lambda s: f"{s['slo_attainment'] * 100:.2f}%"),
    ("requests", lambda s: str(s["requests"])),
    ("lost", lambda s: str(s["lost"])),
    ("cold starts", lambda s: f"{s['cold_starts_total']} ({_dict(s['cold_starts'])})"),
    ("idle instance-hours", lambda s: f"{s['idle_instance_hours']:.2f}"),
    ("migrations", lambda s: str(s["migrations"])),
    ("resumed after preemption", lambda s: str(s["resumed"])),
    ("preemptions", lambda s: str(s["preemptions"])),
    ("spot launches refused", lambda s: str(s["spot_launches_refused"])),
    ("node-hours", lambda s: _dict(s["node_hours"], "{:.1f}")),
)


def table(results: Sequence[RunResult], markdown: bool = False) -> str:
    """Runs side by side (`markdown`: a Markdown table, as the README quotes them)."""
    summaries = [r.summary() for r in results]
    header = ["", *(s["policy"] for s in summaries)]
    rows = [header] + [[name, *(fmt(s) for s in summaries)] for name, fmt in ROWS]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|" + "---|" * len(header))
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
