"""`stoke bench coldstart`: time to first token (TTFT) of a warm instance, of cold starts from
the node's DRAM tier, from local disk (page cache evicted) and from S3, and of what a user would
otherwise run (transformers `from_pretrained` + `generate` in a fresh process), plus the
controller's added latency over calling the node directly.

The benchmark starts its own cluster (a controller and one node agent, as processes, in a
scratch home) and a read-only loopback S3 server (`stoke.bench.coldstart_s3`; moto's reads a
whole object per ranged GET, which a 4 GB partition cannot afford) over the demo model, converted
once to a stoke checkpoint. TTFT is taken on the client (the standard library's http.client on a
kept-alive connection, so no client library's own overhead is charged to the controller): from
sending a streaming /v1/completions request (a short fixed prompt, greedy, --max-tokens) to the
first SSE chunk carrying text. Functions on the same checkpoint:

- bench-warm (keep_alive 1 h): the warm instance. Each round sends --pairs/--rounds pairs of the
  same request through the controller and straight to the node's Generate gRPC on that instance,
  in alternating order; warm TTFT is the median of the former.
- bench-probe (keep_alive 1 h), on the tiny demo model: the same pairs again. The controller's
  overhead is the median of the per-pair differences; it is judged on this model, whose forward
  pass takes milliseconds, because a 1b forward on a shared CPU varies by far more than the
  milliseconds being measured (the same figure on bench-warm is reported too).
- bench-cold (keep_alive 8 s) and bench-s3 (its s3:// twin, keep_alive 8 s): each cold start is
  a real scale-from-zero: the benchmark waits until the autoscaler has stopped the instance and
  the node has a pre-started worker again, sets up the tiers (DRAM: the checkpoint stays there;
  disk: evicted from DRAM through the node's Evict RPC and the disk-tier files dropped from the
  page cache; S3: evicted from both tiers, the S3 server's files read into the page cache so
  that it serves from memory as a remote store would), then sends one request. The keep-alive
  leaves time to read the instance's per-phase load timings from the node's Status and, once
  the node has pre-started a worker again, to send the same request to the same instance: its
  TTFT is that process's warm TTFT at that moment, and the difference is the start's own cost,
  free of the drift between rounds (reported beside the difference of medians).
  bench-warm is deleted (and redeployed later) before disk and S3 starts: it pins the DRAM copy.

Each round runs every kind once, rotated (warm, dram, disk, s3, transformers, disk-read: the
disk's own ceiling, cold parallel O_DIRECT reads of the disk tier's partition files); the table
reports medians and the issue's targets for the 1b model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from node_agent.facts.tiers import TierName
from stoke.bench.coldstart_cluster import BenchCluster, NodeSizing
from stoke.bench.coldstart_kinds import (
    COLD,
    COLD_KEEP_ALIVE_S,
    PROBE,
    PROMPT,
    S3,
    WARM_KEEP_ALIVE_S,
    Setup,
    measure_cold,
    measure_disk_read,
    measure_transformers,
    measure_warm,
    spec,
)
from stoke.bench.common import default_workdir, demo_model_dir
from stoke.errors import StokeError

KINDS = ("warm", "dram", "disk", "s3", "transformers", "disk-read")
COLD_KINDS = ("dram", "disk", "s3")
BUCKET = "stoke-bench"
SLOTS = 3  # the warm instance, one cold one, the overhead probe


def _sizing(size: str, threads: int) -> NodeSizing:
    if size == "1b":
        return NodeSizing("12GiB", "8GiB", "20GiB", SLOTS, threads)
    return NodeSizing("4GiB", "2GiB", "8GiB", SLOTS, threads)


def register(benches: argparse._SubParsersAction) -> None:
    """Add `stoke bench coldstart`."""
    parser = benches.add_parser(
        "coldstart",
        help="time to first token: warm, cold from DRAM/disk/S3, vs transformers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", choices=("small", "1b"), default="small", help="demo model")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--pairs", type=int, default=36, help="controller-overhead pairs (36)")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens per request (4)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads of each instance and of the transformers baseline (default: the "
        f"node's own, CPU cores // its {SLOTS} slots)",
    )
    parser.add_argument("--workdir", type=Path, help="scratch space on a real disk (not tmpfs)")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's home and logs")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.set_defaults(func=run)


# -- the run -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Prepare, measure every kind in rotated rounds, print the table (or JSON)."""
    from node_agent.instances.spawn import default_threads
    from stoke.bench.coldstart_report import report_json, summarize, table

    if args.threads is None:
        args.threads = default_threads(SLOTS)
    if args.rounds < 1 or args.pairs < 2 or args.threads < 1 or not 1 <= args.max_tokens <= 64:
        raise StokeError(
            "--rounds and --threads must be >= 1, --pairs >= 2, --max-tokens in 1..64."
        )
    base = default_workdir()
    hf_dir = demo_model_dir(base, args.size)
    ckpt = stoke_checkpoint(hf_dir)
    scratch = args.workdir or base / "coldstart"
    scratch.mkdir(parents=True, exist_ok=True)
    _check_space(ckpt, scratch, _sizing(args.size, args.threads).dram_cache)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-coldstart-", dir=scratch))
    load_before = os.getloadavg()[0]
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    cluster: BenchCluster | None = None
    server: subprocess.Popen[str] | None = None
    try:
        server, env = _start_s3(ckpt)
        cluster = BenchCluster(run_dir / "cluster", env)
        setup = _prepare(cluster, hf_dir, ckpt, args)
        results = measure(setup, args.rounds, args.pairs)
        total, count = cluster.server_ttft(PROBE)
        results.append({"kind": "server-ttft", "sum_s": total, "count": count})
    except Exception:
        if cluster is not None:
            print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        if cluster is not None:
            cluster.stop()
        if server is not None:
            _stop_s3(server)
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    summary = summarize(results, setup.nbytes)
    meta = {"size": args.size, "checkpoint_bytes": setup.nbytes, "prompt": PROMPT}
    meta |= {"prompt_tokens": len(setup.prompt_ids), "max_tokens": args.max_tokens}
    meta |= {"rounds": args.rounds, "cpus": os.cpu_count(), "threads": args.threads}
    meta |= {"loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(report_json(meta, summary, results), indent=1))
    else:
        print(table(meta, summary))
    return 0


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`: children stopped, DRAM freed


def stoke_checkpoint(hf_dir: Path) -> Path:
    """The demo model converted to a stoke checkpoint next to it, once."""
    from checkpoint_format import convert_hf, is_checkpoint

    path = hf_dir.with_name(hf_dir.name + "-stoke")
    if not is_checkpoint(path):
        _say(f"converting {hf_dir} to {path} (once)...")
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        convert_hf(hf_dir, partial, progress=False)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(partial, path)
    return path


def _check_space(ckpt: Path, scratch: Path, dram_cache: str) -> None:
    """The DRAM tier needs its whole arena in /dev/shm (allocated when the node starts), the
    disk tier (and its staging) the checkpoint twice on disk."""
    from checkpoint_format import read_manifest
    from node_agent.facts.units import parse_size

    nbytes = read_manifest(ckpt).total_bytes
    arena = parse_size(dram_cache) + (64 << 20)
    for where, need in (("/dev/shm", arena), (str(scratch), 2 * nbytes)):
        free = shutil.disk_usage(where).free
        if free < need:
            raise StokeError(
                f"{where}: {free / 2**30:.1f} GiB free, the benchmark needs "
                f"{need / 2**30:.1f} GiB there; free some space (or pass --workdir)."
            )


def _start_s3(ckpt: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """The loopback S3 server, serving the checkpoint's directory as bucket BUCKET."""
    from stoke.bench.fetch import _s3_env

    cmd = [sys.executable, "-m", "stoke.bench.coldstart_s3", str(ckpt.parent), BUCKET]
    server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = server.stdout.readline().strip()
    if not port.isdigit():
        _stop_s3(server)
        raise StokeError("the loopback S3 server did not start; its error is above.")
    return server, _s3_env(f"http://127.0.0.1:{port}")


def _stop_s3(server: subprocess.Popen[str]) -> None:
    assert server.stdin is not None
    server.stdin.close()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _prepare(cluster: BenchCluster, hf_dir: Path, ckpt: Path, args: argparse.Namespace) -> Setup:
    """Start the cluster, deploy the functions, fill both tiers, make one cold start, start
    the overhead probe."""
    from checkpoint_format import MANIFEST_NAME, read_manifest
    from node_agent.facts.tokenizer import Tokenizer
    from node_agent.store.identity import checkpoint_key

    s3_uri = f"s3://{BUCKET}/{ckpt.name}"
    probe = stoke_checkpoint(demo_model_dir(default_workdir(), "tiny"))
    _say("starting a controller and a node agent...")
    cluster.start(_sizing(args.size, args.threads))
    setup = Setup(
        cluster=cluster,
        hf_dir=hf_dir,
        ckpt=ckpt,
        s3_uri=s3_uri,
        key=checkpoint_key((ckpt / MANIFEST_NAME).read_bytes()),
        nbytes=read_manifest(ckpt).total_bytes,
        prompt_ids=Tokenizer.from_dir(ckpt).encode(PROMPT),
        probe_ids=Tokenizer.from_dir(probe).encode(PROMPT),
        max_tokens=args.max_tokens,
        threads=args.threads,
        logs=cluster.home / "logs",
    )
    for name, model, keep_alive in (
        (COLD, str(ckpt), COLD_KEEP_ALIVE_S),
        (S3, s3_uri, COLD_KEEP_ALIVE_S),
        (PROBE, str(probe), WARM_KEEP_ALIVE_S),
    ):
        cluster.admin("PUT", f"/admin/functions/{name}", spec(model, keep_alive))
    _say("filling the node's tiers and making one unmeasured cold start...")
    cluster.prefetch(str(ckpt), TierName.DRAM)
    cluster.first_token(COLD, PROMPT, args.max_tokens)
    setup.probe_instance = cluster.first_token(PROBE, PROMPT, args.max_tokens).headers[
        "x-stoke-instance"
    ]
    return setup


# -- rounds --------------------------------------------------------------------------------------


def measure(s: Setup, rounds: int, pairs: int) -> list[dict[str, Any]]:
    """Every kind once per round, the order rotated each round; one dict per sample."""
    per_round = math.ceil(pairs / rounds)
    results: list[dict[str, Any]] = []
    for round_ in range(rounds):
        shift = round_ % len(KINDS)
        for kind in KINDS[shift:] + KINDS[:shift]:
            if kind == "warm":
                got = measure_warm(s, per_round)
            elif kind in COLD_KINDS:
                got = [measure_cold(s, kind)]
            elif kind == "transformers":
                got = [measure_transformers(s)]
            else:
                got = [measure_disk_read(s)]
            for sample in got:
                sample["round"] = round_
            results.extend(got)
            _progress(round_, rounds, kind, got)
    return results


def _progress(round_: int, rounds: int, kind: str, got: list[dict[str, Any]]) -> None:
    import statistics

    if kind == "warm":
        parts = []
        for which in ("warm", "probe"):
            mine = [g for g in got if g["kind"] == which]
            http = statistics.median(g["ttft_s"] for g in mine)
            direct = statistics.median(g["direct_s"] for g in mine)
            parts.append(f"{which} {http * 1e3:.1f} ms, direct {direct * 1e3:.1f} ms")
        what = f"TTFT {'; '.join(parts)} ({len(got) // 2} pairs each)"
    elif kind == "disk-read":
        what = f"{got[0]['seconds']:.3f} s, {got[0]['bytes'] / got[0]['seconds'] / 1e9:.2f} GB/s"
    else:
        what = f"TTFT {got[0]['ttft_s']:.3f} s"
        if got[0].get("load_ms") is not None:
            what += f" (load {got[0]['load_ms']:.0f} ms)"
    _say(f"[round {round_ + 1}/{rounds}] {kind:>12}: {what}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
