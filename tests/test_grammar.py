"""Constrained decoding (node_agent.engine.grammar) on the demo model's real tokenizer: walks that
pick random allowed tokens must yield valid JSON, masks must hold, and a matcher rebuilt from
emitted ids must continue exactly as the uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from node_agent.engine.grammar import CompiledGrammar, GrammarCompiler, Matcher, apply_masks
from node_agent.facts.errors import RequestError
from node_agent.facts.response_format import MAX_SCHEMA_CHARS, GrammarError, normalized
from node_agent.facts.tokenizer import Tokenizer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
MAX_STEPS = 400


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer)


def closers(tokenizer: Tokenizer) -> torch.Tensor:
    """A bonus for tokens holding `"`, `}` or `]`, so random walks close what they open."""
    texts = [tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.vocab_size)]
    return torch.tensor([3.0 if any(c in t for c in '"}]') else 0.0 for t in texts])


def walk(
    grammar: CompiledGrammar, tokenizer: Tokenizer, seed: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Sample from random logits under the grammar until it is finished: (ids, mask per step),
    the last mask being the one seen when finished."""
    generator = torch.Generator().manual_seed(seed)
    bonus = closers(tokenizer)
    matcher = Matcher(grammar)
    ids: list[int] = []
    masks: list[torch.Tensor] = []
    for _ in range(MAX_STEPS):
        masks.append(matcher.allowed(tokenizer.vocab_size))
        if matcher.is_finished():
            return ids, masks
        logits = torch.randn(1, tokenizer.vocab_size, generator=generator) + bonus
        apply_masks(logits, [matcher])
        token = int(logits.argmax())
        matcher.advance(token)
        ids.append(token)
    raise AssertionError(f"no complete document in {MAX_STEPS} steps: {tokenizer.decode(ids)!r}")


