"""The summary of `stoke bench coldstart`: medians per kind, the disk ceiling, the controller's
overhead, the issue's targets (stated for the 1b model), as a Markdown table or JSON."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

DISK_VS_TRANSFORMERS = 5.0  # cold from disk at least 5x faster than transformers
DISK_SLACK = 1.15  # cold from disk within 1.15x of (bytes / O_DIRECT ceiling + warm TTFT)
# cold from DRAM within warm TTFT + 100 ms (a GB-scale model; + 50 ms for smaller ones)
DRAM_ALLOWANCE_S, DRAM_ALLOWANCE_SMALL_S = 0.100, 0.050
OVERHEAD_LIMIT_S = 0.002  # controller overhead under 2 ms at the median

COLD_LABELS = {
    "dram": "cold: DRAM tier",
    "disk": "cold: local disk, page cache evicted",
    "s3": "cold: S3 (loopback S3 server)",
}
PHASES = ("load_s", "queue_s", "fetch_s", "read_build_s", "streamed_s", "rest_s")


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _row(label: str, kind: str, samples: list[dict[str, Any]], field: str) -> dict[str, Any]:
    return {"label": label, "kind": kind, "n": len(samples),
            "ttft_s": _median([s[field] for s in samples])}  # fmt: skip


def summarize(results: list[dict[str, Any]], nbytes: int) -> dict[str, Any]:
    """Rows (median TTFT and load phases per kind), disk ceiling, overhead and targets."""
    of = {kind: [r for r in results if r["kind"] == kind] for kind in {r["kind"] for r in results}}
    warm = of.get("warm", [])
    rows = [
        _row("warm, through the controller (HTTP SSE)", "warm", warm, "ttft_s"),
        _row("warm, node Generate gRPC directly", "warm-direct", warm, "direct_s"),
    ]
    for kind, label in COLD_LABELS.items():
        samples = of.get(kind, [])
        for s in samples:
            s["load_s"] = s["load_ms"] / 1000
            s["rest_s"] = s["ttft_s"] - s["load_s"]
        row = _row(label, kind, samples, "ttft_s")
        row |= {phase: _median([s.get(phase) for s in samples]) for phase in PHASES}
        paired = [s["ttft_s"] - s["then_s"] for s in samples if s.get("then_s") is not None]
        row |= {"then_s": _median([s.get("then_s") for s in samples]), "paired_n": len(paired),
                "paired_extra_s": _median(list(paired))}  # fmt: skip
        tiers = Counter(s["tier"] or "?" for s in samples).most_common()
        row["tier"] = ", ".join(t if len(tiers) == 1 else f"{t} ({n})" for t, n in tiers)
        rows.append(row)
    hf = of.get("transformers", [])
    rows += [
        _row("transformers: from_pretrained + generate", "transformers", hf, "ttft_s"),
        _row("transformers: + imports (torch, transformers)", "transformers+imports", hf,
             "with_imports_s"),
        _row("transformers: whole process, from spawn", "transformers-process", hf, "process_s"),
    ]  # fmt: skip
    rows[-3] |= {"load_s": _median([h["load_s"] for h in hf]),
                 "rest_s": _median([h["generate_s"] for h in hf])}  # fmt: skip
    baseline = rows[-3]["ttft_s"]
    for row in rows:
        ok = baseline is not None and row["ttft_s"]
        row["vs_transformers"] = baseline / row["ttft_s"] if ok else None
    reads = of.get("disk-read", [])
    seconds = _median([r["seconds"] for r in reads])
    disk: dict[str, Any] = {"n": len(reads), "seconds": seconds}
    if seconds:
        gbps = reads[0]["bytes"] / seconds / 1e9
        disk |= {"gbps": gbps, "checkpoint_s": nbytes / (gbps * 1e9)}
    probe = of.get("probe", [])
    overhead = _overhead(probe) | {"healthz_s": _median([r["healthz_s"] for r in probe])}
    overhead["on_model"] = _overhead(warm)
    server = of.get("server-ttft", [{}])[0]
    if server.get("count"):
        overhead["server_mean_s"] = server["sum_s"] / server["count"]
        overhead["http_mean_s"] = statistics.fmean(p["ttft_s"] for p in probe)
        overhead["direct_mean_s"] = statistics.fmean(p["direct_s"] for p in probe)
    by_kind = {row["kind"]: row["ttft_s"] for row in rows}
    summary = {"rows": rows, "disk_read": disk, "overhead": overhead}
    allowance = DRAM_ALLOWANCE_S if nbytes >= 1e9 else DRAM_ALLOWANCE_SMALL_S
    dram_row = next(r for r in rows if r["kind"] == "dram")
    goals = targets(by_kind, disk, overhead, allowance)
    if dram_row["paired_extra_s"] is not None:
        extra = dram_row["paired_extra_s"]
        goals.insert(-1 if overhead.get("median_s") is not None else len(goals), {
            "target": f"cold from DRAM within warm TTFT + {allowance * 1e3:.0f} ms, warm being "
            "the same instance's next request",
            "met": extra <= allowance,
            "detail": f"warm + {extra * 1e3:.0f} ms (median of {dram_row['paired_n']} starts' "
            "differences)",
        })  # fmt: skip
    return summary | {"targets": goals}


def _overhead(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median (and deciles) of the per-pair differences, and each side's median TTFT."""
    diffs = [p["overhead_s"] for p in pairs]
    out = {"pairs": len(diffs), "median_s": _median(list(diffs)),
           "http_s": _median([p["ttft_s"] for p in pairs]),
           "direct_s": _median([p["direct_s"] for p in pairs])}  # fmt: skip
    if len(diffs) >= 2:
        deciles = statistics.quantiles(diffs, n=10)
        out |= {"p10_s": deciles[0], "p90_s": deciles[-1]}
    return out


