"""What an instance costs in memory, without torch: the one KV formula the engine sizes its pool
with (`kv_cache.pool_slots`) and that the controller checks a deploy against and the node agent
checks a load against, before a worker is spent on it; and the defaults both sides assume."""

from __future__ import annotations

from node_agent.facts.model_config import ModelConfig

DEFAULT_MAX_MODEL_LEN = 4096
"""The engine's cap on a sequence's length when `max_model_len` is not set."""
DEFAULT_KV_CACHE_BYTES = 256 << 20
"""KV cache per instance when the function spec does not set `engine.kv_cache`."""
WORKER_OVERHEAD_BYTES = 320 << 20
"""Host memory a worker process holds besides its model and KV cache: the interpreter with
torch and the engine imported (measured: 240 MiB resident idle, 265 MiB at peak serving the
tiny demo model) plus headroom for what a bigger model's steps add (activations, allocator
arenas). The node charges it to its budget once per instance, so N instances never add up to
more than --cpu-memory; the controller counts it in an instance's inferred memory."""
CPU_COMPUTE_ITEMSIZE = 4
"""The engine computes, and keeps its KV cache, in float32 on the CPU
(`engine.weights.compute_dtype`); on a GPU, in the checkpoint's dtype."""


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    """Bytes of K and V for one token across all layers, at `itemsize` bytes per element."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize


def model_len(cfg: ModelConfig, max_model_len: int | None) -> int:
    """The sequence length the engine sizes its KV slots for (0 or None: the default)."""
    return max_model_len or min(cfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)


def sequence_kv_bytes(cfg: ModelConfig, itemsize: int, max_model_len: int | None) -> int:
    """Bytes one sequence of `max_model_len` tokens needs: the smallest KV cache that works."""
    return model_len(cfg, max_model_len) * kv_bytes_per_token(cfg, itemsize)
