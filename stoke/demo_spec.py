"""Shapes and configs of the random-weight demo models (pure Python: no torch import).

A demo model is described by a Hugging Face `config.json` dict; `tensor_specs` derives the full
list of weights (names, shapes, init) from that dict alone, so the config is the one source of
truth for what gets written and for how many parameters a size has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from stoke.errors import StokeError

SIZES: tuple[str, ...] = ("tiny", "small", "1b")
ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
MAX_POSITION_EMBEDDINGS = 2048
INITIALIZER_RANGE = 0.02


@dataclass(frozen=True)
class SizeSpec:
    """Transformer shape of one demo size; `target_vocab` is what the BPE trainer aims for."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    target_vocab: int


@dataclass(frozen=True)
class ArchSpec:
    """What distinguishes one Llama-family architecture's config from another's."""

    architecture: str
    model_type: str
    rope_theta: float
    rms_norm_eps: float
    extra: tuple[tuple[str, Any], ...] = ()


SIZE_SPECS: dict[str, SizeSpec] = {
    # A few hundred thousand parameters: fast enough for every unit test.
    "tiny": SizeSpec(64, 4, 4, 2, 192, target_vocab=1000),
    # ~96M parameters.
    "small": SizeSpec(768, 12, 12, 4, 2560, target_vocab=4000),
    # TinyLlama's layer shapes; 24 layers instead of 22 make up for the small vocabulary (~1.07B).
    "1b": SizeSpec(2048, 24, 32, 4, 5632, target_vocab=4000),
}

ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        "LlamaForCausalLM",
        "llama",
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        extra=(("attention_bias", False), ("mlp_bias", False)),
    ),
    "mistral": ArchSpec(
        "MistralForCausalLM",
        "mistral",
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        extra=(("sliding_window", None),),
    ),
    # Qwen2 always has q/k/v biases (its config has no switch for them) and no o_proj bias.
    "qwen2": ArchSpec(
        "Qwen2ForCausalLM",
        "qwen2",
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        extra=(("use_sliding_window", False), ("sliding_window", None)),
    ),
    "qwen3": ArchSpec(
        "Qwen3ForCausalLM",
        "qwen3",
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        extra=(("attention_bias", False), ("use_sliding_window", False), ("sliding_window", None)),
    ),
}

SHAPE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)


def check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a StokeError naming the valid choices when `value` is not one of them."""
    if value not in choices:
        raise StokeError(f"unknown {kind} {value!r}: choose one of {', '.join(choices)}")


def build_config(
    size: str,
    arch: str,
    *,
    vocab_size: int,
    dtype: str,
    special_ids: dict[str, int],
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `config.json` dict for a demo model; `overrides` replace or add keys last."""
    check_choice("size", size, SIZES)
    check_choice("arch", arch, ARCHS)
    check_choice("dtype", dtype, DTYPES)
    overrides = dict(overrides or {})
    spec, arch_spec = SIZE_SPECS[size], ARCH_SPECS[arch]
    shape = {key: getattr(spec, key) for key in SHAPE_KEYS}
    shape.update({key: overrides[key] for key in SHAPE_KEYS if key in overrides})
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    if arch == "qwen3" and size == "tiny":
        # Real Qwen3 decouples head_dim from hidden_size / heads; make the tiny one do it too.
        head_dim *= 2
    config: dict[str, Any] = {
        "architectures": [arch_spec.architecture],
        "model_type": arch_spec.model_type,
        "vocab_size": vocab_size,
        **shape,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "initializer_range": INITIALIZER_RANGE,
        "rms_norm_eps": arch_spec.rms_norm_eps,
        "rope_theta": arch_spec.rope_theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "use_cache": True,
        # Untied for every arch: a tied random model mostly repeats its input token. Pass
        # config_overrides={"tie_word_embeddings": True} for the tied layout (no lm_head.weight).
        "tie_word_embeddings": False,
        "bos_token_id": special_ids["bos"],
        "eos_token_id": special_ids["eos"],
        "pad_token_id": special_ids["pad"],
        "dtype": dtype,
        "torch_dtype": dtype,
        **dict(arch_spec.extra),
    }
    if arch != "qwen2":  # Qwen2's config has no head_dim; it is always hidden / heads there.
        config["head_dim"] = head_dim
    if arch in ("qwen2", "qwen3"):
        config["max_window_layers"] = shape["num_hidden_layers"]
    config.update(overrides)
    _check_shape(config)
    return config