def targets(
    ttft: dict[str, float | None],
    disk: dict[str, Any],
    overhead: dict[str, Any],
    dram_allowance_s: float = DRAM_ALLOWANCE_S,
) -> list[dict[str, Any]]:
    """Each target: met or not, the measured ratio or value, and the numbers behind it."""
    warm, dram, cold = ttft.get("warm"), ttft.get("dram"), ttft.get("disk")
    hf, read_s = ttft.get("transformers"), disk.get("checkpoint_s")
    out = []
    if cold and hf:
        speedup = hf / cold
        out.append({
            "target": f"cold from disk >= {DISK_VS_TRANSFORMERS:g}x faster than transformers",
            "met": speedup >= DISK_VS_TRANSFORMERS,
            "detail": f"{speedup:.2f}x (disk {cold:.3f} s, transformers from_pretrained + "
            f"generate {hf:.3f} s)",
        })  # fmt: skip
    if cold and warm and read_s:
        ideal = read_s + warm
        out.append({
            "target": f"cold from disk within {DISK_SLACK:g}x of bytes / disk bandwidth + "
            "warm TTFT",
            "met": cold <= DISK_SLACK * ideal,
            "detail": f"{cold / ideal:.2f}x (disk {cold:.3f} s vs {read_s:.3f} s read at "
            f"{disk['gbps']:.2f} GB/s + {warm * 1e3:.1f} ms warm = {ideal:.3f} s; bound "
            f"{DISK_SLACK * ideal:.3f} s)",
        })  # fmt: skip
    if dram and warm:
        bound = warm + dram_allowance_s
        out.append({
            "target": f"cold from DRAM within warm TTFT + {dram_allowance_s * 1e3:.0f} ms",
            "met": dram <= bound,
            "detail": f"warm + {(dram - warm) * 1e3:.0f} ms (DRAM {dram:.3f} s, warm "
            f"{warm:.3f} s; bound {bound:.3f} s)",
        })  # fmt: skip
    median = overhead.get("median_s")
    if median is not None:
        out.append({
            "target": f"controller overhead < {OVERHEAD_LIMIT_S * 1e3:g} ms at the median",
            "met": median < OVERHEAD_LIMIT_S,
            "detail": f"{median * 1e3:+.2f} ms over {overhead['pairs']} pairs on the tiny "
            "probe model",
        })  # fmt: skip
    return out


