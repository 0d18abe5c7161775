"""The request options `stoke generate` and `stoke invoke` share (penalties, biases, logprobs),
named as the HTTP API names them, so both commands take the same flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

OPTION_FIELDS = (
    "top_k",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "min_tokens",
    "ignore_eos",
    "logprobs",
    "best_of",
    "echo",
    "response_format",
)
"""The fields `add_options` sets on the parsed arguments (None or False when not given)."""


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add the shared flags to `parser`."""
    parser.add_argument("--top-k", type=int, help="sample among the k most likely (0: off)")
    parser.add_argument(
        "--presence-penalty", type=float, help="-2..2, for each token already in the output"
    )
    parser.add_argument(
        "--frequency-penalty", type=float, help="-2..2, per occurrence in the output"
    )
    parser.add_argument("--repetition-penalty", type=float, help="> 0 (vLLM's); 1 is off")
    parser.add_argument(
        "--logit-bias",
        type=_bias,
        action="append",
        metavar="ID=BIAS",
        help="add BIAS (-100..100) to token ID's logit (repeatable)",
    )
    parser.add_argument("--min-tokens", type=int, help="no end-of-sequence before this many")
    parser.add_argument("--ignore-eos", action="store_true", help="generate up to --max-tokens")
    parser.add_argument(
        "--logprobs", type=int, metavar="N", help="report each token's log probability and N top"
    )
    parser.add_argument(
        "--n", type=int, default=1, help="choices to generate from the prompt (choice i: seed+i)"
    )
    parser.add_argument(
        "--best-of", type=int, help="generate this many, keep the --n most likely (completions)"
    )
    parser.add_argument(
        "--echo", action="store_true", help="the prompt before the text (completions)"
    )
    parser.add_argument(
        "--response-format",
        type=_response_format,
        metavar="JSON|@FILE",
        help='constrain the output: {"type": "json_object"} or {"type": "json_schema", '
        '"json_schema": {"schema": {...}}}, inline or from a file (with --chat for invoke)',
    )


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The shared options given on the command line, by field name; `logit_bias` as a
    {token id: bias} dict."""
    out: dict[str, Any] = {}
    for name in OPTION_FIELDS:
        value = getattr(args, name, None)
        if value is None or value is False:
            continue
        out[name] = dict(value) if name == "logit_bias" else value
    return out


def _bias(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not ID=BIAS (a token id and a number, e.g. 42=-100)"
        ) from None


def _response_format(text: str) -> dict[str, Any]:
    """`--response-format`: JSON inline or `@FILE`, checked as the API checks it."""
    from node_agent.facts.response_format import GrammarError, normalized

    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc.strerror}") from None
    try:
        value = json.loads(text)
        normalized(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    except GrammarError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('give an object, e.g. {"type": "json_object"}')
    return value
