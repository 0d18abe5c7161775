"""The engine's numerics against Hugging Face transformers on the same weights (float32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from node_agent.engine.batch import Segment, build_batch
from node_agent.engine.kv_cache import KVPool
from node_agent.engine.weights import LoadedModel, from_pretrained

BASE: dict[str, Any] = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

CASES: dict[str, tuple[type, dict[str, Any]]] = {
    "llama-gqa-untied": (transformers.LlamaConfig, {}),
    "llama-odd-heads-tied-mha": (
        transformers.LlamaConfig,
        dict(
            hidden_size=48, num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=True
        ),
    ),
    "llama3-rope-scaling-bias": (
        transformers.LlamaConfig,
        dict(
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "mistral-mqa-sliding-window": (
        transformers.MistralConfig,
        dict(num_key_value_heads=1, sliding_window=7, head_dim=16),
    ),
    "qwen2-qkv-bias-tied": (
        transformers.Qwen2Config,
        dict(
            hidden_size=96, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True
        ),
    ),
    "qwen3-qk-norm-head-dim": (
        transformers.Qwen3Config,
        dict(head_dim=24, num_attention_heads=6, num_key_value_heads=3),
    ),
}


def make_hf_model(tmp_path: Path, case: str) -> transformers.PreTrainedModel:
    config_cls, overrides = CASES[case]
    config = config_cls(**{**BASE, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.15)  # random norms and biases too, so every weight matters
    model.eval()
    model.save_pretrained(tmp_path)
    return model


def run(
    loaded: LoadedModel, kv: KVPool, ids: list[int], start: int, rows: list[int] | None
) -> torch.Tensor:
    """Run `ids` at positions [start, start + len) of slot 0; logits for `rows` (None: all)."""
    segment = Segment(slot=0, offset=0, start=start, length=len(ids))
    window = loaded.config.sliding_window
    batch = build_batch([segment], ids, kv.capacity, window, loaded.device)
    with torch.inference_mode():
        return loaded.model(batch, kv, None if rows is None else torch.tensor(rows))


def full_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    kv = KVPool(loaded.config, 1, len(ids), loaded.dtype, loaded.device)
    return run(loaded, kv, ids, 0, None)


def greedy(loaded: LoadedModel, ids: list[int], steps: int) -> list[int]:
    """Prefill, then decode one token at a time through the KV cache."""
    kv = KVPool(loaded.config, 1, len(ids) + steps, loaded.dtype, loaded.device)
    tokens, out = list(ids), []
    start = 0
    for _ in range(steps):
        new = tokens[start:]
        logits = run(loaded, kv, new, start, [len(new) - 1])
        out.append(int(logits[0].argmax()))
        tokens.append(out[-1])
        start = len(tokens) - 1
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path: Path, case: str) -> None:
    hf = make_hf_model(tmp_path, case)
    ids = torch.randint(0, BASE["vocab_size"], (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids.unsqueeze(0)).logits[0]
    ours = full_logits(from_pretrained(tmp_path), ids.tolist())
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_match_transformers(tmp_path: Path, case: str) -> None:
    hf = make_hf_model(tmp_path, case)
    prompt = [5, 17, 42, 99, 3, 150, 7]
    with torch.no_grad():
        generated = hf.generate(  # type: ignore[operator]
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=40,
            min_new_tokens=40,
            eos_token_id=None,
            pad_token_id=0,
        )
    expected = generated[0, len(prompt) :].tolist()
    assert greedy(from_pretrained(tmp_path), prompt, 40) == expected
