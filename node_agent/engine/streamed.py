"""An engine that serves while its checkpoint is still being copied into memory.

On a cold start from disk, the node agent copies the checkpoint into its DRAM tier (tmpfs) and
this engine is built over the staging files as soon as they exist: they are mapped (nothing
read), every tensor is bound as a view, the tokenizer and KV cache are made. The agent then
reports which byte ranges have landed (`land`), which this makes present in the mapping
(`MADV_POPULATE_READ`, off the compute thread) before marking them landed. A forward pass
waits at each module (embeddings, each decoder layer, final norm, LM head) until that module's
weights have landed, so the first request's prefill runs through the layers while later layers
are still being copied: TTFT approaches the copy time instead of copy + forward.

Only where nothing has to be converted (every tensor stored in the CPU compute dtype, float32):
the agent loads other checkpoints once their copy is complete.

With a DRAM arena (`loader.arena`) the staging directory holds the extents' record instead of
partition files, and the bytes land in the arena. A worker that mapped the arena when it
started (`arena`) binds tensors at their offsets in that mapping, whose pages are all present
already: `land` then only marks ranges landed.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from checkpoint_format import Manifest
from loader.api import bind_views
from loader.arena import ArenaMap, read_placement
from loader.cpu import arena_partitions
from loader.sysio import PAGE, READ_FLAGS, map_file, populate
from node_agent.engine.engine import EngineConfig, LLMEngine
from node_agent.engine.model import CausalLM
from node_agent.engine.weights import LoadedModel, bind_weights, compute_dtype
from node_agent.facts.errors import WeightsError
from node_agent.facts.model_config import ModelConfig
from node_agent.facts.tokenizer import Tokenizer
from node_agent.landing import CopyFailedError, Landed, open_either

log = logging.getLogger(__name__)

Span = tuple[int, int, int]  # (partition, start, end)


class StreamedLoad:
    """Build an engine over `model_dir`'s partition files before their bytes have all landed.

    Call `land` as ranges are written, `finish` once all are (the gates come off), or `fail`
    (waiting forward passes raise `WeightsError`)."""

    def __init__(
        self,
        dirs: tuple[str | Path, str | Path],
        manifest: Manifest,
        config: EngineConfig | None = None,
        arena: ArenaMap | None = None,
    ) -> None:
        """`dirs`: the directory being written and the one it is renamed to when whole (the
        rename may come at any moment: each file is opened from whichever holds it);
        `manifest`: the checkpoint's (written last, so not in the directory yet); `arena`:
        this process's mapping of the DRAM arena, if it made one."""
        start = time.perf_counter()
        with open_either(Path(dirs[0]), Path(dirs[1])) as where:
            st = os.stat(where)
            self.directory = (st.st_dev, st.st_ino)  # which directory this really read
            self._build(where, manifest, config, arena)
        self.load_ms = (time.perf_counter() - start) * 1000

    def _build(
        self, path: Path, manifest: Manifest, config: EngineConfig | None, arena: ArenaMap | None
    ) -> None:
        self.landed = Landed([p.nbytes for p in manifest.partitions])
        self._maps: dict[int, mmap.mmap] = {}
        buffers = self._buffers(path, manifest, arena)
        tensors = bind_views(manifest, buffers)
        tensors.update({a: tensors[t] for a, t in manifest.aliases.items() if t in tensors})
        dev = torch.device("cpu")
        cfg = ModelConfig.from_dir(path)
        self._hooks: list[RemovableHandle] = []
        if any(t.dtype != compute_dtype(tensors, dev) for t in tensors.values()):
            raise WeightsError(
                "this checkpoint's tensors are converted at load (not stored in float32), so "
                "they cannot be used as they land; load it once its copy is complete"
            )
        model = bind_weights(cfg, tensors, dev)
        self._gate(model, buffers)
        loaded = LoadedModel(model, cfg, model.model.embed_tokens.weight.dtype, dev, 0.0)
        tokenizer = Tokenizer.from_dir(path)
        self.engine = LLMEngine(loaded, tokenizer, config or EngineConfig())

    def _buffers(
        self, path: Path, manifest: Manifest, arena: ArenaMap | None
    ) -> dict[int, torch.Tensor]:
        """One uint8 tensor per partition over the memory its bytes land in: extents of the
        DRAM arena (every page present already: `land` populates nothing), or mappings of the
        staging files (`land` populates each range as it lands)."""
        placement = read_placement(path)
        if placement is not None:
            placement.check(manifest, str(path))
            return arena_partitions(placement, list(range(len(manifest.partitions))), arena)
        buffers: dict[int, torch.Tensor] = {}
        for index, part in enumerate(manifest.partitions):
            if part.nbytes == 0:
                buffers[index] = torch.empty(0, dtype=torch.uint8)
                continue
            fd = os.open(path / part.file, READ_FLAGS)
            try:
                self._maps[index] = map_file(fd, part.nbytes)
            finally:
                os.close(fd)
            buffers[index] = torch.frombuffer(self._maps[index], dtype=torch.uint8)
        return buffers

    def _gate(self, model: CausalLM, buffers: dict[int, torch.Tensor]) -> None:
        """A forward pre-hook on every module that holds weights directly or through its
        children, in execution order, waiting for its weights' byte ranges."""
        modules: list[nn.Module] = [
            model.model.embed_tokens,
            *model.model.layers,
            model.model.norm,
            model.lm_head,
        ]
        for module in modules:
            spans = _spans(module.parameters(), buffers)
            self._hooks.append(module.register_forward_pre_hook(self._waiter(spans)))

    def _waiter(self, spans: list[Span]) -> Callable[[nn.Module, object], None]:
        landed = self.landed

        def wait(module: nn.Module, args: object) -> None:
            try:
                for part, start, end in spans:
                    landed.wait(part, start, end)
            except CopyFailedError as exc:
                raise WeightsError(f"the checkpoint's copy into memory failed: {exc}") from None

        return wait

    def land(self, ranges: Iterable[Span]) -> None:
        """Bytes `[start, end)` of each partition are written: map them in, then let waiting
        passes through. Blocks while populating (call it off the event loop)."""
        for part, start, end in ranges:
            buf = self._maps.get(part)
            if buf is not None and end > start:
                first = start // PAGE * PAGE
                populate(buf, first, min(len(buf), -(-end // PAGE) * PAGE) - first)
            self.landed.add(part, start, end)

    def finish(self) -> None:
        """Every byte has landed: take the gates off (forward passes no longer check)."""
        if not self.landed.complete:
            sizes = enumerate(self.landed.sizes)
            missing = [i for i, n in sizes if not self.landed.covers(i, 0, n)]
            raise WeightsError(f"told the copy is complete, but partitions {missing} are not")
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def fail(self, reason: str) -> None:
        """The copy failed: passes waiting for weights (now or later) raise `WeightsError`."""
        self.landed.fail(reason)


def _spans(params: Iterable[torch.Tensor], buffers: dict[int, torch.Tensor]) -> list[Span]:
    """The byte ranges `(partition, start, end)` of the buffers that `params` view."""
    spans = []
    for param in params:
        address, nbytes = param.data_ptr(), param.numel() * param.element_size()
        for part, buf in buffers.items():
            base = buf.data_ptr()
            if base <= address and address + nbytes <= base + buf.numel():
                spans.append((part, address - base, address - base + nbytes))
                break
    return spans
