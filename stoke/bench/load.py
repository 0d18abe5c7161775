"""`stoke bench load`: checkpoint load time of stoke vs safetensors vs torch.load, and the
machine's ceiling, warm (page cache hot) and cold (file pages evicted first).

Each load runs in a fresh process (`stoke.bench.load_worker`), methods alternate within each
round, and the table reports medians: GB/s, the ratio to the ceiling (raw parallel preads of
the same bytes into a pre-touched buffer, O_DIRECT when cold; pinned host->device copies on a
GPU), the speedup over safetensors, and the growth of peak RSS during the load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from stoke.bench.common import default_workdir
from stoke.bench.load_files import BenchFiles, prepare_model, prepare_synthetic, synthetic_size

COLD_CEILING_FRACTION = 0.8  # stoke cold >= 80% of raw O_DIRECT reads
GPU_CEILING_FRACTION = 0.8  # stoke to GPU >= 80% of pinned host->device bandwidth
GPU_SPEEDUP = 5.0  # and >= 5x safetensors load_file(device="cuda")


def register(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser(
        "load",
        help="checkpoint load GB/s: stoke vs safetensors vs torch.load vs raw reads",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--size", default="1GiB", help="synthetic checkpoint size (1GiB)")
    source.add_argument("--model", type=Path, help="a Hugging Face directory to convert instead")
    parser.add_argument("--workdir", type=Path, help="scratch space on a real disk (not tmpfs)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--threads", type=int, default=8, help="read threads, raw ceiling (8)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.set_defaults(func=run)


def methods(files: BenchFiles, gpu: bool) -> list[tuple[str, str, Path]]:
    """(row label, device, path) of every load the benchmark runs, in alternation order."""
    rows = [
        ("stoke", "cpu", files.stoke),
        ("safetensors", "cpu", files.safetensors),
        ("torch.load", "cpu", files.torch_pt),
        ("raw-read", "cpu", files.partition),
    ]
    if gpu:
        rows += [
            ("stoke", "cuda", files.stoke),
            ("safetensors", "cuda", files.safetensors),
            ("h2d", "cuda", files.partition),
        ]
    return rows


def run_worker(method: str, device: str, path: Path, cold: bool, threads: int) -> dict[str, Any]:
    """One load in a fresh interpreter; returns the worker's JSON report."""
    cmd = [sys.executable, "-m", "stoke.bench.load_worker", method, str(path), "--device", device]
    cmd += ["--threads", str(threads)] + (["--cold"] if cold else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} on {device} failed:\n{done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def set_cache(files: BenchFiles, *, cold: bool) -> None:
    """Evict every file's pages (cold) or read every file not fully cached yet (warm)."""
    from loader.sysio import evict_from_page_cache, resident_fraction

    for path in files.all_files():
        if cold:
            evict_from_page_cache(path)
        elif resident_fraction(path) < 1.0:
            with open(path, "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass


def measure(files: BenchFiles, rounds: int, threads: int, gpu: bool) -> list[dict[str, Any]]:
    """Every (condition, round, method) load; warm rounds first, then cold."""
    results = []
    for condition in ("warm", "cold"):
        cold = condition == "cold"
        for round_ in range(rounds):
            order = methods(files, gpu)
            shift = round_ % len(order)  # rotate, so no method always follows the same one
            for method, device, path in order[shift:] + order[:shift]:
                set_cache(files, cold=cold)
                report = run_worker(method, device, path, cold, threads)
                report |= {"condition": condition, "method": method, "device": device}
                results.append(report)
                gbps = report["bytes"] / report["seconds"] / 1e9
                print(
                    f"[{condition} {round_ + 1}/{rounds}] {method:>11} {device:>4}: "
                    f"{report['seconds']:.3f} s  {gbps:6.2f} GB/s",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median per (condition, device, method), with ratios to the ceiling and to safetensors."""
    keys = list(dict.fromkeys((r["condition"], r["device"], r["method"]) for r in results))
    rows = []
    for condition, device, method in keys:
        runs = [
            r
            for r in results
            if (r["condition"], r["device"], r["method"]) == (condition, device, method)
        ]
        seconds = statistics.median(r["seconds"] for r in runs)
        rss = [r["rss_growth"] for r in runs if "rss_growth" in r]
        rows.append({
            "condition": condition, "device": device, "method": method, "seconds": seconds,
            "gbps": runs[0]["bytes"] / seconds / 1e9,
            "rss_mib": statistics.median(rss) / 2**20 if rss else None,
            "strategy": ",".join(runs[0].get("strategy", [])) or None,
        })  # fmt: skip
    for row in rows:
        peers = {
            r["method"]: r
            for r in rows
            if r["condition"] == row["condition"] and r["device"] == row["device"]
        }
        ceiling = peers.get("raw-read" if row["device"] == "cpu" else "h2d")
        row["vs_ceiling"] = row["gbps"] / ceiling["gbps"] if ceiling else None
        st = peers.get("safetensors")
        row["vs_safetensors"] = st["seconds"] / row["seconds"] if st else None
    return rows


def targets(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """The issue's targets, each True when met in this run."""
    find = {(r["condition"], r["device"], r["method"]): r for r in rows}
    out = {
        "cold >= 80% of raw O_DIRECT reads": find["cold", "cpu", "stoke"]["vs_ceiling"]
        >= COLD_CEILING_FRACTION,
        "warm no slower than safetensors mmap": find["warm", "cpu", "stoke"]["vs_safetensors"]
        >= 1.0,
    }
    for condition in ("warm", "cold"):
        gpu = find.get((condition, "cuda", "stoke"))
        if gpu:
            out[f"gpu {condition} >= 80% of pinned h2d"] = gpu["vs_ceiling"] >= GPU_CEILING_FRACTION
            out[f"gpu {condition} >= 5x safetensors"] = gpu["vs_safetensors"] >= GPU_SPEEDUP
    return out


def table(rows: list[dict[str, Any]], nbytes: int) -> str:
    """A Markdown table of the summary rows."""
    head = (
        "| condition | device | method | seconds | GB/s | vs ceiling | vs safetensors | peak RSS +"
    )
    head += " |"
    lines = [f"{nbytes / 2**30:.2f} GiB of tensors, medians", "", head, "|" + "---|" * 8]
    for r in rows:
        label = r["method"] + (f" ({r['strategy']})" if r["strategy"] else "")
        ratio = f"{r['vs_ceiling']:.2f}" if r["vs_ceiling"] is not None else "-"
        speed = f"{r['vs_safetensors']:.2f}x" if r["vs_safetensors"] is not None else "-"
        rss = f"{r['rss_mib']:.0f} MiB" if r["rss_mib"] is not None else "-"
        lines.append(
            f"| {r['condition']} | {r['device']} | {label} | {r['seconds']:.3f} | "
            f"{r['gbps']:.2f} | {ratio} | {speed} | {rss} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from loader.sysio import is_memory_fs

    base = args.workdir or default_workdir() / "load"
    base.mkdir(parents=True, exist_ok=True)
    if is_memory_fs(base):
        print(f"warning: {base} is tmpfs: cold numbers will be warm", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="bench-load-", dir=base))
    try:
        if args.model:
            files = prepare_model(workdir, args.model)
        else:
            files = prepare_synthetic(workdir, synthetic_size(args.size))
        gpu = torch.cuda.is_available()
        rows = summarize(measure(files, args.rounds, args.threads, gpu))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    met = targets(rows)
    if args.json:
        print(json.dumps({"bytes": files.nbytes, "rows": rows, "targets": met}, indent=1))
    else:
        print(table(rows, files.nbytes))
        print()
        for name, ok in met.items():
            print(f"target {name}: {'met' if ok else 'NOT met'}")
    return 0
