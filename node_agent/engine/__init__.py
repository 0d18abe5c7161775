"""The inference engine a node agent runs: a Llama-family decoder with continuous batching.

Typical use::

    engine = load_engine("path/to/model")           # stoke checkpoint or HF directory
    seq = engine.validate(Request("r1", tuple(ids), SamplingParams(max_tokens=32)))
    engine.add(seq)
    while engine.has_work():
        for event in engine.step(): ...

or, from asyncio, `AsyncEngine(engine).generate(request)`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loader.arena import ArenaMap
    from node_agent.engine.engine import EngineConfig, LLMEngine
    from node_agent.engine.sampling import SamplingParams
    from node_agent.engine.sequence import FinishReason, Request, TokenEvent

# Exported names and their modules, imported on first use: importing a light submodule (such
# as `node_agent.engine.defaults`) must not pay for importing torch.
_EXPORTS = {
    "EngineConfig": "node_agent.engine.engine",
    "LLMEngine": "node_agent.engine.engine",
    "SamplingParams": "node_agent.engine.sampling",
    "FinishReason": "node_agent.engine.sequence",
    "Request": "node_agent.engine.sequence",
    "TokenEvent": "node_agent.engine.sequence",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_engine(
    model_dir: str | Path,
    device: str = "cpu",
    config: EngineConfig | None = None,
    arena: ArenaMap | None = None,
) -> LLMEngine:
    """Load weights and tokenizer from `model_dir` and return a ready engine. `arena`: this
    process's mapping of the node's DRAM arena (a checkpoint placed there binds in it)."""
    from node_agent.engine.engine import EngineConfig, LLMEngine
    from node_agent.engine.weights import from_pretrained
    from node_agent.facts.tokenizer import Tokenizer

    loaded = from_pretrained(model_dir, device, arena)
    return LLMEngine(loaded, Tokenizer.from_dir(model_dir), config or EngineConfig())


__all__ = [
    "EngineConfig",
    "FinishReason",
    "LLMEngine",
    "Request",
    "SamplingParams",
    "TokenEvent",
    "load_engine",
]
