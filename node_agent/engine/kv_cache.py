"""Per-sequence KV cache storage and the byte budget that bounds all of them.

A sequence reserves room for every token it may ever hold (prompt + max_tokens) when it is
admitted, so a running batch can never run out of cache mid-generation: a request that does not
fit waits instead of OOM-ing the process. Storage is one contiguous tensor per sequence, so
attention reads keys as a plain strided view, with no gather.
"""

from __future__ import annotations

import torch

from node_agent.engine.config import ModelConfig


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token across all layers."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize


class SequenceKV:
    """Keys and values of one sequence: [layers, 2, kv_heads, capacity, head_dim]."""

    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.data = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ([len, kv_heads, head_dim]) at positions [start, start + len)."""
        end = start + k.shape[0]
        assert end <= self.capacity, f"KV write past capacity: {end} > {self.capacity}"
        self.data[layer, 0, :, start:end] = k.transpose(0, 1)
        self.data[layer, 1, :, start:end] = v.transpose(0, 1)

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values for positions [0, end): two [kv_heads, end, head_dim] views."""
        return self.data[layer, 0, :, :end], self.data[layer, 1, :, :end]


class KVBudget:
    """Accounts KV bytes reserved by admitted sequences against a fixed budget."""

    def __init__(self, budget_bytes: int, bytes_per_token: int):
        self.budget_bytes = budget_bytes
        self.bytes_per_token = bytes_per_token
        self.used_bytes = 0

    @property
    def max_tokens(self) -> int:
        """The most tokens the whole budget can hold (one sequence alone)."""
        return self.budget_bytes // self.bytes_per_token

    def can_allocate(self, tokens: int) -> bool:
        return self.used_bytes + tokens * self.bytes_per_token <= self.budget_bytes

    def allocate(self, tokens: int) -> None:
        assert self.can_allocate(tokens), "allocate() without can_allocate()"
        self.used_bytes += tokens * self.bytes_per_token

    def free(self, tokens: int) -> None:
        self.used_bytes -= tokens * self.bytes_per_token
        assert self.used_bytes >= 0, "KV budget freed more than it allocated"
