"""A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) in plain torch.

The forward pass runs over a *flat batch*: the new tokens of every scheduled sequence are
concatenated into one [N] vector, so every linear layer is one matmul for the whole batch, while
attention runs per segment against that sequence's own KV cache. Prefill chunks and single decode
tokens mix freely in one step (continuous batching).

Module and parameter names mirror Hugging Face's, so a checkpoint's state dict binds directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from node_agent.engine.config import ModelConfig
from node_agent.engine.kv_cache import SequenceKV
from node_agent.engine.rotary import RotaryTable, apply_rotary


@dataclass(frozen=True)
class Segment:
    """One sequence's run of tokens inside a flat batch.

    Tokens [offset, offset + length) of the batch sit at positions [start, start + length) of the
    sequence; their keys/values are written to `kv` and attention reads positions [0, end).
    """

    kv: SequenceKV
    offset: int
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


class Linear(nn.Module):
    """`nn.Linear` without its random init: weights are always bound from a checkpoint (and
    initialising on `meta` still costs seconds, importing torch._dynamo)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """`nn.Embedding` without its random init (see `Linear`)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale after casting back, exactly as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.window = cfg.sliding_window
        hidden = cfg.hidden_size
        self.q_proj = Linear(hidden, self.heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(hidden, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(hidden, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.heads * self.head_dim, hidden, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[Segment]
    ) -> torch.Tensor:
        # x: [N, hidden]
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.heads, self.head_dim)
        k = self.k_proj(x).view(n, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = torch.empty_like(q)
        for seg in segments:
            rows = slice(seg.offset, seg.offset + seg.length)
            seg.kv.write(self.layer, seg.start, k[rows], v[rows])
            keys, values = seg.kv.read(self.layer, seg.end)
            out[rows] = self._attend(q[rows], keys, values, seg)
        return self.o_proj(out.view(n, self.heads * self.head_dim))

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seg: Segment
    ) -> torch.Tensor:
        # q: [len, H, D]; keys/values: [Hkv, T, D]. Query heads sharing a KV head are folded
        # into the row dimension, so GQA needs no repeated keys: [Hkv, group * len, D].
        length, group = q.shape[0], self.heads // self.kv_heads
        qh = q.view(length, self.kv_heads, group, self.head_dim).permute(1, 2, 0, 3)
        qh = qh.reshape(self.kv_heads, group * length, self.head_dim)
        mask = self._mask(seg, keys.shape[1], keys.device)
        if mask is not None:
            mask = mask.repeat(group, 1)
        o = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask)
        o = o.view(self.kv_heads, group, length, self.head_dim).permute(2, 0, 1, 3)
        return o.reshape(length, self.heads, self.head_dim)

    def _mask(self, seg: Segment, total: int, device: torch.device) -> torch.Tensor | None:
        """Boolean [len, T] mask (True = attend): causal, plus the sliding window if any."""
        window = self.window if self.window is not None and total > self.window else None
        if seg.length == 1 and window is None:
            return None
        q_pos = torch.arange(seg.start, seg.end, device=device).unsqueeze(1)
        k_pos = torch.arange(total, device=device).unsqueeze(0)
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        return mask


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden, inter, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(hidden, inter, bias=bias)
        self.up_proj = Linear(hidden, inter, bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[Segment]
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segments)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The whole model. Build it on `meta` and bind weights with `weights.bind_weights`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary: RotaryTable | None = None  # set by bind_weights, on the weights' device

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        segments: list[Segment],
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the new tokens ([N]) at `positions` ([N]); return logits for `logits_rows`.

        `logits_rows` selects which rows need logits (usually each segment's last token); None
        returns logits for every row: [len(logits_rows) or N, vocab].
        """
        assert self.rotary is not None, "weights are not bound"
        max_position = max(seg.end for seg in segments) - 1
        cos, sin = self.rotary.lookup(positions, max_position)
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin, segments)
        if logits_rows is not None:
            x = x[logits_rows]
        return self.lm_head(self.model.norm(x)).float()
