"""`stoke bench engine --options`: what penalties, logit_bias, logprobs and a response_format
cost per decode step.

At one batch size, every request of a run gets the same option set; runs alternate between the
option sets within each round, the order rotated from round to round (in a fixed order, the
sets run after the first two came out up to 8% slower on this VM whatever they did, more than
any option costs), and the report gives each set's median decode tokens/s and its cost against
plain (1 - its tokens/s / plain's). Greedy, so the option sets differ only in the logit
processing and log-softmax they add.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from stoke.bench.engine import prompts, stoke_decode_tps

TARGET_COST = 0.05
"""Penalties and logprobs should cost under 5% of decode throughput at batch 16 (a
response_format is reported, with no target)."""

OPTION_SETS: dict[str, dict[str, Any]] = {
    "plain": {},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2},
    "logit_bias": {"logit_bias": tuple((t, 1.0) for t in range(100, 110))},
    "logprobs=5": {"logprobs": 5},
    "all": {
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "repetition_penalty": 1.2,
        "logit_bias": tuple((t, 1.0) for t in range(100, 110)),
        "min_tokens": 8,
        "logprobs": 5,
    },
    # A JSON array of strings that cannot end within the run: every step is in a string, where
    # the mask allows almost every token (llguidance's most expensive state).
    "json_schema": {
        "response_format": json.dumps(
            {
                "type": "json_schema",
                "json_schema": {
                    "schema": {"type": "array", "items": {"type": "string"}, "minItems": 1000}
                },
            }
        )
    },
}


def run_options(args: argparse.Namespace, engine: Any, batch: int, model_dir: Path) -> int:
    vocab = engine.loaded.config.vocab_size
    samples: dict[str, list[float]] = {name: [] for name in OPTION_SETS}
    for rnd in range(args.rounds):
        batch_prompts = prompts(batch, args.prompt_tokens, vocab, seed=rnd)
        names = list(OPTION_SETS)
        shift = rnd % len(names)  # each set runs at every place in the order over the rounds:
        for name in names[shift:] + names[:shift]:  # a run's speed depends on its place
            samples[name].append(
                stoke_decode_tps(engine, batch_prompts, args.new_tokens, **OPTION_SETS[name])
            )
        if not args.json:
            print(f"round {rnd + 1}/{args.rounds}: done", flush=True)
    report = summarize(samples, batch, model_dir)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def summarize(samples: dict[str, list[float]], batch: int, model_dir: Path) -> dict[str, Any]:
    plain = statistics.median(samples["plain"])
    rows = [
        {
            "options": name,
            "tok_s": round(statistics.median(runs), 1),
            "cost": round(1 - statistics.median(runs) / plain, 3),
            "samples": [round(x, 1) for x in runs],
        }
        for name, runs in samples.items()
    ]
    worst = max(float(r["cost"]) for r in rows if r["options"] in ("penalties", "logprobs=5"))  # type: ignore[arg-type]
    return {
        "model": str(model_dir),
        "batch": batch,
        "rows": rows,
        "target_cost": TARGET_COST,
        "target_met": worst < TARGET_COST,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']}, batch {report['batch']}",
        "options    | decode tok/s | cost vs plain",
        "---------- | ------------ | -------------",
    ]
    for r in report["rows"]:
        lines.append(f"{r['options']:<10} | {r['tok_s']:>12} | {r['cost'] * 100:>12.1f}%")
    verdict = "PASS" if report["target_met"] else "FAIL"
    lines.append(f"target: penalties and logprobs each under {TARGET_COST:.0%}: {verdict}")
    return "\n".join(lines)
