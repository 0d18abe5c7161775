"""Constrained decoding for OpenAI's `response_format`: the output is a JSON object, or a JSON
document valid against a JSON Schema, because every step masks the tokens that would break it.

Built on llguidance (Rust, CPU, no dependencies; what vLLM and llama.cpp use), chosen by
measurement against xgrammar and outlines-core on stoke's tokenizers (demo and SmolLM2's 49k):
~5-8 µs per token for the mask and the advance, ~1 ms to compile a nested schema. xgrammar was
a few µs faster per token but pulls triton (1 GB) and transformers and imports torch (1.7 s);
outlines-core took 4 s to compile "any object" and up to 0.6 ms per token.

How the engine uses it, one constrained sequence at a time, on the thread that samples:

    compiler = GrammarCompiler(tokenizer)            # one per model; cheap until first used
    grammar = compiler.compile(params.response_format)  # None: free text; RequestError: 400
    matcher = Matcher(grammar, output_ids)           # output_ids: those already emitted
    each step: apply_masks(logits, [matcher or None per row]); sample; matcher.advance(token)
    matcher.is_finished(): the document is complete; only EOS is allowed, so stop the sequence

The constraint state is a function of the emitted ids alone: a request resumed or migrated
with its output ids gets `Matcher(grammar, output_ids)`, in the same state as the matcher that
emitted them. Nothing else needs to travel.

JSON layout is fixed: `", "` and `": "` separators and no other whitespace outside strings, as
`json.dumps` writes it. Flexible whitespace lets a weak model pad a document with blanks until
max_tokens; a fixed layout always makes progress.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch

from node_agent.facts.response_format import (
    GrammarError,
    grammar_of,
    one_line,
    schema_key,
    schema_of,
    unenforceable,
)
from node_agent.facts.tokenizer import Tokenizer

GRAMMAR_CACHE_SIZE = 64


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A compiled `response_format` for one tokenizer; shared by every request using it."""

    key: str
    """The schema as compact JSON (what the compile cache is keyed by)."""
    vocab_size: int
    """Token ids the grammar knows (the tokenizer's); a model's larger vocab is padded off."""
    _template: llguidance.LLMatcher
    """A matcher in its start state, never advanced: each `Matcher` starts as a copy."""
    _tokenizer: llguidance.LLTokenizer

    @property
    def mask_words(self) -> int:
        """int32 words in one allowed-token bitmask."""
        return (self.vocab_size + 31) // 32


class GrammarCompiler:
    """Compiles `response_format`s for one model's tokenizer, with an LRU of compiled grammars.

    Thread-safe: requests may be compiled (and refused) on the thread that admits them while
    the engine decodes on another. The llguidance view of the vocabulary (~0.2 s for a 49k
    vocabulary) is built on the first constrained request, so loading a model pays nothing.
    """

    def __init__(self, tokenizer: Tokenizer, *, cache_size: int = GRAMMAR_CACHE_SIZE) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size={cache_size} must be at least 1")
        self._tokenizer = tokenizer
        self._cache_size = cache_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        """Compiles answered from the cache (for tests and metrics)."""

    def compile(self, response_format: str | Mapping[str, Any] | None) -> CompiledGrammar | None:
        """The grammar for `response_format` (OpenAI's object, or it as JSON text as
        `SamplingParams.response_format` carries it), or None for free text ("", None,
        `{"type": "text"}`). Raises GrammarError (a RequestError: a 400) naming the fix."""
        schema = schema_of(response_format)
        if schema is None:
            return None
        key = schema_key(schema)
        with self._lock:
            if (cached := self._cache.get(key)) is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return cached
            ll_tokenizer = self._vocabulary()
        compiled = _compile(key, schema, ll_tokenizer)  # outside the lock: ~1 ms, GIL dropped
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _vocabulary(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            eos = sorted(self._tokenizer.eos_token_ids) or None
            try:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.to_json(), eos_token=eos
                )
            except (ValueError, RuntimeError) as exc:
                raise GrammarError(
                    f"this model's tokenizer cannot be used for constrained decoding "
                    f"({one_line(str(exc))}): send the request without response_format"
                ) from None
        return self._ll_tokenizer


def _compile(
    key: str, schema: dict[str, Any], tokenizer: llguidance.LLTokenizer
) -> CompiledGrammar:
    template = llguidance.LLMatcher(tokenizer, grammar_of(schema), log_level=0)
    if template.is_error():
        raise GrammarError(unenforceable(template.get_error()))
    return CompiledGrammar(key, tokenizer.vocab_size, template, tokenizer)


