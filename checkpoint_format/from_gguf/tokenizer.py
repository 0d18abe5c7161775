"""Build `tokenizer.json` and `tokenizer_config.json` from a GGUF file's tokenizer metadata.

A GGUF has no tokenizer files: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`), the
BPE merges, each token's type (normal, control, user-defined, ...), the special token ids and
the chat template as metadata. This module rebuilds a Hugging Face fast tokenizer from them with
the `tokenizers` library, the way `transformers` does for the same file, so the ids stoke's
engine sees equal the reference's. Byte-level BPE (`tokenizer.ggml.model == "gpt2"`: GPT-2,
SmolLM, Llama 3, Qwen) is built; other tokenizer models are refused by name.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from checkpoint_format.from_gguf.read import GGUFError, GGUFFile

SUPPORTED_TOKENIZERS = ("gpt2",)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, as llama.cpp (and transformers) use them;
# a name not listed uses GPT-2's own pattern, built into the ByteLevel pre-tokenizer.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


@cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (every byte-level BPE vocabulary uses it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def tokenizer_json(gguf: GGUFFile) -> str:
    """The `tokenizer.json` text for this file's tokenizer; `GGUFError` if it cannot be built."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    model = gguf.get("tokenizer.ggml.model")
    if model not in SUPPORTED_TOKENIZERS:
        raise GGUFError(
            f"{gguf.path}: tokenizer model {model!r} (tokenizer.ggml.model) cannot be built by "
            f"stoke (it builds {', '.join(SUPPORTED_TOKENIZERS)}: byte-level BPE). Use the "
            "model's Hugging Face directory, which carries its tokenizer.json."
        )
    tokens, types = _tokens(gguf)
    alphabet = set(_byte_alphabet().values())
    vocab = {_byte_spelling(t, alphabet): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in gguf.get("tokenizer.ggml.merges") or []]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="")
    )
    split = SPLITS.get(str(gguf.get("tokenizer.ggml.pre", "")))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>) stay whole and are skipped when decoding;
    # user-defined ones (<think>) stay whole and are kept. A "control" token spelled outside the
    # byte alphabet is a llama.cpp mislabel and is left to the BPE model (as transformers does).
    tokenizer.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, kind in zip(tokens, types, strict=True)
            if kind == _CONTROL and set(t) <= alphabet
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind == _USER_DEFINED and t in vocab
        ]
    )
    return str(tokenizer.to_str(pretty=False))


def tokenizer_config(gguf: GGUFFile) -> dict[str, Any]:
    """`tokenizer_config.json`: special tokens by text, whether to add BOS, the chat template."""
    tokens, _ = _tokens(gguf)
    config: dict[str, Any] = {
        "add_bos_token": bool(gguf.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(gguf.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(gguf.get(f"{gguf.architecture}.context_length", 2048)),
    }
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        token_id = gguf.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            if not 0 <= int(token_id) < len(tokens):
                raise GGUFError(
                    f"{gguf.path}: tokenizer.ggml.{key} = {token_id} is outside the vocabulary "
                    f"of {len(tokens)} tokens; the file is corrupt."
                )
            config[name] = tokens[int(token_id)]
    template = gguf.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return config


def tokenizer_files(gguf: GGUFFile) -> dict[str, bytes]:
    """`file name -> bytes` of the tokenizer files to place in the checkpoint."""
    return {
        "tokenizer.json": tokenizer_json(gguf).encode(),
        "tokenizer_config.json": json.dumps(tokenizer_config(gguf), indent=2).encode(),
    }


def _tokens(gguf: GGUFFile) -> tuple[list[str], list[int]]:
    tokens = gguf.require("tokenizer.ggml.tokens")
    types = gguf.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not isinstance(tokens, list) or not tokens or len(types) != len(tokens):
        raise GGUFError(
            f"{gguf.path}: tokenizer.ggml.tokens / token_type are empty or of different lengths; "
            "the file is corrupt."
        )
    return [str(t) for t in tokens], [int(k) for k in types]


def _byte_spelling(token: str, alphabet: set[str]) -> str:
    """A token written in the byte alphabet (llama.cpp stores a few in plain UTF-8)."""
    if set(token) <= alphabet:
        return token
    table = _byte_alphabet()
    return "".join(table[b] for b in token.encode("utf-8"))
