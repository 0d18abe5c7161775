"""`stoke generate MODEL_DIR PROMPT`: run a model in-process, no cluster."""

from __future__ import annotations

import argparse
import dataclasses
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
    for choice_option in ("best_of", "echo"):  # how many, and what to print: not sampling
        options.pop(choice_option, None)
    if "response_format" in options:  # as the node takes it
        from node_agent.facts.response_format import normalized

        options["response_format"] = normalized(options["response_format"])
    if "logit_bias" in options:
        options["logit_bias"] = tuple(sorted(options["logit_bias"].items()))
    return {**kwargs, **options, "max_tokens": args.max_tokens, "stop": tuple(args.stop)}


@dataclass
class Output:
    """One choice's output as it is generated."""

    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    prompt_logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event: Any) -> None:
        if event.token_id is not None:
            self.token_ids.append(event.token_id)
        if event.logprobs is not None:
            self.logprobs.append(_logprob(event.logprobs))
        self.prompt_logprobs += [_logprob(lp) for lp in event.prompt_logprobs]
        self.pieces.append(event.text)
        self.finish_reason = str(event.finish_reason) if event.finish_reason else None

    def total(self) -> float:
        return sum(lp["logprob"] for lp in self.logprobs)


def _logprob(lp: Any) -> dict[str, Any]:
    return {"logprob": lp.logprob, "top": [list(pair) for pair in lp.top]}


def run(args: argparse.Namespace) -> int:
    from node_agent.engine import Request, SamplingParams, load_engine
    from stoke.gguf_cache import model_path

    args.model_dir = model_path(args.model_dir)  # a .gguf file: its checkpoint (converted once)
    n, best_of = args.n, args.best_of or args.n
    if best_of < n:
        raise SystemExit(f"stoke generate: --best-of {best_of} must be at least --n {n}")
    kwargs = sampling_kwargs(args)
    if best_of > n and kwargs.get("logprobs") is None:
        kwargs["logprobs"] = 0  # ranked by the sampled tokens' log probabilities
    if args.echo and kwargs.get("logprobs") is not None:
        kwargs["prompt_logprobs"] = kwargs["logprobs"]
    params = SamplingParams(**kwargs)
    engine = load_engine(args.model_dir, args.device)
    tokenizer = engine.tokenizer
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt_ids = tokenizer.encode(text, add_special_tokens=not args.chat)
    timeline = Timeline()
    # as the HTTP API does (`controller.api.choices`): choice i samples with seed + i, and
    # copies the first's prompt K/V
    for i in range(best_of):
        choice = dataclasses.replace(params, seed=(params.seed + i) % 2**63)
        engine.add(engine.validate(Request(
            f"choice-{i}", tuple(prompt_ids), choice, prefix_from="choice-0" if i else None
        )))  # fmt: skip
    outputs = {f"choice-{i}": Output() for i in range(best_of)}
    live = best_of == 1 and not args.json
    if live and args.echo:
        sys.stdout.write(args.prompt)
    while engine.has_work():
        for event in engine.step():
            timeline.token()
            outputs[event.request_id].add(event)
            if live:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    ranked = list(outputs.values())
    if best_of > n:
        ranked = sorted(ranked, key=Output.total, reverse=True)[:n]
    echo = args.prompt if args.echo else ""
    if args.json:
        first = ranked[0]
        report = {
            "text": echo + "".join(first.pieces),
            "token_ids": first.token_ids,
            "prompt_token_ids": prompt_ids,
            "finish_reason": first.finish_reason,
            **({"logprobs": first.logprobs} if args.logprobs is not None else {}),
            **({"prompt_logprobs": first.prompt_logprobs} if params.prompt_logprobs is not None
               else {}),
            "seed": params.seed,
            "load_ms": round(engine.loaded.load_ms, 2),
            "ttft_ms": round(timeline.ttft_ms(), 2),
            "tokens_per_s": round(timeline.tokens_per_s(), 2),
        }  # fmt: skip
        if best_of > 1:
            report["choices"] = [
                {"text": echo + "".join(o.pieces), "token_ids": o.token_ids,
                 "finish_reason": o.finish_reason}
                for o in ranked
            ]  # fmt: skip
        print(json.dumps(report))
    elif live:
        sys.stdout.write("\n")
    else:
        for index, output in enumerate(ranked):
            print(f"--- choice {index}")
            print(echo + "".join(output.pieces))
    return 0
