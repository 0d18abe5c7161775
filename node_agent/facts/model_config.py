"""Model configuration: the one place `config.json` is read and validated.

Hugging Face configs differ across architectures and across `transformers` versions (v5 moved
`rope_theta`/`rope_scaling` into `rope_parameters`); `ModelConfig.from_dict` folds them into one
frozen dataclass that the rest of the engine trusts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from checkpoint_format import is_checkpoint, read_config
from node_agent.facts.errors import ConfigError

# HF class name -> the family quirks the engine implements.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

RopeKind = Literal["default", "linear", "llama3"]


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (`rope_parameters` in transformers v5 terms); the
    frequencies themselves are computed in `rotary.py`, exactly as transformers does."""

    theta: float = 10000.0
    kind: RopeKind = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder's shape and quirks, validated."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q/k/v projections (Qwen2; Llama's attention_bias)
    o_bias: bool  # bias on the output projection (Llama's attention_bias)
    mlp_bias: bool
    qk_norm: bool  # RMSNorm on q and k per head before rotary (Qwen3)
    sliding_window: int | None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Read `config.json`; a stoke checkpoint without one carries it in its manifest."""
        path = Path(model_dir) / "config.json"
        if not path.exists() and is_checkpoint(model_dir):
            embedded = read_config(model_dir)
            if embedded is not None:
                return cls.from_dict(embedded, source=f"{model_dir} (manifest config)")
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{path} not found: a model directory needs a Hugging Face config.json "
                "(make one with `stoke demo-model DIR`, or point at a model directory)"
            ) from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        architecture = _architecture(raw, source)
        family = SUPPORTED_ARCHITECTURES[architecture]
        missing = [key for key in REQUIRED_KEYS if key not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        size = _Reader(raw, source)
        heads = size.positive("num_attention_heads")
        kv_heads = size.positive("num_key_value_heads", heads)
        hidden = size.positive("hidden_size")
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}"
            )
        bias = bool(raw.get("attention_bias", False))
        return cls(
            architecture=architecture,
            family=family,
            vocab_size=size.positive("vocab_size"),
            hidden_size=hidden,
            intermediate_size=size.positive("intermediate_size"),
            num_hidden_layers=size.positive("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=size.positive("head_dim", hidden // heads),
            max_position_embeddings=size.positive("max_position_embeddings", 2048),
            rms_norm_eps=size.number("rms_norm_eps", 1e-6),
            rope=_rope(raw, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Bias switches exactly as transformers builds each family's layers.
            qkv_bias={"llama": bias, "qwen2": True, "qwen3": bias}.get(family, False),
            o_bias={"llama": bias, "qwen3": bias}.get(family, False),
            mlp_bias=family == "llama" and bool(raw.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=_sliding_window(raw, family, source),
        )


class _Reader:
    """Typed reads of config values, each failure naming the key and the value."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def positive(self, key: str, default: int | None = None) -> int:
        value = self.raw.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{self.source}: {key}={value!r} must be a positive integer")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{self.source}: {key}={value!r} must be a positive number")
        return float(value)


def _architecture(raw: dict[str, Any], source: str) -> str:
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    names = raw.get("architectures") or []
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return str(name)
    if not names:
        raise ConfigError(f"{source}: missing key 'architectures'; supported: {supported}")
    raise ConfigError(
        f"{source}: unsupported architecture {', '.join(map(str, names))}; supported: {supported}"
    )


def _rope(raw: dict[str, Any], source: str) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    try:
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: rope_theta must be a number") from None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ConfigError(
            f"{source}: unsupported rope scaling type {kind!r}; supported: default, linear, llama3"
        )
    try:
        return RopeConfig(
            theta=theta,
            kind=kind,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", 8192)
            ),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: bad rope parameters {params!r}: {exc}") from None


def _sliding_window(raw: dict[str, Any], family: str, source: str) -> int | None:
    if family == "mistral":
        window = raw.get("sliding_window")
        return int(window) if window else None
    if raw.get("use_sliding_window"):
        raise ConfigError(
            f"{source}: use_sliding_window=true is not supported for {family}; "
            "set it to false (the default for released Qwen models)"
        )
    return None
