"""Helpers shared by the benchmarks: where models live, and the machine's own ceilings."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def default_workdir() -> Path:
    """Where benchmarks keep the demo models they build ($STOKE_BENCH_DIR or ~/.cache)."""
    env = os.environ.get("STOKE_BENCH_DIR")
    return Path(env) if env else Path.home() / ".cache" / "stoke" / "bench"


def demo_model_dir(workdir: Path, size: str, arch: str = "llama") -> Path:
    """A demo model of `size`, built once and reused (deterministic, seed 0)."""
    from stoke.demo_model import make_demo_model

    path = workdir / f"demo-{arch}-{size}"
    if not (path / "config.json").exists():
        print(f"building the {size} demo model in {path} (once)...", file=sys.stderr, flush=True)
        make_demo_model(path, size=size, arch=arch, seed=0)
    return path


def read_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best-of-N memory read bandwidth (GB/s): a sum over a pre-touched buffer."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9
