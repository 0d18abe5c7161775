"""A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) in plain torch.

The forward pass runs over a *flat batch*: the new tokens of every scheduled sequence are
concatenated into one [N] vector, so every linear layer is one matmul for the whole batch, while
attention runs per segment against that sequence's own KV cache. Prefill chunks and single decode
tokens mix freely in one step (continuous batching).

Module and parameter names mirror Hugging Face's, so a checkpoint's state dict binds directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from node_agent.engine.batch import DecodeGroup, FlatBatch, Segment
from node_agent.engine.kv_cache import KVPool
from node_agent.engine.rotary import RotaryTable, apply_rotary
from node_agent.facts.model_config import ModelConfig


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
        if x.dtype == torch.float32:  # one fused kernel instead of six (the same math)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
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
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: FlatBatch, kv: KVPool
    ) -> torch.Tensor:
        # x: [N, hidden]
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.heads, self.head_dim)
        k = self.k_proj(x).view(n, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        kv.write(self.layer, batch.write_index, k, v)
        out = torch.empty_like(q)
        if batch.decode is not None:
            out[: batch.decode.rows] = self._attend_decode(q[: batch.decode.rows], kv, batch.decode)
        for seg in batch.prefill:
            rows = slice(seg.offset, seg.offset + seg.length)
            keys, values = kv.slot_kv(self.layer, seg.slot, seg.end)
            out[rows] = self._attend(q[rows], keys, values, seg)
        return self.o_proj(out.view(n, self.heads * self.head_dim))

    def _attend_decode(self, q: torch.Tensor, kv: KVPool, group: DecodeGroup) -> torch.Tensor:
        # q: [rows, H, D] -> one query row per slot of the group's range: [slots, Hkv, group, D]
        slots = q.new_zeros(group.num_slots, self.heads, self.head_dim)
        slots.index_copy_(0, group.row_slots, q)
        qs = slots.view(group.num_slots, self.kv_heads, self.heads // self.kv_heads, -1)
        keys, values = kv.range_kv(self.layer, group.first_slot, group.num_slots, group.end)
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=group.mask)
        return o.reshape(group.num_slots, self.heads, self.head_dim)[group.row_slots]

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
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: FlatBatch, kv: KVPool
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, kv)
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
        self, batch: FlatBatch, kv: KVPool, logits_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run one step's flat batch; return logits for `logits_rows` (None: every row).

        Usually `logits_rows` holds each sampling segment's last row: [rows, vocab] float32.
        """
        assert self.rotary is not None, "weights are not bound"
        cos, sin = self.rotary.lookup(batch.positions, batch.max_position)
        x = self.model.embed_tokens(batch.tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin, batch, kv)
        if logits_rows is not None:
            x = x[logits_rows]
        return self.lm_head(self.model.norm(x)).float()
