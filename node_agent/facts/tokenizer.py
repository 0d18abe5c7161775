"""The model's tokenizer and chat template, read from a Hugging Face model directory.

Encoding and decoding use the `tokenizers` library on `tokenizer.json` (no `transformers`).
The chat template is rendered with Jinja2 in a sandbox, configured as `transformers` does it
(trim_blocks, lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`), so a template renders
here exactly as it does in `tokenizer.apply_chat_template(..., tokenize=False)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

from node_agent.facts.errors import TokenizerError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
    """Text ⇄ token ids for one model, plus its chat template and end-of-sequence ids."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        add_bos_token: bool = False,
        eos_token_ids: Iterable[int] = (),
        source: str = "<memory>",
    ) -> None:
        """Wrap a `tokenizers.Tokenizer`; prefer `Tokenizer.from_dir` for a model directory.

        `special_tokens` maps bos_token/eos_token/pad_token/unk_token to their text; `source`
        names where the tokenizer came from in error messages.
        """
        self._backend = backend
        self._chat_template = chat_template
        self._special_tokens = dict(special_tokens or {})
        self._source = source
        bos = self._special_tokens.get("bos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos) if bos else None
        self._add_bos = add_bos_token and self.bos_token_id is not None
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self._template: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json, generation_config.json and config.json.

        Only tokenizer.json is required. End-of-sequence ids are the union of
        generation_config.json's and config.json's `eos_token_id` (int or list) and the id of
        tokenizer_config.json's `eos_token`. A `chat_template.jinja` file wins over the
        `chat_template` key, as in `transformers`.
        """
        model_dir = Path(path)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(
                f"{tokenizer_file} not found: stoke needs a Hugging Face fast tokenizer; save one "
                "into the model directory with transformers' "
                "AutoTokenizer.from_pretrained(...).save_pretrained(dir)"
            )
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises plain Exception subclasses
            raise TokenizerError(
                f"{tokenizer_file} could not be loaded ({exc}); replace it with a valid "
                "tokenizer.json from the model's original repository"
            ) from None
        config = _read_json(model_dir / "tokenizer_config.json")
        special = {
            key: text for key in SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key)))
        }
        eos_ids = set(_ids(_read_json(model_dir / "generation_config.json").get("eos_token_id")))
        eos_ids.update(_ids(_read_json(model_dir / "config.json").get("eos_token_id")))
        if (eos := special.get("eos_token")) and (eos_id := backend.token_to_id(eos)) is not None:
            eos_ids.add(eos_id)
        return cls(
            backend,
            chat_template=_chat_template(model_dir, config),
            special_tokens=special,
            add_bos_token=bool(config.get("add_bos_token", False)),
            eos_token_ids=eos_ids,
            source=str(model_dir),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text, for libraries that build their own view of
        the vocabulary (the constrained decoder, `node_agent.engine.grammar`)."""
        return str(self._backend.to_str())

    @property
    def has_chat_template(self) -> bool:
        """Whether `apply_chat_template` can be used."""
        return self._chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, the tokenizer's post-processor runs
        and the BOS token is prepended when tokenizer_config.json asks for it (never twice)."""
        ids: list[int] = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos and (not ids or ids[0] != self.bos_token_id):
            assert self.bos_token_id is not None
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; incomplete UTF-8 sequences come out as U+FFFD."""
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render `messages` ({"role", "content"} dicts) into the prompt text the model expects.

        Raises TokenizerError when the model has no chat template or the template rejects the
        messages (e.g. via `raise_exception`).
        """
        template = self._compiled_template()
        try:
            return template.render(
                messages=[dict(message) for message in messages],
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise TokenizerError(
                f"the chat template of {self._source} failed on these messages: {exc}"
            ) from None

    def _compiled_template(self) -> jinja2.Template:
        if self._chat_template is None:
            raise TokenizerError(
                f"{self._source} has no chat template (no chat_template in tokenizer_config.json "
                "and no chat_template.jinja): send a plain completion prompt instead, or add the "
                "model's chat template to tokenizer_config.json"
            )
        if self._template is None:
            try:
                self._template = _jinja_environment().from_string(self._chat_template)
            except jinja2.TemplateSyntaxError as exc:
                raise TokenizerError(
                    f"the chat template of {self._source} is not valid Jinja ({exc}, line "
                    f"{exc.lineno}): fix it in tokenizer_config.json"
                ) from None
        return self._template


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the (optional) file does not exist."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path} is not valid JSON ({exc}): fix or remove the file") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, int)]
    return []


def _chat_template(model_dir: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    return template if isinstance(template, str) else None
