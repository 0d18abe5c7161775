"""A real worker process maps the node's DRAM arena once, when it starts: a load from the DRAM
tier then binds the model's tensors inside that one mapping (no mapping made per load, nothing
copied), and the instance answers as the checkpoint does in-process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node_agent.facts.tiers import TierName
from node_agent.instances import WorkerPool
from node_agent.instances.spawn import WorkerSpec
from node_agent.proto import node_agent_pb2 as pb

TIMEOUT_S = 60.0


def _mappings(pid: int, path: Path) -> list[tuple[int, int]]:
    """`(start, end)` of each of the process's mappings of the file `path`."""
    found = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == str(path):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end))
    return found


def _reference(ckpt: Path, prompt: list[int], n: int) -> list[int]:
    from node_agent.engine import load_engine
    from node_agent.engine.sampling import SamplingParams
    from node_agent.engine.sequence import Request

    engine = load_engine(ckpt)
    params = SamplingParams(max_tokens=n, temperature=0.0)
    engine.add(engine.validate(Request("r", tuple(prompt), params)))
    ids: list[int] = []
    while engine.has_work():
        ids += [e.token_id for e in engine.step() if e.token_id is not None]
    return ids


def test_a_worker_binds_a_dram_checkpoint_in_the_arena_it_mapped_at_start(
    make_store: Callable[..., Any], tiny_ckpt_dir: Path
) -> None:
    store = make_store(dram_budget=32 << 20, disk_budget=64 << 20)
    path = store.ensure(tiny_ckpt_dir, TierName.DRAM, pin=True)
    arena = store.arena_path
    prompt, n = [5, 17, 42, 7], 6

    async def go() -> dict[str, Any]:
        pool = WorkerPool(1, WorkerSpec(threads=1, arena=arena))
        pool.start()
        seen: dict[str, Any] = {}
        try:
            worker = await asyncio.wait_for(pool.acquire(), TIMEOUT_S)
            seen["before"] = _mappings(worker.pid, arena)
            await asyncio.wait_for(worker.stub.Load(pb.LoadRequest(path=str(path))), TIMEOUT_S)
            seen["after"] = _mappings(worker.pid, arena)
            params = pb.SamplingParams(max_tokens=n, temperature=0.0, top_p=1.0, seed=0)
            request = pb.GenerateRequest(request_id="r", prompt_ids=prompt, params=params)
            events = [e async for e in worker.stub.Generate(request)]
            seen["ids"] = [e.token_id for e in events if e.has_token]
            await worker.stop()
        finally:
            await pool.close()
        return seen

    seen = asyncio.run(go())
    size = os.stat(arena).st_size
    # One mapping of the whole arena, made at start; the load added none (and mapped no
    # partition file: the DRAM entry has none).
    assert [end - start for start, end in seen["before"]] == [size]
    assert seen["after"] == seen["before"]
    assert seen["ids"] == _reference(tiny_ckpt_dir, prompt, n)
    store.unpin(path.name, TierName.DRAM)
