"""OpenAI's `response_format`, as far as it can be judged without a tokenizer: its shape, the
JSON Schema it asks for, and whether llguidance can enforce that schema. The controller refuses
a bad one with a 400 before any node sees it; the engine compiles the same schema for its
tokenizer (`node_agent.engine.grammar`).

JSON layout is fixed: `", "` and `": "` separators and no other whitespace outside strings, as
`json.dumps` writes it. Flexible whitespace lets a weak model pad a document with blanks until
max_tokens; a fixed layout always makes progress.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import llguidance

from node_agent.facts.errors import RequestError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # only in the type stub

SUPPORTED_TYPES = ("text", "json_object", "json_schema")
MAX_SCHEMA_CHARS = 128 << 10  # bounds compile work; OpenAI's own cap is of the same order
# Forced over any "x-guidance" the schema carries: every grammar has the fixed layout (docstring).
_JSON_LAYOUT: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarError(RequestError):
    """A `response_format` that cannot be enforced: malformed, an unsupported type, a schema
    llguidance rejects, or output ids that do not fit it."""


def normalized(response_format: str | Mapping[str, Any] | None) -> str:
    """`response_format` as the wire carries it (`SamplingParams.response_format`): the schema
    it asks for as compact JSON, "" for free text. Raises GrammarError, one line naming the
    fix, for anything stoke cannot enforce."""
    schema = schema_of(response_format)
    if schema is None:
        return ""
    problem = llguidance.LLMatcher.validate_grammar(grammar_of(schema))
    if problem:
        raise GrammarError(unenforceable(problem))
    return json.dumps({"type": "json_schema", "json_schema": {"schema": schema}},
                      separators=(",", ":"), ensure_ascii=False)  # fmt: skip


def schema_key(schema: Mapping[str, Any]) -> str:
    """The schema as compact JSON (a compile cache's key); GrammarError when too large."""
    key = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if len(key) > MAX_SCHEMA_CHARS:
        raise GrammarError(
            f"response_format's JSON schema is {len(key)} characters, over the "
            f"{MAX_SCHEMA_CHARS} stoke compiles: simplify the schema"
        )
    return key


def grammar_of(schema: Mapping[str, Any]) -> str:
    """llguidance's grammar for `schema`, in stoke's fixed JSON layout."""
    schema_key(schema)  # refuses an oversized one before any work
    return str(llguidance.LLMatcher.grammar_from_json_schema(dict(schema), overrides=_JSON_LAYOUT))


def unenforceable(problem: str) -> str:
    return (
        f"response_format's JSON schema cannot be enforced: {one_line(problem)}"
        "; fix the schema (stoke enforces JSON Schema as llguidance supports it)"
    )


def schema_of(response_format: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The JSON Schema that `response_format` asks for, or None for free text.

    `{"type": "json_object"}` is any JSON object; `{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}, "strict": ...}}` is that schema, always enforced (`strict`
    only says whether OpenAI may fall back to unconstrained output; stoke never does).
    """
    if response_format is None or response_format == "":
        return None
    if isinstance(response_format, str):
        try:
            response_format = json.loads(response_format)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"response_format is not valid JSON ({exc})") from None
    if not isinstance(response_format, Mapping):
        raise GrammarError(
            f'response_format must be an object such as {{"type": "json_object"}}, '
            f"not {type(response_format).__name__}"
        )
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(_ANY_OBJECT)
    if kind == "json_schema":
        return _declared_schema(response_format.get("json_schema"))
    raise GrammarError(
        f"response_format.type={kind!r} is not supported: use one of {', '.join(SUPPORTED_TYPES)}"
    )


def _declared_schema(json_schema: Any) -> dict[str, Any]:
    if not isinstance(json_schema, Mapping):
        raise GrammarError(
            'response_format.json_schema must be an object: {"name": ..., "schema": {...}}'
        )
    schema = json_schema.get("schema")
    if not isinstance(schema, Mapping):
        raise GrammarError(
            "response_format.json_schema.schema must be a JSON Schema object "
            f"(got {type(schema).__name__}); for any JSON object use "
            '{"type": "json_object"}'
        )
    return dict(schema)


def one_line(message: str) -> str:
    """llguidance's messages span lines (a regex error draws a caret); a 400 wants one."""
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return text if len(text) <= 300 else text[:297] + "..."