def _ms(value: float | None) -> str:
    return f"{value * 1e3:.1f}" if value is not None else "-"


def table(meta: dict[str, Any], summary: dict[str, Any]) -> str:
    """The Markdown report: the TTFT table, the ceiling, the overhead, the targets."""
    lines = [
        f"demo-llama-{meta['size']}: {meta['checkpoint_bytes'] / 1e9:.2f} GB checkpoint, prompt "
        f"of {meta['prompt_tokens']} tokens, max_tokens {meta['max_tokens']}, "
        f"{meta['rounds']} rounds, {meta['cpus']} CPUs, {meta['threads']} torch threads "
        f"(1-min load average "
        f"{meta['loadavg_before']:.1f} before, {meta['loadavg_after']:.1f} after); medians, "
        "times in ms",
        "",
        "| start | TTFT | n | transformers / this | load (x-stoke-load-ms; transformers: "
        "from_pretrained) | queue | fetch | read+build | streamed | TTFT - load | tier (header) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        speed = f"{r['vs_transformers']:.1f}x" if r.get("vs_transformers") else "-"
        phases = " | ".join(_ms(r.get(p)) for p in PHASES)
        lines.append(
            f"| {r['label']} | {_ms(r['ttft_s'])} | {r['n']} | {speed} | {phases} "
            f"| {r.get('tier') or '-'} |"
        )
    for r in summary["rows"]:
        if r.get("paired_extra_s") is not None:
            lines.append(
                f"{r['label']}: the same instance's next request, once the node had replaced "
                f"its worker: TTFT {_ms(r['then_s'])}; the start cost "
                f"{r['paired_extra_s'] * 1e3:+.1f} ms over it (median of {r['paired_n']} "
                "starts' differences)"
            )
    disk = summary["disk_read"]
    if disk.get("gbps"):
        lines += [
            "",
            f"disk read ceiling: {disk['gbps']:.2f} GB/s (cold, O_DIRECT, parallel preads; "
            f"median of {disk['n']}): the checkpoint in {disk['checkpoint_s']:.3f} s",
        ]
    o = summary["overhead"]
    for label, stats in (("tiny probe model", o), (f"this model ({meta['size']})", o["on_model"])):
        if stats.get("p10_s") is not None:
            lines.append(
                f"controller overhead, {label}: median {stats['median_s'] * 1e3:+.2f} ms over "
                f"{stats['pairs']} pairs (p10 {stats['p10_s'] * 1e3:+.2f}, p90 "
                f"{stats['p90_s'] * 1e3:+.2f}; TTFT {_ms(stats['http_s'])} via the controller, "
                f"{_ms(stats['direct_s'])} direct)"
            )
    if o.get("server_mean_s") is not None:
        lines.append(
            f"tiny probe, means: {_ms(o['http_mean_s'])} via the controller, of which "
            f"{_ms(o['server_mean_s'])} inside it (its stoke_ttft_seconds: parsed and tokenized "
            f"request -> first token), vs {_ms(o['direct_mean_s'])} straight to the node"
        )
    lines.append(f"for scale: a GET /healthz round trip takes {_ms(o['healthz_s'])} ms")
    lines += ["", "targets (stated for the 1b model):"]
    for t in summary["targets"]:
        lines.append(f"- {t['target']}: {'met' if t['met'] else 'MISSED'}, {t['detail']}")
    return "\n".join(lines)


def report_json(
    meta: dict[str, Any], summary: dict[str, Any], results: list[dict[str, Any]]
) -> dict[str, Any]:
    """Everything, samples included, for `--json`."""
    return meta | summary | {"samples": results}
