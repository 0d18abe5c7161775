"""Rotary position embeddings, computed exactly as transformers does (float32 inv_freq)."""

from __future__ import annotations

import math

import torch

from node_agent.facts.model_config import RopeConfig


def inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequency per rotary pair, scaled as configured. Shape: [head_dim // 2]."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":
        return freq / rope.factor
    if rope.kind == "llama3":
        return _llama3(freq, rope)
    return freq


def _llama3(freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, the band between
    # interpolated (transformers' `_compute_llama3_parameters`).
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_wavelen, freq / rope.factor, freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryTable:
    """cos/sin tables indexed by position, grown on demand (long contexts cost nothing upfront)."""

    def __init__(self, rope: RopeConfig, head_dim: int, dtype: torch.dtype, device: torch.device):
        self._inv_freq = inv_freq(rope, head_dim).to(device)
        self._dtype = dtype
        self._cos = torch.empty(0, head_dim, dtype=dtype, device=device)
        self._sin = torch.empty(0, head_dim, dtype=dtype, device=device)

    def lookup(
        self, positions: torch.Tensor, max_position: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `positions` ([N]) -> two [N, 1, head_dim] tensors."""
        if max_position >= self._cos.shape[0]:
            self._grow(max(max_position + 1, 2 * self._cos.shape[0], 256))
        return self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)

    def _grow(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float32, device=self._inv_freq.device)
        freqs = torch.outer(positions, self._inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = emb.cos().to(self._dtype)
        self._sin = emb.sin().to(self._dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x ([N, heads, head_dim]) by the per-token angles in cos/sin ([N, 1, head_dim])."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
