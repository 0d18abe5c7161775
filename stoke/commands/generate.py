"""`stoke generate MODEL_DIR PROMPT`: run a model in-process, no cluster."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from stoke.commands.sampling_options import add_options, given


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a model directory in this process (no cluster)",
        description=(
            "Load MODEL_DIR (a stoke checkpoint, a Hugging Face directory, or a .gguf file, "
            "converted once into ~/.cache/stoke/gguf) and generate a "
            "completion for PROMPT. Text streams to stdout as it is generated; --json prints "
            "one object with the text, token ids and timings instead. Sampling defaults come "
            "from the model's generation_config.json (greedy when it does not sample)."
        ),
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model directory or .gguf file")
    parser.add_argument("prompt", metavar="PROMPT", help="prompt text (user message with --chat)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (64)")
    parser.add_argument("--temperature", type=float, help="0 for greedy; default: the model's")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--seed", type=int, help="seed for sampling (random if omitted)")
    parser.add_argument(
        "--stop", action="append", default=[], help="stop string (repeatable)", metavar="TEXT"
    )
    add_options(parser)
    parser.add_argument("--chat", action="store_true", help="wrap PROMPT in the chat template")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.set_defaults(func=run)


@dataclass
class Timeline:
    """When things happened during one generation, for the --json report."""

    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0

    def token(self) -> None:
        now = time.perf_counter()
        self.first_token = self.first_token or now
        self.last_token = now
        self.tokens += 1

    def ttft_ms(self) -> float:
        return ((self.first_token or self.start) - self.start) * 1000

    def tokens_per_s(self) -> float:
        if self.tokens < 2 or self.first_token is None or self.last_token is None:
            return 0.0
        return (self.tokens - 1) / max(self.last_token - self.first_token, 1e-9)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from node_agent.engine.defaults import generation_defaults

    kwargs = generation_defaults(args.model_dir)
    for key in ("temperature", "top_p", "seed"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    options = given(args)
    if "logit_bias" in options:
        options["logit_bias"] = tuple(sorted(options["logit_bias"].items()))
    return {**kwargs, **options, "max_tokens": args.max_tokens, "stop": tuple(args.stop)}


def run(args: argparse.Namespace) -> int:
    from node_agent.engine import Request, SamplingParams, load_engine
    from stoke.gguf_cache import model_path

    args.model_dir = model_path(args.model_dir)  # a .gguf file: its checkpoint (converted once)
    params = SamplingParams(**sampling_kwargs(args))
    engine = load_engine(args.model_dir, args.device)
    tokenizer = engine.tokenizer
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt_ids = tokenizer.encode(text, add_special_tokens=not args.chat)
    timeline = Timeline()
    engine.add(engine.validate(Request("generate", tuple(prompt_ids), params)))
    pieces: list[str] = []
    token_ids: list[int] = []
    logprobs: list[dict[str, Any]] = []
    finish_reason = None
    while engine.has_work():
        for event in engine.step():
            timeline.token()
            if event.token_id is not None:
                token_ids.append(event.token_id)
            if event.logprobs is not None:
                top = [list(pair) for pair in event.logprobs.top]
                logprobs.append({"logprob": event.logprobs.logprob, "top": top})
            pieces.append(event.text)
            finish_reason = event.finish_reason
            if not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    if args.json:
        report = {
            "text": "".join(pieces),
            "token_ids": token_ids,
            "prompt_token_ids": prompt_ids,
            "finish_reason": str(finish_reason),
            **({"logprobs": logprobs} if params.logprobs is not None else {}),
            "seed": params.seed,
            "load_ms": round(engine.loaded.load_ms, 2),
            "ttft_ms": round(timeline.ttft_ms(), 2),
            "tokens_per_s": round(timeline.tokens_per_s(), 2),
        }
        print(json.dumps(report))
    else:
        sys.stdout.write("\n")
    return 0
