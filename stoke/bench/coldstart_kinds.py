"""One measurement per kind for `stoke bench coldstart` (see `stoke.bench.coldstart`): warm
pairs through the controller and straight to the node, scale-from-zero starts with the
checkpoint in DRAM, on disk (page cache evicted) or only in S3, the transformers baseline in a
fresh process, and the disk's own read ceiling. Each returns one dict per sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_agent.facts.tiers import TIERS_FASTEST_FIRST, TierName
from stoke.bench.coldstart_cluster import BenchCluster, tail
from stoke.errors import StokeError

WARM, COLD, S3, PROBE = "bench-warm", "bench-cold", "bench-s3", "bench-probe"
PROMPT = "The quick brown fox jumps over the lazy dog."
WARM_KEEP_ALIVE_S = 3600.0
# Long enough to read the instance's load timings from the node and, once the node has replaced
# the worker the start took, to time the same instance's next (warm) request.
COLD_KEEP_ALIVE_S = 8.0
KV_CACHE_BYTES = 128 << 20  # a whole 2048-token sequence of the 1b model needs 96 MiB
READ_THREADS = 8  # the disk ceiling's parallel O_DIRECT readers


@dataclass
class Setup:
    """What every measurement needs: the cluster, the model in each form, the prompt."""

    cluster: BenchCluster
    hf_dir: Path
    ckpt: Path  # the stoke checkpoint bench-warm and bench-cold deploy
    s3_uri: str  # the same checkpoint, served by the loopback S3 server
    key: str  # its checkpoint key (the SHA-256 of its manifest)
    nbytes: int  # checkpoint bytes a cold start moves
    prompt_ids: list[int]
    probe_ids: list[int]  # the prompt in the tiny probe model's vocabulary
    max_tokens: int
    threads: int
    logs: Path
    warm_deployed: bool = False
    probe_instance: str = ""

    @property
    def disk_entry(self) -> Path:
        """The node's disk-tier copy of the checkpoint."""
        return self.cluster.node_home / "disk" / self.key


def spec(model: str, keep_alive: float) -> dict[str, Any]:
    """The function spec every bench function is deployed with."""
    scaling = {"min_instances": 0, "max_instances": 1, "target_concurrency": 8}
    return {
        "model": model,
        "autoscaling": scaling | {"keep_alive": keep_alive},
        "engine": {"kv_cache": KV_CACHE_BYTES},
    }


# -- one measurement per kind --------------------------------------------------------------------


def measure_warm(s: Setup, pairs: int) -> list[dict[str, Any]]:
    """`pairs` warm requests through the controller, each paired with the same request sent
    straight to the node's Generate on the same instance; the same on the tiny probe model."""
    warm = _pairs(s, WARM, _ensure_warm(s), s.prompt_ids, pairs)
    probe = _pairs(s, PROBE, s.probe_instance, s.probe_ids, pairs)
    for sample in probe:
        sample |= {"kind": "probe", "healthz_s": s.cluster.healthz_s()}
    return warm + probe


def _pairs(
    s: Setup, function: str, instance_id: str, prompt_ids: list[int], pairs: int
) -> list[dict[str, Any]]:
    """TTFT through the controller and straight from the node, in alternating order."""
    out = []
    for i in range(pairs):
        got: dict[str, float] = {}
        for path in ("http", "direct") if i % 2 == 0 else ("direct", "http"):
            if path == "direct":
                got[path] = s.cluster.direct_first_token(instance_id, prompt_ids, s.max_tokens)
                continue
            first = s.cluster.first_token(function, PROMPT, s.max_tokens)
            if first.headers.get("x-stoke-instance") != instance_id:
                raise StokeError(f"{function} was served by {first.headers}, not {instance_id}")
            got[path] = first.ttft_s
        out.append(
            {"kind": "warm", "ttft_s": got["http"], "direct_s": got["direct"],
             "overhead_s": got["http"] - got["direct"]}
        )  # fmt: skip
    return out


