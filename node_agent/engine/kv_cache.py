"""The KV cache: one pool of fixed-capacity slots, one slot per running sequence.

The pool is allocated once when the engine starts, so KV memory is bounded by construction
(`slots * capacity * bytes_per_token`) and a request never OOMs the process: one that finds no
free slot waits. Layout [layers, 2, slots, capacity, kv_heads, head_dim] makes a whole step's
writes one `index_copy_` per layer and lets every decoding sequence attend in one batched call
over zero-copy views of a slot range.

Invariant: every position no live sequence has written is zero. Batched decode attention reads
masked positions of other slots, and a masked NaN still poisons a softmax (NaN + -inf = NaN,
0 * NaN = NaN), so garbage must never be there: the pool starts zeroed and a slot's positions are
zeroed again when its sequence leaves.
"""

from __future__ import annotations

import heapq
import mmap

import torch

from node_agent.facts import sizing
from node_agent.facts.errors import ConfigError
from node_agent.facts.model_config import ModelConfig


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token across all layers (`facts.sizing`, at `dtype`'s size)."""
    return sizing.kv_bytes_per_token(cfg, torch.empty((), dtype=dtype).element_size())


def pool_slots(budget_bytes: int, capacity: int, bytes_per_token: int, max_slots: int) -> int:
    """How many slots of `capacity` tokens fit the budget (at most `max_slots`)."""
    slots = min(max_slots, budget_bytes // (capacity * bytes_per_token))
    if slots < 1:
        need = capacity * bytes_per_token
        raise ConfigError(
            f"a KV cache of {budget_bytes} bytes cannot hold one sequence of {capacity} tokens "
            f"({need} bytes): raise kv_cache_bytes or lower max_model_len"
        )
    return slots


class KVPool:
    """Keys and values of every slot: [layers, 2, slots, capacity, kv_heads, head_dim]."""

    def __init__(
        self,
        cfg: ModelConfig,
        slots: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (
            cfg.num_hidden_layers,
            2,
            slots,
            capacity,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.data = _zeroed(shape, dtype, device)
        self.slots = slots
        self.capacity = capacity

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def write(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ([N, kv_heads, head_dim]) at flat `index` = slot * capacity + position."""
        flat = self.data[layer].flatten(1, 2)  # [2, slots * capacity, kv_heads, head_dim]
        flat[0].index_copy_(0, index, k)
        flat[1].index_copy_(0, index, v)

    def clear(self, slot: int, end: int) -> None:
        """Zero positions [0, end) of `slot` (its sequence is leaving; see the invariant)."""
        self.data[:, :, slot, :end].zero_()

    def copy(self, source: int, dest: int, end: int) -> None:
        """Positions [0, end) of slot `source` into slot `dest` (a shared prompt)."""
        self.data[:, :, dest, :end] = self.data[:, :, source, :end]

    def slot_kv(self, layer: int, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's keys and values for positions [0, end): two [kv_heads, end, D] views."""
        kv = self.data[layer, :, slot, :end].transpose(1, 2)
        return kv[0], kv[1]

    def range_kv(
        self, layer: int, first: int, count: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [first, first + count), positions [0, end): two [count, kv_heads, end, D] views."""
        kv = self.data[layer, :, first : first + count, :end].transpose(2, 3)
        return kv[0], kv[1]


def _zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On the CPU it is backed by anonymous memory, which the kernel zero-fills
    on first touch: pages of slots and positions never used are never resident."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for dim in shape:
        count *= dim
    buffer = mmap.mmap(-1, max(count * itemsize, 1))
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


class SlotAllocator:
    """Hands out the lowest free slot, so running sequences stay packed at the pool's start."""

    def __init__(self, slots: int):
        self._free = list(range(slots))
        self.total = slots

    @property
    def used(self) -> int:
        return self.total - len(self._free)

    def can_allocate(self) -> bool:
        return bool(self._free)

    def allocate(self) -> int:
        assert self._free, "allocate() without can_allocate()"
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        assert slot not in self._free, f"slot {slot} freed twice"
        heapq.heappush(self._free, slot)
