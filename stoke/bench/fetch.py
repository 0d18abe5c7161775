"""`stoke bench fetch`: S3 download throughput of stoke's fetcher vs boto3's `download_file`,
and disk -> DRAM promotion time vs the machine's raw read ceiling.

The benchmark starts its own S3-compatible server (moto, in a child process on 127.0.0.1),
pushes one synthetic checkpoint, then alternates methods within each round, every measurement
in a fresh process:

- download: stoke (`CheckpointStore.ensure(uri, "disk")`: parallel ranged GETs, every chunk
  CRC-checked, written into the disk tier) vs `boto3` `download_file` of the same partition
  object with default settings (no checksums of ours);
- promote, warm and cold (page cache evicted): stoke (`ensure(path, "dram")` of the local
  checkpoint, which the disk tier holds, into /dev/shm) vs `cp` (`shutil.copyfile` into
  /dev/shm) vs raw-read, the ceiling: the same file read by parallel preads with the store's
  threads and read size into reused per-thread buffers (O_DIRECT when cold), writing nothing,
  so it is what the disk (or page cache) delivers with no destination memory to fill.

`--tests promote` skips the S3 server and the downloads (slow for GiB checkpoints).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from stoke.bench.common import default_workdir

BUCKET = "stoke-bench"
TESTS = ("download", "promote")
BASELINES = {"download": "boto3-download_file", "promote": "raw-read"}
NODE = f"bench-fetch-{os.getpid()}"


def register(benches: argparse._SubParsersAction) -> None:
    """Add `stoke bench fetch`."""
    parser = benches.add_parser(
        "fetch",
        help="S3 download and disk->DRAM promotion GB/s: stoke vs boto3 vs raw reads",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", default="256MiB", help="checkpoint size (256MiB)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--concurrency", type=int, default=16, help="stoke GETs in flight (16)")
    parser.add_argument("--part-size", default="16MiB", help="stoke ranged GET size (16MiB)")
    parser.add_argument("--workdir", type=Path, help="scratch space on a real disk (not tmpfs)")
    parser.add_argument(
        "--tests",
        nargs="+",
        choices=list(TESTS),
        default=list(TESTS),
        help="which comparisons to run (download promote)",
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.set_defaults(func=run)


# -- the parent: setup, alternation, summary ----------------------------------------------------


def _start_s3_server() -> tuple[subprocess.Popen[str], str]:
    """moto in a child process on a free loopback port; it prints the port once serving."""
    code = (
        "import logging, sys; from moto.server import ThreadedMotoServer; "
        "logging.getLogger('werkzeug').setLevel(logging.ERROR); "
        "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False); s.start(); "
        "print(s.get_host_and_port()[1], flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    port = proc.stdout.readline().strip()
    if not port.isdigit():
        proc.kill()
        raise RuntimeError("the moto S3 server did not start (is moto[server] installed?)")
    return proc, f"http://127.0.0.1:{port}"


def _s3_env(endpoint: str) -> dict[str, str]:
    """Environment that points boto3 at the loopback server only, never at AWS."""
    return os.environ | {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def _worker(env: dict[str, str], *args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "stoke.bench.fetch", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker {args[0]} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _measure(env: dict[str, str], work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (test, round, method) measurement, methods rotated within each round."""
    common = ["--work", str(work), "--concurrency", str(args.concurrency)]
    common += ["--part-size", args.part_size]
    plans = [
        ("download", ["stoke-fetch", "boto3-download_file"]),
        ("promote warm", ["stoke-promote", "cp", "raw-read"]),
        ("promote cold", ["stoke-promote", "cp", "raw-read"]),
    ]
    plans = [(test, methods) for test, methods in plans if test.split()[0] in args.tests]
    results = []
    for test, methods in plans:
        cold = ["--cold"] if test.endswith("cold") else []
        for round_ in range(args.rounds):
            shift = round_ % len(methods)
            for method in methods[shift:] + methods[:shift]:
                report = _worker(env, method, *common, *cold) | {"test": test, "method": method}
                results.append(report)
                gbps = report["bytes"] / report["seconds"] / 1e9
                print(
                    f"[{test} {round_ + 1}/{args.rounds}] {method:>20}: "
                    f"{report['seconds']:.3f} s {gbps:6.2f} GB/s",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median per (test, method), with each test's ratio to its first method's baseline."""
    keys = list(dict.fromkeys((r["test"], r["method"]) for r in results))
    rows = []
    for test, method in keys:
        runs = [r for r in results if (r["test"], r["method"]) == (test, method)]
        seconds = statistics.median(r["seconds"] for r in runs)
        rows.append(
            {
                "test": test,
                "method": method,
                "seconds": seconds,
                "gbps": runs[0]["bytes"] / seconds / 1e9,
            }
        )
    for row in rows:
        peers = {r["method"]: r for r in rows if r["test"] == row["test"]}
        base = peers.get(BASELINES[row["test"].split()[0]])
        row["ratio"] = row["gbps"] / base["gbps"] if base else None
    return rows


def table(rows: list[dict[str, Any]], nbytes: int) -> str:
    """Markdown table; `ratio` is GB/s over the test's baseline: boto3 for downloads, the
    raw-read ceiling for promotions (1.00 = as fast as the disk delivers)."""
    lines = [
        f"{nbytes / 2**20:.0f} MiB checkpoint, medians",
        "",
        "| test | method | seconds | GB/s | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x {BASELINES[r['test'].split()[0]]}" if r["ratio"] else "-"
        lines.append(
            f"| {r['test']} | {r['method']} | {r['seconds']:.3f} | {r['gbps']:.2f} | {ratio} |"
        )
    lines += [
        "",
        "ratio: GB/s over boto3's download_file for downloads; for promotions, over raw-read,",
        "the read ceiling (parallel preads into reused buffers, O_DIRECT when cold, no writes).",
    ]
    return "\n".join(lines)


def _prepare(work: Path, nbytes: int, env: dict[str, str], args: argparse.Namespace) -> int:
    """Write the checkpoint, push it, and fill the shared disk tier the promotions read."""
    from checkpoint_format import write_checkpoint
    from stoke.bench.load_files import synthetic_state_dict

    print(f"writing a {nbytes / 2**20:.0f} MiB checkpoint...", file=sys.stderr, flush=True)
    manifest = write_checkpoint(synthetic_state_dict(nbytes), work / "ckpt")  # type: ignore[arg-type]
    upload = ["--upload"] if "download" in args.tests else []
    _worker(env, "setup", "--work", str(work), "--part-size", args.part_size, *upload)
    return manifest.total_bytes


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print the table (or JSON)."""
    from node_agent.facts.errors import InvalidSizeError
    from node_agent.facts.units import parse_size
    from stoke.errors import StokeError

    try:
        nbytes = parse_size(args.size, what="--size", minimum=16 << 20)
        parse_size(args.part_size, what="--part-size", minimum=4096)
    except InvalidSizeError as exc:
        raise StokeError(str(exc)) from None
    base = args.workdir or default_workdir() / "fetch"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-fetch-", dir=base))
    server, endpoint = _start_s3_server() if "download" in args.tests else (None, "")
    try:
        env = _s3_env(endpoint) if server else dict(os.environ)
        total = _prepare(work, nbytes, env, args)
        results = _measure(env, work, args)
        rows = summarize(results)
    finally:
        if server is not None:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    arena = _arena_cost(results)
    if args.json:
        print(json.dumps({"bytes": total, "rows": rows, "arena_s_per_gib": arena}, indent=1))
    else:
        print(table(rows, total))
        if arena is not None:
            print(f"\nDRAM arena start-up (allocate + fault in, once per node): {arena:.3f} s/GiB")
    return 0


def _arena_cost(results: list[dict[str, Any]]) -> float | None:
    """Median start-up cost of the DRAM arena over the promotions, seconds per GiB."""
    costs = sorted(r["arena_s_per_gib"] for r in results if "arena_s_per_gib" in r)
    return costs[len(costs) // 2] if costs else None


# -- the workers: one measurement each, in a fresh process --------------------------------------


def _config(
    work: Path, disk: Path, args: argparse.Namespace, node: str, *, dram: bool = False
) -> Any:
    """The store's configuration; `dram`: with a DRAM arena just large enough for the
    checkpoint (made and faulted in when the store opens, before any timing)."""
    from checkpoint_format import read_manifest
    from node_agent.facts.units import parse_size
    from node_agent.store import FetchConfig, StoreConfig

    fetch = FetchConfig(part_size=parse_size(args.part_size), concurrency=args.concurrency)
    dram_budget = read_manifest(work / "ckpt").total_bytes + (16 << 20)
    return StoreConfig(
        node_id=node,
        disk_dir=disk,
        disk_budget=1 << 40,
        dram_budget=dram_budget,
        dram_arena=dram,
        fetch=fetch,
    )


def _partition(work: Path) -> Path:
    return next((work / "ckpt").glob("partition-*.bin"))


def _work_setup(args: argparse.Namespace) -> dict[str, Any]:
    """Push the checkpoint to S3 (for the downloads) and import it into the disk tier that the
    promotions read."""
    from node_agent.store import CheckpointStore, upload_checkpoint

    if args.upload:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        upload_checkpoint(args.work / "ckpt", f"s3://{BUCKET}/ckpt")
    config = _config(args.work, args.work / "disk", args, NODE)
    try:
        with CheckpointStore(config) as store:
            store.ensure(args.work / "ckpt", "disk")
    finally:
        shutil.rmtree(config.dram_root, ignore_errors=True)
    return {"seconds": 0.0, "bytes": 0}


def _work_stoke_fetch(args: argparse.Namespace) -> dict[str, Any]:
    from node_agent.store import CheckpointStore

    disk = Path(tempfile.mkdtemp(dir=args.work, prefix="disk-"))
    config = _config(args.work, disk, args, NODE)
    try:
        with CheckpointStore(config) as store:
            assert store.fetcher.client  # boto3 imported and client built before timing
            start = time.perf_counter()
            store.ensure(f"s3://{BUCKET}/ckpt", "disk")
            seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(disk)
        shutil.rmtree(config.dram_root, ignore_errors=True)
    return {"seconds": seconds, "bytes": _partition(args.work).stat().st_size}


def _work_boto3(args: argparse.Namespace) -> dict[str, Any]:
    import boto3

    part = _partition(args.work)
    dest = args.work / "boto3-download.bin"
    client = boto3.client("s3")
    start = time.perf_counter()
    client.download_file(BUCKET, f"ckpt/{part.name}", str(dest))
    seconds = time.perf_counter() - start
    dest.unlink()
    return {"seconds": seconds, "bytes": part.stat().st_size}


def _disk_partition(args: argparse.Namespace) -> Path:
    return next((args.work / "disk").glob("*/partition-*.bin"))


def _set_cache(path: Path, cold: bool) -> None:
    from loader.sysio import evict_from_page_cache

    if cold:
        evict_from_page_cache(path)
    else:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def _work_stoke_promote(args: argparse.Namespace) -> dict[str, Any]:
    from node_agent.facts.tiers import TierName
    from node_agent.store import CheckpointStore

    config = _config(args.work, args.work / "disk", args, NODE, dram=True)
    _set_cache(_disk_partition(args), args.cold)
    try:
        with CheckpointStore(config) as store:  # the arena is made here, once, untimed
            arena_cost = store.tiers[TierName.DRAM].arena_seconds_per_gib
            start = time.perf_counter()
            store.ensure(args.work / "ckpt", "dram")  # held by the disk tier: a promotion
            seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(config.dram_root, ignore_errors=True)
    nbytes = _disk_partition(args).stat().st_size
    return {"seconds": seconds, "bytes": nbytes, "arena_s_per_gib": arena_cost}


def _work_cp(args: argparse.Namespace) -> dict[str, Any]:
    src = _disk_partition(args)
    _set_cache(src, args.cold)
    dest = Path("/dev/shm") / f"{NODE}-cp.bin"
    start = time.perf_counter()
    shutil.copyfile(src, dest)
    seconds = time.perf_counter() - start
    dest.unlink()
    return {"seconds": seconds, "bytes": src.stat().st_size}


def _work_raw_read(args: argparse.Namespace) -> dict[str, Any]:
    src = _disk_partition(args)
    _set_cache(src, args.cold)
    seconds = read_ceiling_seconds(src, direct=args.cold)
    return {"seconds": seconds, "bytes": src.stat().st_size}


def read_ceiling_seconds(path: Path, *, direct: bool, threads: int | None = None) -> float:
    """Seconds to read all of `path` with the store's copy threads (or `threads`) and read
    size, each thread into one reused page-aligned buffer (O_DIRECT if `direct`), keeping
    nothing.

    Reused buffers, not one buffer the file's size: reads into fresh memory also pay for
    faulting its pages in, which is the copy's cost, not the disk's; that ceiling measured
    lower than a promotion that reads through small buffers."""
    from loader.sysio import anonymous_buffer, open_read
    from node_agent.store import StoreConfig

    threads = threads or StoreConfig.copy_threads  # the defaults
    size = StoreConfig.copy_read_size
    nbytes = path.stat().st_size
    buffers = [anonymous_buffer(size) for _ in range(threads)]
    for buf in buffers:
        buf.write(bytes(size))  # fault every page in before timing
    fd, _ = open_read(path, direct=direct)
    spans = [range(i * size, nbytes, threads * size) for i in range(threads)]
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(partial(_read_spans, fd, size, nbytes), buffers, spans))
        return time.perf_counter() - start
    finally:
        os.close(fd)
        for buf in buffers:
            buf.close()


def _read_spans(fd: int, size: int, nbytes: int, buf: mmap.mmap, offsets: range) -> None:
    with memoryview(buf) as view:
        for off in offsets:
            got, want = 0, min(size, nbytes - off)
            while got < want:
                n = os.preadv(fd, [view[got:size]], off + got)
                if n == 0:
                    raise OSError(f"file ended early at byte {off + got}")
                got += n


WORKERS = {
    "setup": _work_setup,
    "stoke-fetch": _work_stoke_fetch,
    "boto3-download_file": _work_boto3,
    "stoke-promote": _work_stoke_promote,
    "cp": _work_cp,
    "raw-read": _work_raw_read,
}


def worker_main(argv: list[str] | None = None) -> int:
    """`python -m stoke.bench.fetch METHOD --work DIR ...`: one measurement, JSON on stdout."""
    parser = argparse.ArgumentParser(prog="stoke.bench.fetch worker")
    parser.add_argument("method", choices=sorted(WORKERS))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--part-size", default="16MiB")
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--upload", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(WORKERS[args.method](args)))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