def _ensure_warm(s: Setup) -> str:
    """bench-warm deployed with a ready instance (cold-started here, unmeasured); its id."""
    c = s.cluster
    if not s.warm_deployed:
        c.admin("PUT", f"/admin/functions/{WARM}", spec(str(s.ckpt), WARM_KEEP_ALIVE_S))
        s.warm_deployed = True
    ready = [i for i in c.instances(WARM) if i["state"] == "ready"]
    if not ready:
        c.first_token(WARM, PROMPT, s.max_tokens)
        ready = [i for i in c.instances(WARM) if i["state"] == "ready"]
    return str(ready[0]["instance_id"])


def _stop_warm(s: Setup) -> None:
    if s.warm_deployed:
        s.cluster.admin("DELETE", f"/admin/functions/{WARM}")
        s.warm_deployed = False


def measure_cold(s: Setup, kind: str) -> dict[str, Any]:
    """One scale-from-zero start with the checkpoint where `kind` says."""
    function = S3 if kind == "s3" else COLD
    _settle(s, kind)
    first = s.cluster.first_token(function, PROMPT, s.max_tokens)
    headers = first.headers
    if headers.get("x-stoke-cold-start") != "true":
        raise StokeError(f"{function}: expected a cold start, got headers {headers}")
    instance = headers.get("x-stoke-instance", "")
    result = {
        "kind": kind,
        "ttft_s": first.ttft_s,
        "load_ms": float(headers.get("x-stoke-load-ms", "nan")),
        "tier": headers.get("x-stoke-tier", ""),
        **_load_timings(s, instance),
    }
    return result | {"then_s": _next_on(s, function, instance)}


def _next_on(s: Setup, function: str, instance: str) -> float | None:
    """TTFT of the same request sent again to the instance a cold start made: the warm TTFT of
    that very process at that moment, against which the start's own cost is measured without
    the drift between rounds. Sent once the node has replaced the worker the start took (its
    start-up would slow the request); None if the instance was gone by then."""
    c = s.cluster
    c.wait("a pre-started worker", lambda: c.status().idle_workers >= 1)
    then = c.first_token(function, PROMPT, s.max_tokens)
    same = then.headers.get("x-stoke-instance") == instance
    return then.ttft_s if same and then.headers.get("x-stoke-cold-start") != "true" else None


def _settle(s: Setup, kind: str) -> None:
    """Wait for scale-to-zero, put the checkpoint where `kind` needs it, and wait until the
    node has a pre-started worker and the controller has seen the node's tiers as they are."""
    c = s.cluster
    c.wait(
        "the cold functions to scale to zero",
        lambda: not c.instances(COLD) and not c.instances(S3),
    )
    if kind != "dram":
        _stop_warm(s)
    keep = {i["instance_id"] for i in c.instances(WARM)} if s.warm_deployed else set()
    c.wait("the node to unload stopped instances", lambda: _unloaded(c, s.key, keep))
    held = c.held(s.key)
    if kind == "dram" and TierName.DRAM not in held:
        c.prefetch(str(s.ckpt), TierName.DRAM)
    if kind == "disk":
        if TierName.DISK not in held:
            c.prefetch(str(s.ckpt), TierName.DISK)
        if TierName.DRAM in held:
            c.evict(s.key, TierName.DRAM)
        # the source directory too: the node reads its manifest to identify the checkpoint
        _drop_from_page_cache([*s.disk_entry.iterdir(), *s.ckpt.iterdir()])
    if kind == "s3":
        for tier in TIERS_FASTEST_FIRST:
            if tier in held:
                c.evict(s.key, tier)
        _read_through(list(s.ckpt.iterdir()))  # the S3 server serves from memory
    c.wait("a pre-started worker", lambda: c.status().idle_workers >= 1)
    c.wait("the controller to see the node's tiers", lambda: _tiers_agree(c))


