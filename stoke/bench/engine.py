"""`stoke bench engine`: decode throughput of stoke's engine vs transformers' `generate`.

Both run on the same weights in the same process, alternating per batch size and round; the
table reports medians, the ratio, and the machine's bandwidth ceiling for batch-1 decode
(weight bytes / measured memory copy bandwidth: every decode step reads every weight once).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from stoke.bench.common import default_workdir, demo_model_dir, read_gbps

TARGET_BATCH = 16
TARGET_SCALING = 6.0


def register(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser(
        "engine",
        help="decode tokens/s of the engine vs transformers at several batch sizes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="a Hugging Face directory, stoke checkpoint or .gguf file (default: demo model)",
    )
    parser.add_argument("--size", default="small", choices=("tiny", "small", "1b"))
    parser.add_argument("--workdir", type=Path, default=default_workdir(), help="model cache")
    parser.add_argument("--batch-sizes", default="1,4,16", help="comma-separated (1,4,16)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument(
        "--options",
        action="store_true",
        help="instead: the decode cost of penalties, logit_bias, logprobs and a response_format "
        "at the largest batch size, against plain greedy decoding (stoke only)",
    )
    parser.set_defaults(func=run)


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, length), generator=gen).tolist()


def stoke_decode_tps(
    engine: Any, batch_prompts: list[list[int]], new_tokens: int, **options: Any
) -> float:
    """Decode tokens/s after every request's first token (prefill excluded); `options` are
    further `SamplingParams` fields."""
    from node_agent.engine import Request, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, **options)
    for i, ids in enumerate(batch_prompts):
        engine.add(engine.validate(Request(f"bench-{i}", tuple(ids), params)))
    first: float | None = None
    decoded = 0
    while engine.has_work():
        events = engine.step()
        if first is None and len(events) == len(batch_prompts):
            first = time.perf_counter()
        elif first is not None:
            decoded += len(events)
    assert first is not None, "prefill did not finish in one step; raise max_step_tokens"
    return decoded / (time.perf_counter() - first)


def hf_decode_tps(model: Any, batch_prompts: list[list[int]], new_tokens: int) -> float:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value: Any) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    clock = Clock()
    ids = torch.tensor(batch_prompts)
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=0,
            streamer=clock,
        )
    # stamps[0]: the prompt, stamps[1]: first new token, stamps[-1]: the last one.
    return len(batch_prompts) * (len(clock.stamps) - 2) / (clock.stamps[-1] - clock.stamps[1])


def run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        print("stoke bench engine needs transformers: pip install -e '.[dev]'")
        return 2
    from node_agent.engine import EngineConfig, load_engine
    from stoke.bench.reference import reference_model
    from stoke.gguf_cache import model_path

    source = args.model or demo_model_dir(args.workdir, args.size)
    model_dir = Path(model_path(str(source)))  # a .gguf file: its checkpoint (converted once)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    step_tokens = max(512, max(batches) * args.prompt_tokens)
    # Each sequence's KV slot sized to what the bench asks, so the largest batch fits at once
    # whatever the model's context (SmolLM2's 8192 would leave room for 5 slots of 1 GiB).
    config = EngineConfig(
        max_step_tokens=step_tokens,
        max_batch_size=max(batches),
        max_model_len=args.prompt_tokens + args.new_tokens + 8,
    )
    engine = load_engine(model_dir, config=config)
    if args.options:
        from stoke.bench.engine_options import run_options

        return run_options(args, engine, max(batches), model_dir)
    hf = reference_model(source)  # HF directory, .gguf file or stoke checkpoint
    vocab = engine.loaded.config.vocab_size
    results: dict[int, dict[str, list[float]]] = {b: {"stoke": [], "hf": []} for b in batches}
    for rnd in range(args.rounds):
        for batch in batches:
            batch_prompts = prompts(batch, args.prompt_tokens, vocab, seed=rnd * 1000 + batch)
            results[batch]["stoke"].append(stoke_decode_tps(engine, batch_prompts, args.new_tokens))
            results[batch]["hf"].append(hf_decode_tps(hf, batch_prompts, args.new_tokens))
            if not args.json:
                print(f"round {rnd + 1}/{args.rounds} batch {batch}: done", flush=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    report = summarize(results, weight_bytes, read_gbps(), model_dir)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def summarize(
    results: dict[int, dict[str, list[float]]],
    weight_bytes: int,
    read_bw: float,
    model_dir: Path,
) -> dict[str, Any]:
    import torch

    rows: list[dict[str, Any]] = []
    base = statistics.median(results[min(results)]["stoke"])
    for batch, runs in sorted(results.items()):
        ours, theirs = statistics.median(runs["stoke"]), statistics.median(runs["hf"])
        rows.append(
            {
                "batch": batch,
                "stoke_tok_s": round(ours, 1),
                "transformers_tok_s": round(theirs, 1),
                "stoke_vs_transformers": round(ours / theirs, 2),
                "stoke_vs_batch1": round(ours / base, 2),
                "stoke_samples": [round(x, 1) for x in runs["stoke"]],
                "transformers_samples": [round(x, 1) for x in runs["hf"]],
            }
        )
    by_batch = {r["batch"]: r for r in rows}
    return {
        "model": str(model_dir),
        "weight_bytes": weight_bytes,
        "threads": torch.get_num_threads(),
        "read_gb_s": round(read_bw, 2),
        "batch1_ceiling_tok_s": round(read_bw * 1e9 / weight_bytes, 1),
        "rows": rows,
        "target_batch1_not_slower": by_batch.get(1, {}).get("stoke_vs_transformers", 0) >= 1.0,
        "target_batch16_scaling": by_batch.get(TARGET_BATCH, {}).get("stoke_vs_batch1", 0)
        >= TARGET_SCALING,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']} ({report['weight_bytes'] / 1e6:.0f} MB of weights), "
        f"{report['threads']} threads, memory read {report['read_gb_s']} GB/s",
        "batch | stoke tok/s | transformers tok/s | stoke/transformers | stoke vs batch 1",
        "----- | ----------- | ------------------ | ------------------ | ----------------",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['batch']:>5} | {r['stoke_tok_s']:>11} | {r['transformers_tok_s']:>18} | "
            f"{r['stoke_vs_transformers']:>17}x | {r['stoke_vs_batch1']:>15}x"
        )
    lines.append(
        f"batch-1 ceiling (read bandwidth / weight bytes): {report['batch1_ceiling_tok_s']} tok/s"
    )
    lines.append(
        f"targets: batch 1 not slower than transformers: "
        f"{'PASS' if report['target_batch1_not_slower'] else 'FAIL'}; batch {TARGET_BATCH} >= "
        f"{TARGET_SCALING}x batch 1: {'PASS' if report['target_batch16_scaling'] else 'FAIL'}"
    )
    return "\n".join(lines)