def test_json_object_walk_is_an_object_and_ends_with_eos_only(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    grammar = compiler.compile({"type": "json_object"})
    assert grammar is not None
    for seed in range(3):
        ids, masks = walk(grammar, tokenizer, seed)
        value = json.loads(tokenizer.decode(ids))
        assert isinstance(value, dict)
        final = masks[-1].nonzero().flatten().tolist()
        assert final and set(final) <= tokenizer.eos_token_ids


def test_json_schema_walk_validates(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    grammar = compiler.compile(json.dumps(JSON_SCHEMA_FORMAT))  # as SamplingParams carries it
    assert grammar is not None
    for seed in range(3):
        ids, _ = walk(grammar, tokenizer, seed)
        jsonschema.validate(json.loads(tokenizer.decode(ids)), SCHEMA)


def test_disallowed_tokens_are_masked_and_refused(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    grammar = compiler.compile({"type": "json_object"})
    assert grammar is not None
    matcher = Matcher(grammar)
    allowed = matcher.allowed(tokenizer.vocab_size)
    (letter,) = tokenizer.encode("x", add_special_tokens=False)
    assert not allowed[letter] and 0 < int(allowed.sum()) < tokenizer.vocab_size
    logits = torch.randn(1, tokenizer.vocab_size)
    before = logits.clone()
    apply_masks(logits, [matcher])
    assert torch.equal(logits[0, allowed], before[0, allowed])
    assert torch.isneginf(logits[0, ~allowed]).all()
    with pytest.raises(GrammarError, match="does not fit"):
        matcher.advance(letter)


def test_rebuilt_matcher_continues_like_the_uninterrupted_one(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    grammar = compiler.compile(JSON_SCHEMA_FORMAT)
    assert grammar is not None
    ids, masks = walk(grammar, tokenizer, seed=7)
    reused = Matcher(grammar, ids)  # rebuild() below moves it back
    for k in sorted({0, 1, len(ids) // 3, len(ids) // 2, len(ids) - 1, len(ids)}):
        resumed = Matcher(grammar, ids[:k])
        reused.rebuild(ids[:k])
        for step in range(k, len(ids) + 1):
            for matcher in (resumed, reused):
                assert torch.equal(matcher.allowed(tokenizer.vocab_size), masks[step]), (k, step)
            if step < len(ids):
                resumed.advance(ids[step])
                reused.advance(ids[step])
        assert resumed.is_finished() and reused.is_finished()


def test_resume_past_the_final_eos_is_finished(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    grammar = compiler.compile({"type": "json_object"})
    assert grammar is not None
    ids = tokenizer.encode('{"a": [1, {}]}', add_special_tokens=False)
    assert not Matcher(grammar, ids[:-1]).is_finished()
    for eos in tokenizer.eos_token_ids:
        assert Matcher(grammar, [*ids, eos]).is_finished()
        with pytest.raises(GrammarError, match=f"output token {len(ids) + 1} "):
            Matcher(grammar, [*ids, eos, ids[0]])


def test_resume_with_ids_that_do_not_fit_is_refused(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    grammar = compiler.compile({"type": "json_object"})
    assert grammar is not None
    with pytest.raises(GrammarError, match=r"output token 1 \(id"):
        Matcher(grammar, tokenizer.encode("{x", add_special_tokens=False))


def test_model_vocab_larger_than_the_tokenizer_is_padded_off(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    grammar = compiler.compile({"type": "json_object"})
    assert grammar is not None
    matcher = Matcher(grammar)
    vocab = tokenizer.vocab_size + 64
    allowed = matcher.allowed(vocab)
    assert allowed.shape == (vocab,) and not allowed[tokenizer.vocab_size :].any()
    assert torch.equal(allowed[: tokenizer.vocab_size], matcher.allowed(tokenizer.vocab_size))
    logits = torch.zeros(3, vocab)
    apply_masks(logits, [None, matcher, None])  # only the constrained row changes
    assert torch.equal(torch.isfinite(logits[1]), allowed)
    assert torch.equal(logits[[0, 2]], torch.zeros(2, vocab))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_masks_apply_to_logits_on_the_gpu(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    grammar = compiler.compile(JSON_SCHEMA_FORMAT)
    assert grammar is not None
    matchers = [
        Matcher(grammar),
        None,
        Matcher(grammar, tokenizer.encode('{"name": "a', add_special_tokens=False)),
    ]
    logits = torch.randn(3, tokenizer.vocab_size + 32)
    on_gpu = logits.cuda()
    apply_masks(logits, matchers)
    apply_masks(on_gpu, matchers)
    assert torch.equal(on_gpu.cpu(), logits)
    assert torch.isneginf(logits[0]).any() and torch.isfinite(logits[1]).all()


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "regex", "regex": "a+"}, "type='regex' is not supported"),
        ({"type": "json_schema"}, "json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema must be a JSON Schema"),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}},
            "cannot be enforced: Invalid type: nonsense; fix the schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(a"}}},
            "cannot be enforced: regex parse error",
        ),
        ("{not json", "not valid JSON"),
        ('["json_object"]', "must be an object"),
        (
            {"type": "json_schema", "json_schema": {"schema": {"enum": ["a" * MAX_SCHEMA_CHARS]}}},
            "simplify the schema",
        ),
    ],
)
def test_invalid_formats_are_request_errors(
    compiler: GrammarCompiler, response_format: Any, expected: str
) -> None:
    with pytest.raises(RequestError, match="response_format") as raised:
        compiler.compile(response_format)
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(RequestError, match="response_format") as refused:
        normalized(response_format)  # the controller's check, without a tokenizer
    assert str(refused.value) == str(raised.value)


@pytest.mark.parametrize("response_format", [None, "", {"type": "text"}, '{"type": "text"}'])
def test_text_needs_no_grammar(compiler: GrammarCompiler, response_format: Any) -> None:
    assert compiler.compile(response_format) is None
    assert normalized(response_format) == ""


def test_the_normalized_format_compiles_to_the_same_grammar(compiler: GrammarCompiler) -> None:
    wire = normalized(JSON_SCHEMA_FORMAT)
    assert compiler.compile(wire) is compiler.compile(JSON_SCHEMA_FORMAT)


def test_compiled_grammars_are_cached_least_recently_used_out(tokenizer: Tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, cache_size=2)
    first = compiler.compile(JSON_SCHEMA_FORMAT)
    assert compiler.compile(json.dumps(JSON_SCHEMA_FORMAT)) is first  # same schema, as text
    renamed = {"type": "json_schema", "json_schema": {"name": "other", "schema": SCHEMA}}
    assert compiler.compile(renamed) is first  # the name does not change the grammar
    assert compiler.hits == 2
    any_object = compiler.compile({"type": "json_object"})
    compiler.compile({"type": "json_schema", "json_schema": {"schema": {"type": "array"}}})
    assert compiler.compile({"type": "json_object"}) is any_object  # kept: used more recently
    assert compiler.compile(JSON_SCHEMA_FORMAT) is not first  # evicted, compiled again
    assert compiler.hits == 3
