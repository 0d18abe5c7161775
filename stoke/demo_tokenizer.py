"""The demo models' tokenizer: a byte-level BPE trained on `stoke/data/corpus.txt`.

Training is deterministic (the `tokenizers` BPE trainer breaks ties by pair, and the corpus is
fixed), takes ~0.1 s, and is cached per vocabulary size for the life of the process.
The vocabulary is padded with `<|reserved_N|>` special tokens so that every id a model with
`vocab_size == len(tokenizer)` can emit decodes.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from stoke.errors import StokeError

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)
VOCAB_MULTIPLE = 64

# ChatML, as Qwen's instruct models use it. The `\n` escapes are Jinja's, not Python's.
CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}\n"
    "{{- raise_exception('unsupported chat role: ' + message['role']) }}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def padded_vocab_size(size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """`size` rounded up to a multiple of `multiple`."""
    return -(-size // multiple) * multiple


def _corpus() -> str:
    return resources.files("stoke").joinpath("data", "corpus.txt").read_text(encoding="utf-8")


@functools.cache
def trained_tokenizer_json(target_vocab: int) -> str:
    """The serialized BPE tokenizer trained to at most `target_vocab` tokens (specials included)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=target_vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus().splitlines(keepends=True), trainer=trainer)
    return tokenizer.to_str()


@functools.cache
def demo_tokenizer_json(target_vocab: int, total_vocab: int | None = None) -> str:
    """The tokenizer.json text: trained to `target_vocab`, then padded with reserved specials.

    `total_vocab` (default: the trained size rounded up to a multiple of 64) is the final size;
    it must be at least the trained size.
    """
    tokenizer = Tokenizer.from_str(trained_tokenizer_json(target_vocab))
    trained = tokenizer.get_vocab_size()
    total = padded_vocab_size(trained) if total_vocab is None else total_vocab
    if total < trained:
        raise StokeError(
            f"vocab_size={total} is smaller than the demo tokenizer's {trained} tokens: "
            f"use a vocab_size of at least {trained}"
        )
    tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(total - trained)])
    assert tokenizer.get_vocab_size() == total, "reserved tokens must get fresh ids"
    return tokenizer.to_str(pretty=True)


def special_token_ids(tokenizer_json: str) -> dict[str, int]:
    """Ids of the bos / eos / pad tokens (as config.json names them) and of the three specials."""
    tokenizer = Tokenizer.from_str(tokenizer_json)

    def token_id(token: str) -> int:
        found = tokenizer.token_to_id(token)
        assert found is not None, f"{token} is a demo special token"
        return found

    return {
        "bos": token_id(ENDOFTEXT),
        "eos": token_id(IM_END),
        "pad": token_id(ENDOFTEXT),
        "endoftext": token_id(ENDOFTEXT),
        "im_start": token_id(IM_START),
        "im_end": token_id(IM_END),
    }


def vocab_size_of(tokenizer_json: str) -> int:
    """Number of ids the serialized tokenizer can produce and decode (added tokens included)."""
    return Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """The `tokenizer_config.json` dict (what `transformers.AutoTokenizer` reads)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": ENDOFTEXT,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer_files(out_dir: Path, tokenizer_json: str, model_max_length: int) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` into `out_dir`."""
    (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(model_max_length))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON with a trailing newline, byte-identical for equal input."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
