"""node_agent.facts.tokenizer: encode/decode, end-of-sequence ids, chat templates."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as BackendTokenizer

from node_agent.facts.errors import EngineError, TokenizerError
from node_agent.facts.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

TEXT = "Crème brûlée, 你好, naïve café 🙂🚀 and plain words."
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is a lighthouse?"},
    {"role": "assistant", "content": "A tower with a light."},
    {"role": "user", "content": "Who keeps it?"},
]


def model_dir_with(
    src: Path, dst: Path, *, remove: tuple[str, ...] = (), **files: dict[str, Any]
) -> Path:
    """A copy of `src` where each `files` entry (file stem → keys) is merged into that JSON file
    (a value of None deletes the key) and the `remove`d files are gone."""
    shutil.copytree(src, dst)
    for stem, changes in files.items():
        path = dst / f"{stem}.json"
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    for name in remove:
        (dst / name).unlink()
    return dst


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


def test_encode_matches_tokenizers_library(tokenizer: Tokenizer, tiny_model_dir: Path) -> None:
    backend = BackendTokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert tokenizer.encode(TEXT) == backend.encode(TEXT).ids


def test_decode_round_trips_text(tokenizer: Tokenizer) -> None:
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT


def test_decode_skips_special_tokens_by_default(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert tokenizer.decode(ids) == "user\nhi"


def test_decode_keeps_special_tokens_when_asked(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>hi")
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>hi"


def test_vocab_size_counts_added_tokens(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 1024


def test_eos_ids_come_from_generation_config(tokenizer: Tokenizer) -> None:
    im_end, endoftext = tokenizer.encode("<|im_end|><|endoftext|>")
    assert tokenizer.eos_token_ids == frozenset({im_end, endoftext})


def test_eos_id_may_be_a_single_int(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = model_dir_with(
        tiny_model_dir,
        tmp_path / "m",
        generation_config={"eos_token_id": 7},
        config={"eos_token_id": None},
        tokenizer_config={"eos_token": None},
    )
    assert Tokenizer.from_dir(model_dir).eos_token_ids == frozenset({7})


def test_eos_token_text_in_tokenizer_config_counts(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = model_dir_with(
        tiny_model_dir,
        tmp_path / "m",
        config={"eos_token_id": None},
        tokenizer_config={"eos_token": {"content": "<|im_start|>", "special": True}},
        remove=("generation_config.json",),
    )
    tok = Tokenizer.from_dir(model_dir)
    assert tok.eos_token_ids == frozenset(tok.encode("<|im_start|>"))


def test_missing_tokenizer_json_names_file_and_fix(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = model_dir_with(tiny_model_dir, tmp_path / "m", remove=("tokenizer.json",))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json not found.*save_pretrained"):
        Tokenizer.from_dir(model_dir)


def test_corrupt_tokenizer_json_raises_tokenizer_error(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = model_dir_with(tiny_model_dir, tmp_path / "m")
    (model_dir / "tokenizer.json").write_text('{"version": "1.0"')
    with pytest.raises(TokenizerError, match="could not be loaded"):
        Tokenizer.from_dir(model_dir)


def test_tokenizer_error_is_an_engine_error() -> None:
    assert issubclass(TokenizerError, EngineError)


def test_add_bos_token_prepends_bos_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = model_dir_with(
        tiny_model_dir, tmp_path / "m", tokenizer_config={"add_bos_token": True}
    )
    tok = Tokenizer.from_dir(model_dir)
    assert tok.encode("hi")[0] == tok.bos_token_id
    assert tok.encode("<|endoftext|>hi").count(tok.bos_token_id) == 1


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(
    tokenizer: Tokenizer, tiny_model_dir: Path, add_generation_prompt: bool
) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = hf.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert tokenizer.apply_chat_template(CHAT, add_generation_prompt) == expected


def test_whitespace_control_and_filters_match_transformers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    template = (
        "{{ bos_token }}\n{% for m in messages %}\n  {% if loop.first %}\n[{{ m['role'] }}]"
        " {{ m['content'] | tojson }}\n  {% else %}\n{{ m['role'] | upper }}: {{ m['content'] }}"
        "\n  {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    model_dir = model_dir_with(
        tiny_model_dir, tmp_path / "m", tokenizer_config={"chat_template": template}
    )
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    expected = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert Tokenizer.from_dir(model_dir).apply_chat_template(CHAT) == expected


def test_chat_template_jinja_file_wins(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = model_dir_with(tiny_model_dir, tmp_path / "m")
    (model_dir / "chat_template.jinja").write_text("{{ messages | length }} messages")
    assert Tokenizer.from_dir(model_dir).apply_chat_template(CHAT) == "4 messages"


def test_missing_chat_template_raises(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = model_dir_with(
        tiny_model_dir, tmp_path / "m", tokenizer_config={"chat_template": None}
    )
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_dir(model_dir).apply_chat_template(CHAT)


def test_raise_exception_in_template_becomes_tokenizer_error(tokenizer: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="unsupported chat role: robot"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_template_cannot_reach_python_internals(tiny_model_dir: Path, tmp_path: Path) -> None:
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    model_dir = model_dir_with(
        tiny_model_dir, tmp_path / "m", tokenizer_config={"chat_template": escape}
    )
    with pytest.raises(TokenizerError, match="chat template"):
        Tokenizer.from_dir(model_dir).apply_chat_template(CHAT)


def test_template_syntax_error_names_the_fix(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = "{% for m in messages %}{{ m['content'] }}"
    model_dir = model_dir_with(
        tiny_model_dir, tmp_path / "m", tokenizer_config={"chat_template": broken}
    )
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        Tokenizer.from_dir(model_dir).apply_chat_template(CHAT)
