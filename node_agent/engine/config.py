"""Model configuration: the one place `config.json` is read and validated.

Hugging Face configs differ across architectures and across `transformers` versions (v5 moved
`rope_theta`/`rope_scaling` into `rope_parameters`); `ModelConfig.from_dict` folds them into one
frozen dataclass that the rest of the engine trusts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from node_agent.engine.errors import ConfigError

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
    """Rotary embedding parameters (`rope_parameters` in transformers v5 terms)."""

    theta: float = 10000.0
    kind: RopeKind = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> list[float]:
        """Inverse frequencies per rotary pair, with the configured scaling applied."""
        base = [1.0 / (self.theta ** (i / head_dim)) for i in range(0, head_dim, 2)]
        if self.kind == "linear":
            return [f / self.factor for f in base]
        if self.kind == "llama3":
            return [self._llama3(f) for f in base]
        return base

    def _llama3(self, freq: float) -> float:
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
        # them interpolated (transformers' `_compute_llama3_parameters`).
        old_len = self.original_max_position_embeddings
        low_wavelen = old_len / self.low_freq_factor
        high_wavelen = old_len / self.high_freq_factor
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            return freq
        if wavelen > low_wavelen:
            return freq / self.factor
        smooth = (old_len / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        return (1 - smooth) * freq / self.factor + smooth * freq


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
        path = Path(model_dir) / "config.json"
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
        architecture = _architecture(raw, source)
        family = SUPPORTED_ARCHITECTURES[architecture]
        missing = [key for key in REQUIRED_KEYS if key not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        heads = int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or raw["hidden_size"] // heads)
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}"
            )
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            architecture=architecture,
            family=family,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope(raw, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family in ("llama",) and attention_bias,
            mlp_bias=family == "llama" and bool(raw.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=_sliding_window(raw, family, source),
        )


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
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ConfigError(
            f"{source}: unsupported rope scaling type {kind!r}; supported: default, linear, llama3"
        )
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


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