class Matcher:
    """Where one sequence stands in its grammar; advanced once per emitted token.

    Not thread-safe: one sequence, one thread at a time (the engine's decode loop).
    """

    def __init__(self, grammar: CompiledGrammar, output_ids: Sequence[int] = ()) -> None:
        """A matcher at the start of `grammar`, then advanced over `output_ids` (the ids a
        resumed or migrated request already emitted). Raises GrammarError if they don't fit."""
        self.grammar = grammar
        self._matcher = grammar._template.deep_copy()
        self._consume(output_ids)

    def rebuild(self, output_ids: Sequence[int]) -> None:
        """Back to the start, then advanced over `output_ids`: the state after emitting them."""
        self._matcher.reset()
        self._consume(output_ids)

    def advance(self, token_id: int) -> None:
        """Record the token just emitted. Raises GrammarError if it was masked off (a caller bug:
        the matcher is then unusable)."""
        if not self._matcher.consume_token(token_id):
            raise GrammarError(
                f"token {token_id} ({self._text(token_id)}) does not fit response_format here: "
                f"{one_line(self._matcher.get_error())}"
            )

    def is_finished(self) -> bool:
        """The document is complete: EOS is the only allowed token, so stop the sequence."""
        return bool(self._matcher.is_stopped())

    def fill_bitmask(self, out: torch.Tensor) -> None:
        """Write the allowed-token bits into `out`, a contiguous int32 CPU tensor of
        `grammar.mask_words` words: bit `i % 32` of word `i // 32` is token i."""
        if out.dtype != torch.int32 or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("the bitmask must be a contiguous int32 CPU tensor")
        words = self.grammar.mask_words
        if out.numel() != words:
            raise ValueError(f"the bitmask has {out.numel()} words, the grammar needs {words}")
        self._matcher.unsafe_compute_mask_ptr(out.data_ptr(), words * 4)

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """Which of the model's `vocab_size` ids may come next: a bool CPU tensor [vocab_size].
        Ids past the tokenizer's vocabulary (a padded lm_head) are never allowed."""
        bits = torch.empty((1, self.grammar.mask_words), dtype=torch.int32)
        self.fill_bitmask(bits[0])
        return ~_banned(bits, self.grammar.vocab_size, vocab_size)[0]

    def _consume(self, output_ids: Sequence[int]) -> None:
        # One at a time: llguidance's batch calls stop short of an EOS that ends the document.
        for position, token in enumerate(output_ids):
            if not self._matcher.consume_token(int(token)):
                raise GrammarError(
                    f"output token {position} (id {token}, {self._text(int(token))}) does not fit "
                    "response_format: resume the request with the response_format it started with"
                )

    def _text(self, token_id: int) -> str:
        if not 0 <= token_id < self.grammar.vocab_size:
            return f"outside the tokenizer's {self.grammar.vocab_size} ids"
        return str(self.grammar._tokenizer.dbg_tokens([token_id]))


def apply_masks(logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> None:
    """Set to -inf, in place, every logit its row's matcher disallows.

    logits: [B, V] float on any device; matchers[i] constrains row i (None: unconstrained).
    The masks are computed and unpacked on the CPU (~5 µs a row for 49k ids, plus llguidance's
    ~5-8 µs) and moved as one bool tensor [R, V]; the fill itself runs where the logits are.
    """
    if len(matchers) != logits.shape[0]:
        raise ValueError(f"{len(matchers)} matchers for {logits.shape[0]} rows of logits")
    rows = [(index, matcher) for index, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return
    known = max(matcher.grammar.vocab_size for _, matcher in rows)
    bits = torch.zeros((len(rows), (known + 31) // 32), dtype=torch.int32)  # [R, W]
    for row, (_, matcher) in enumerate(rows):
        matcher.fill_bitmask(bits[row, : matcher.grammar.mask_words])
    banned = _banned(bits, known, logits.shape[1]).to(logits.device, non_blocking=True)  # [R, V]
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(banned, float("-inf"))
        return
    for row, (index, _) in enumerate(rows):
        logits[index].masked_fill_(banned[row], float("-inf"))


def _banned(bits: torch.Tensor, known: int, vocab_size: int) -> torch.Tensor:
    """bits [R, W] int32 (bit i % 32 of word i // 32 set: token i allowed) -> banned [R,
    vocab_size] bool: the ids not allowed, and every id from `known` (the tokenizer's size) up.

    numpy's unpackbits does in ~5 µs what torch shifts and masks do in ~100 µs.
    """
    words = bits.numpy().astype("<i4", copy=False)  # little-endian: token order within bytes
    flags = np.unpackbits(np.invert(words).view(np.uint8), axis=1, bitorder="little")
    banned = np.ones((flags.shape[0], vocab_size), dtype=np.uint8)  # [R, V]
    keep = min(known, vocab_size)
    banned[:, :keep] = flags[:, :keep]
    return torch.from_numpy(banned).view(torch.bool)
