"""config.json validation and the CPU dtype policy."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from node_agent.engine.weights import from_pretrained
from node_agent.facts.errors import ConfigError
from node_agent.facts.model_config import ModelConfig
from stoke.demo_model import make_demo_model


def raw_config(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    return {k: v for k, v in {**base, **overrides}.items() if v is not None}


def test_unknown_architecture_names_it_and_lists_the_supported_ones() -> None:
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        ModelConfig.from_dict(raw_config(architectures=["GPT2LMHeadModel"]))


def test_missing_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"missing required key.*intermediate_size"):
        ModelConfig.from_dict(raw_config(intermediate_size=None))


def test_unsupported_rope_scaling_is_named() -> None:
    with pytest.raises(ConfigError, match="'yarn'"):
        ModelConfig.from_dict(raw_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_heads_not_divisible_by_kv_heads_is_rejected() -> None:
    with pytest.raises(ConfigError, match="num_key_value_heads=3"):
        ModelConfig.from_dict(raw_config(num_key_value_heads=3))


def test_missing_config_file_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stoke demo-model"):
        ModelConfig.from_dir(tmp_path)


def test_qwen_families_get_their_quirks() -> None:
    qwen2 = ModelConfig.from_dict(raw_config(architectures=["Qwen2ForCausalLM"]))
    qwen3 = ModelConfig.from_dict(raw_config(architectures=["Qwen3ForCausalLM"], head_dim=32))
    assert (qwen2.qkv_bias, qwen2.qk_norm) == (True, False)
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim) == (False, True, 32)


def test_bf16_checkpoint_is_upcast_once_on_cpu_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = make_demo_model(tmp_path / "bf16", size="tiny", dtype="bfloat16")
    with caplog.at_level(logging.WARNING):
        loaded = from_pretrained(model_dir)
    assert loaded.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert "converting" in caplog.text and "float32" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_key_value_heads": "two"}, "num_key_value_heads='two' must be a positive integer"),
        ({"num_attention_heads": 0}, "num_attention_heads=0 must be a positive integer"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps='tiny' must be a positive number"),
        ({"rope_theta": "big"}, "rope_theta must be a number"),
    ],
)
def test_malformed_values_are_config_errors_naming_the_key(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(raw_config(**overrides))


def test_a_config_that_is_not_an_object_is_rejected() -> None:
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelConfig.from_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arch", "qkv", "o"),
    [
        ("LlamaForCausalLM", True, True),
        ("Qwen3ForCausalLM", True, True),
        ("Qwen2ForCausalLM", True, False),
        ("MistralForCausalLM", False, False),
    ],
)
def test_attention_bias_follows_each_family_as_transformers_does(
    arch: str, qkv: bool, o: bool
) -> None:
    cfg = ModelConfig.from_dict(raw_config(architectures=[arch], attention_bias=True))
    assert (cfg.qkv_bias, cfg.o_bias) == (qkv, o)


def test_a_checkpoint_without_config_json_uses_its_manifest_config(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from checkpoint_format import convert_hf

    ckpt = tmp_path / "ckpt"
    convert_hf(tiny_model_dir, ckpt)
    (ckpt / "config.json").unlink()
    assert ModelConfig.from_dir(ckpt) == ModelConfig.from_dir(tiny_model_dir)
