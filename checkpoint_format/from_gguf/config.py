"""GGUF hyper-parameters -> a Hugging Face `config.json` the engine reads like any other.

llama.cpp writes each architecture's hyper-parameters under `<arch>.<key>` (e.g.
`llama.block_count`). The engine runs the Llama family, so only the GGUF architectures that map
onto one of its Hugging Face classes are accepted; anything else is refused by name here, before
a byte is converted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from checkpoint_format.from_gguf.read import GGUFError, GGUFFile


@dataclass(frozen=True)
class Family:
    """How one GGUF architecture becomes a Hugging Face one."""

    hf_class: str
    model_type: str
    permuted_qk: bool  # llama.cpp permutes Q/K rows for rotary (its Llama converter does)


# GGUF `general.architecture` -> the engine's Hugging Face class. Mistral 7B is written as
# "llama" by llama.cpp, so it arrives (and runs) as LlamaForCausalLM.
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", "llama", permuted_qk=True),
    "qwen2": Family("Qwen2ForCausalLM", "qwen2", permuted_qk=False),
    "qwen3": Family("Qwen3ForCausalLM", "qwen3", permuted_qk=False),
}


def family_of(gguf: GGUFFile) -> Family:
    """The family of the file's architecture; a `GGUFError` naming it if stoke cannot run it."""
    arch = gguf.architecture
    if arch not in FAMILIES:
        raise GGUFError(
            f"{gguf.path}: architecture {arch!r} is not one stoke's engine runs (it runs "
            f"{', '.join(sorted(FAMILIES))}: Llama, Mistral, Qwen2, Qwen3 decoders)."
        )
    return FAMILIES[arch]


def hf_config(gguf: GGUFFile, *, tied: bool, torch_dtype: str) -> dict[str, Any]:
    """The `config.json` object for this file. `tied`: the file has no separate output matrix."""
    family = family_of(gguf)
    arch = gguf.architecture

    def key(name: str) -> str:
        return f"{arch}.{name}"

    _refuse_rope_scaling(gguf, key)
    tokens = gguf.get("tokenizer.ggml.tokens")
    vocab = gguf.get(key("vocab_size"), len(tokens) if isinstance(tokens, list) else None)
    heads = _positive(gguf, key("attention.head_count"))
    hidden = _positive(gguf, key("embedding_length"))
    config: dict[str, Any] = {
        "architectures": [family.hf_class],
        "model_type": family.model_type,
        "vocab_size": vocab if vocab is not None else gguf.require(key("vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": _positive(gguf, key("feed_forward_length")),
        "num_hidden_layers": _positive(gguf, key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(gguf.get(key("attention.head_count_kv"), heads)),
        "head_dim": int(gguf.get(key("attention.key_length"), hidden // heads)),
        "max_position_embeddings": _positive(gguf, key("context_length")),
        "rms_norm_eps": float(gguf.require(key("attention.layer_norm_rms_epsilon"))),
        "rope_theta": float(gguf.get(key("rope.freq_base"), 10000.0)),
        "tie_word_embeddings": tied,
        "torch_dtype": torch_dtype,
        "hidden_act": "silu",
    }
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = gguf.get(f"tokenizer.ggml.{name}")
        if value is not None:
            config[name] = int(value)
    if family.model_type in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
    return config


def _positive(gguf: GGUFFile, key: str) -> int:
    value = gguf.require(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise GGUFError(f"{gguf.path}: metadata {key} = {value!r}; expected a positive integer.")
    return value


def _refuse_rope_scaling(gguf: GGUFFile, key: Callable[[str], str]) -> None:
    """Scaled rope (linear, YaRN, ...) changes every position's rotation; the converter does not
    map it yet, so it refuses rather than convert a model that would run wrongly."""
    kind = gguf.get(key("rope.scaling.type"))
    if kind not in (None, "none"):
        raise GGUFError(
            f"{gguf.path}: rope scaling {kind!r} is not converted from GGUF yet; convert the "
            "model's Hugging Face directory instead (`stoke convert HF_DIR OUT_DIR`)."
        )