def _unloaded(c: BenchCluster, key: str, keep: set[str]) -> bool:
    """No instance of checkpoint `key` left on the node but those in `keep`; with none kept,
    no pin on `key` either (an unload drops the instance from Status before its worker exits
    and unpins)."""
    status = c.status()
    if any(i.checkpoint_key == key and i.instance_id not in keep for i in status.instances):
        return False
    pinned = any(h.pinned and h.key == key for t in status.tiers for h in t.holdings)
    return bool(keep) or not pinned


def _tiers_agree(c: BenchCluster) -> bool:
    node = {(t.tier, h.key) for t in c.status().tiers for h in t.holdings}
    seen = {(t["tier"], h["key"]) for n in c.nodes() for t in n["tiers"] for h in t["holdings"]}
    return node == seen


def _load_timings(s: Setup, instance_id: str) -> dict[str, float | None]:
    """The node's per-phase load timings of a live instance (None where it is gone)."""
    for info in s.cluster.status().instances:
        if info.instance_id == instance_id:
            t = info.timings
            return {"queue_s": t.queue_s, "fetch_s": t.fetch_s, "read_build_s": t.read_build_s,
                    "streamed_s": t.streamed_s or None, "node_total_s": t.total_s}  # fmt: skip
    return {"queue_s": None, "fetch_s": None, "read_build_s": None, "streamed_s": None,
            "node_total_s": None}  # fmt: skip


def _read_through(paths: list[Path]) -> None:
    """Read each file once, so that its pages are in the page cache."""
    for path in paths:
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass


def _drop_from_page_cache(paths: list[Path]) -> None:
    from loader.sysio import evict_from_page_cache

    for path in paths:
        if path.is_file():
            evict_from_page_cache(path)


def measure_transformers(s: Setup) -> dict[str, Any]:
    """The transformers baseline in a fresh process, its safetensors evicted first, and again
    after: left in the page cache, the GBs it read crowd out other processes' file pages (the
    pre-started worker's libraries among them, faulted back in during the next DRAM start)."""
    safetensors = sorted(s.hf_dir.glob("*.safetensors"))
    _drop_from_page_cache(safetensors)
    try:
        return _run_transformers(s)
    finally:
        _drop_from_page_cache(safetensors)


def _run_transformers(s: Setup) -> dict[str, Any]:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env |= {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = s.logs / "transformers.log"
    cmd = [sys.executable, "-m", "stoke.bench.coldstart_hf", str(s.hf_dir)]
    cmd += [json.dumps(s.prompt_ids), str(s.threads)]
    with open(log, "ab") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        wall = time.perf_counter() - start
        proc.stdout.close()
        proc.wait()
    if proc.returncode != 0 or not line:
        raise StokeError(f"the transformers baseline failed; {log}:\n{tail(log)}")
    got = json.loads(line)
    return {
        "kind": "transformers",
        "ttft_s": got["load_s"] + got["generate_s"],
        "with_imports_s": got["import_s"] + got["load_s"] + got["generate_s"],
        "process_s": wall,
        **got,
    }


def measure_disk_read(s: Setup) -> dict[str, Any]:
    """The disk's ceiling: cold parallel O_DIRECT reads of the disk tier's partition files, each
    reader into one reused buffer (a buffer the checkpoint's size would take GBs of memory from
    the node under test)."""
    from checkpoint_format import read_manifest
    from stoke.bench.fetch import read_ceiling_seconds

    if TierName.DISK not in s.cluster.held(s.key):
        s.cluster.prefetch(str(s.ckpt), TierName.DISK)
    parts = [s.disk_entry / p.file for p in read_manifest(s.ckpt).partitions]
    _drop_from_page_cache(parts)
    seconds = 0.0
    for part in parts:
        seconds += read_ceiling_seconds(part, direct=True, threads=READ_THREADS)
    return {"kind": "disk-read", "seconds": seconds, "bytes": sum(p.stat().st_size for p in parts)}