def _check_shape(config: dict[str, Any]) -> None:
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    if heads % kv_heads:
        raise StokeError(
            f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}: "
            "grouped-query attention needs whole groups; change one of the overrides"
        )
    if "head_dim" not in config and config["hidden_size"] % heads:
        raise StokeError(
            f"hidden_size={config['hidden_size']} is not divisible by num_attention_heads={heads}; "
            "change one of the overrides or set head_dim"
        )


@dataclass(frozen=True)
class TensorSpec:
    """One weight: its Hugging Face name, shape and how to initialise it."""

    name: str
    shape: tuple[int, ...]
    init: Literal["normal", "ones"]
    std: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_specs(config: dict[str, Any]) -> list[TensorSpec]:
    """Every weight of the model described by `config`, in Hugging Face state-dict order."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    model_type = config["model_type"]
    attention_bias = bool(config.get("attention_bias", False))
    qkv_bias = model_type == "qwen2" or attention_bias
    std = float(config.get("initializer_range", INITIALIZER_RANGE))  # biases
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    # Unit-scale embeddings and std 1/sqrt(fan_in) projections keep activations O(1) at every
    # size; projections into the residual stream are scaled down by sqrt(2 * layers) (GPT-2
    # style) so the current token stays visible in it. With HF's 0.02 embeddings the layers drown
    # the token, the next-token choice barely depends on it, and greedy decoding repeats itself.
    residual = 1.0 / math.sqrt(2 * layers)

    def normal(name: str, shape: tuple[int, ...], scale: float) -> TensorSpec:
        return TensorSpec(name, shape, "normal", scale)

    def proj(name: str, rows: int, cols: int, scale: float = 1.0) -> TensorSpec:
        return normal(name, (rows, cols), scale / math.sqrt(cols))

    specs = [normal("model.embed_tokens.weight", (vocab, hidden), 1.0)]
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            specs.append(proj(f"{p}.self_attn.{name}.weight", rows, hidden))
            if qkv_bias:
                specs.append(normal(f"{p}.self_attn.{name}.bias", (rows,), std))
        specs.append(proj(f"{p}.self_attn.o_proj.weight", hidden, q_rows, residual))
        if attention_bias:
            specs.append(normal(f"{p}.self_attn.o_proj.bias", (hidden,), std))
        if model_type == "qwen3":
            specs.append(TensorSpec(f"{p}.self_attn.q_norm.weight", (head_dim,), "ones"))
            specs.append(TensorSpec(f"{p}.self_attn.k_norm.weight", (head_dim,), "ones"))
        mlp_bias = bool(config.get("mlp_bias", False))
        for name, rows, cols, scale in (
            ("gate_proj", inter, hidden, 1.0),
            ("up_proj", inter, hidden, 1.0),
            ("down_proj", hidden, inter, residual),
        ):
            specs.append(proj(f"{p}.mlp.{name}.weight", rows, cols, scale))
            if mlp_bias:
                specs.append(normal(f"{p}.mlp.{name}.bias", (rows,), std))
        specs.append(TensorSpec(f"{p}.input_layernorm.weight", (hidden,), "ones"))
        specs.append(TensorSpec(f"{p}.post_attention_layernorm.weight", (hidden,), "ones"))
    specs.append(TensorSpec("model.norm.weight", (hidden,), "ones"))
    if not config.get("tie_word_embeddings", False):
        # Logits ~ N(0, 1): varied under greedy decoding, not uniform under sampling.
        specs.append(proj("lm_head.weight", vocab, hidden))
    return specs


def count_parameters(config: dict[str, Any]) -> int:
    """Number of parameters of the model `config` describes (tied weights counted once)."""
    return sum(spec.numel for spec in tensor_specs(config))
