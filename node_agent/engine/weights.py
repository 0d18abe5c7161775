"""Build a model on `meta` and bind already-loaded tensors to it: no random init, no 2nd copy."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint_format import is_checkpoint
from loader import load_state_dict
from loader.arena import ArenaMap
from node_agent.engine.model import CausalLM
from node_agent.engine.rotary import RotaryTable
from node_agent.facts.errors import WeightsError
from node_agent.facts.model_config import ModelConfig

log = logging.getLogger(__name__)

# Keys some checkpoints carry that are derived state, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    dtype: torch.dtype
    device: torch.device
    load_ms: float


def compute_dtype(state_dict: Mapping[str, torch.Tensor], device: torch.device) -> torch.dtype:
    """float32 on CPU (no native bf16 matmul on AVX2: 20-80x slower); on CUDA, the dtype the
    weights are stored in (the tensors are the truth: a converted checkpoint keeps the original
    config.json, whose declared dtype may be stale)."""
    if device.type == "cpu":
        return torch.float32
    floats = [t.dtype for t in state_dict.values() if t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32


def bind_weights(
    cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor], device: torch.device
) -> CausalLM:
    """Construct the model on `meta` and assign the given tensors as its parameters."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    dtype = compute_dtype(state_dict, device)
    expected = {name: p.shape for name, p in model.named_parameters()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    given = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        given.pop("lm_head.weight", None)
    _check_names_and_shapes(expected, given)
    converted = [name for name, t in given.items() if t.dtype != dtype or t.device != device]
    if converted:
        log.warning(
            "converting %d tensors to %s on %s at load (once); convert the checkpoint to "
            "%s ahead of time to skip this",
            len(converted),
            dtype,
            device,
            dtype,
        )
    bound = {name: t.to(device=device, dtype=dtype) for name, t in given.items()}
    model.load_state_dict(bound, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False)
    model.eval()
    model.rotary = RotaryTable(cfg.rope, cfg.head_dim, dtype, device)
    return model


def _check_names_and_shapes(
    expected: Mapping[str, torch.Size], given: Mapping[str, torch.Tensor]
) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            "checkpoint does not match config.json: "
            f"missing {_few(missing)}; unexpected {_few(unexpected)}"
        )
    for name, shape in expected.items():
        if tuple(given[name].shape) != tuple(shape):
            raise WeightsError(
                f"tensor {name} has shape {tuple(given[name].shape)} but config.json implies "
                f"{tuple(shape)}: the weights belong to a different model"
            )


def _few(names: list[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:5])
    return f"{shown} (+{len(names) - 5} more)" if len(names) > 5 else shown


def read_hf_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Read a Hugging Face directory's safetensors (single file or sharded with an index)."""
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise WeightsError(
            f"no weights in {model_dir}: expected model.safetensors or "
            "model.safetensors.index.json (a stoke checkpoint or a Hugging Face directory)"
        )
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        # A plain file name: an index cannot point elsewhere. The file itself may be a symlink
        # (the Hugging Face hub cache links snapshot files to its blob store).
        if not shard or Path(shard).name != shard or shard.startswith("."):
            raise WeightsError(
                f"{index}: shard {shard!r} is not a plain file name in {model_dir}; "
                "a Hugging Face index names files in the model directory itself"
            )
        state.update(load_file(str(model_dir / shard)))
    return state


def read_state_dict(
    model_dir: Path, device: torch.device, arena: ArenaMap | None = None
) -> dict[str, torch.Tensor]:
    """Tensors from a stoke checkpoint (through the fast loader) or a Hugging Face directory.
    `arena`: this process's mapping of the DRAM arena (a checkpoint placed there binds in it)."""
    if is_checkpoint(model_dir):
        return load_state_dict(model_dir, device=device, arena=arena)
    return read_hf_safetensors(model_dir)


def from_pretrained(
    model_dir: str | Path, device: str | torch.device = "cpu", arena: ArenaMap | None = None
) -> LoadedModel:
    """Load a model directory (stoke checkpoint or Hugging Face layout) ready for inference;
    `arena` as for `read_state_dict`."""
    start = time.perf_counter()
    path = Path(model_dir)
    dev = torch.device(device)
    cfg = ModelConfig.from_dir(path)
    state_dict = read_state_dict(path, dev, arena)
    model = bind_weights(cfg, state_dict, dev)
    load_ms = (time.perf_counter() - start) * 1000
    dtype = model.model.embed_tokens.weight.dtype  # chosen once, in bind_weights
    return LoadedModel(model, cfg, dtype, dev, load_ms)
