"""One timed load in a fresh process, for `stoke bench load`: `python -m stoke.bench.load_worker`.

Prints one JSON line: seconds (the load alone, interpreter and imports excluded), bytes, the
growth of peak RSS during the load, and method-specific facts. Every method ends with every
page of every tensor present: stoke populates its pages itself and torch.load copies them, but
safetensors' mmap is lazy, so its pages are touched inside the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def touch_pages(tensors: dict[str, torch.Tensor]) -> int:
    """Read one byte of every 4 KiB page of every tensor; returns the bytes covered."""
    total = 0
    for t in tensors.values():
        if t.numel():
            flat = t.reshape(-1).view(torch.uint8)
            flat[::4096].amax()
            total += flat.numel()
    return total


def load_stoke(path: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from loader import load_checkpoint

    result = load_checkpoint(path, device=device, strategy=os.environ.get("STOKE_LOAD_STRATEGY"))
    facts = {"strategy": sorted({s.value for s in result.strategies.values()})}
    return result.tensors, facts


def load_safetensors(path: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file, device=device))
    return tensors, {}


def load_torch(path: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return torch.load(path, map_location=device, weights_only=True), {}


def raw_read(path: Path, cold: bool, threads: int) -> dict[str, Any]:
    """The ceiling: parallel preads of the partition file into a pre-touched aligned buffer."""
    from loader.plan import plan_reads
    from loader.preader import PartitionFiles, read_parallel
    from loader.sysio import anonymous_buffer

    size = path.stat().st_size
    buf = anonymous_buffer(size)
    view = memoryview(buf)
    for offset in range(0, size, 4096):
        view[offset] = 1
    start = time.perf_counter()
    with PartitionFiles({0: path}, direct=cold) as files:
        read_parallel(files, plan_reads([size]), lambda t: view[t.offset :], threads)
        direct = files.direct
    return {"seconds": time.perf_counter() - start, "bytes": size, "direct": direct}


def h2d_copy(nbytes: int = 512 << 20, repeats: int = 5) -> dict[str, Any]:
    """The GPU ceiling: best-of-N pinned host -> device copy of `nbytes`."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return {"seconds": best, "bytes": nbytes}


def _unique(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Tensors with tied ones (same data pointer) counted once."""
    return list({t.data_ptr(): t for t in tensors.values()}.values())


LOADERS = {"stoke": load_stoke, "safetensors": load_safetensors, "torch.load": load_torch}


def run_one(method: str, path: Path, device: str, cold: bool, threads: int) -> dict[str, Any]:
    """Time one load of `path` by `method` on `device`; see the module docstring."""
    if method == "raw-read":
        return raw_read(path, cold, threads)
    if method == "h2d":
        return h2d_copy()
    # Imports happen outside the timed region, for every method alike.
    import safetensors.torch

    import loader.api  # `import loader` alone is lazy: import the code that loads, here

    del loader, safetensors
    before = peak_rss()
    start = time.perf_counter()
    tensors, facts = LOADERS[method](path, device)
    if device == "cpu" and method == "safetensors":
        touch_pages(tensors)
    if device != "cpu":
        torch.cuda.synchronize()
    nbytes = sum(t.numel() * t.element_size() for t in _unique(tensors))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": nbytes, "rss_growth": peak_rss() - before, **facts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("method", choices=[*LOADERS, "raw-read", "h2d"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cold", action="store_true", help="the parent evicted the files")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(json.dumps(run_one(args.method, args.path, args.device, args.cold, args.threads)))


if __name__ == "__main__":
    main()
