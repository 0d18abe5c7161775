"""What the simulated cluster is made of: model sizes and their speeds, GPU-node bandwidths, and
the knobs of one run. Frozen dataclasses; the CLI's defaults are read from them.

The figures are for a GPU node of the class the AWS spot traces were taken on (p3.2xlarge: one
V100 16 GB, NVMe, 10 Gbit/s): loading bandwidths as ServerlessLLM (OSDI'24) measures its loader
(DRAM -> GPU over PCIe with pinned memory ~20 GB/s; NVMe RAID ~6 GB/s; a 10 Gbit/s download
~1.2 GB/s), prefill and decode rates of fp16 OPT-class models on one such GPU. Give your own
with `--bandwidth` (e.g. what `stoke bench load` / `stoke bench fetch` measured) and `--models`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from node_agent.facts.tiers import Origin


@dataclass(frozen=True, slots=True)
class ModelSize:
    name: str
    checkpoint_bytes: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    """Per request, with up to target_concurrency requests batched on the instance."""

    @property
    def memory_bytes(self) -> int:
        """What one instance reserves: the weights and a quarter more for the KV cache."""
        return int(self.checkpoint_bytes * 1.25)


MODELS: Mapping[str, ModelSize] = {
    m.name: m
    for m in (
        ModelSize("1.3b", 2_600_000_000, 12_000.0, 80.0),
        ModelSize("2.7b", 5_400_000_000, 7_000.0, 60.0),
        ModelSize("6.7b", 13_400_000_000, 3_500.0, 35.0),
        ModelSize("13b", 26_000_000_000, 1_800.0, 22.0),
    )
}

GPU_NODE_BANDWIDTH: Mapping[str, float] = {
    Origin.DRAM: 20e9,
    Origin.DISK: 6e9,
    Origin.REMOTE: 1.2e9,
}


@dataclass(frozen=True, slots=True)
class NodeShape:
    """A simulated node's checkpoint tiers (the pool's `offers` give its slots and memory)."""

    dram_bytes: int = 48_000_000_000
    disk_bytes: int = 400_000_000_000
    bandwidth: Mapping[str, float] = field(default_factory=lambda: dict(GPU_NODE_BANDWIDTH))


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """One simulated function: the controller's keys that matter to the policies."""

    name: str
    model: ModelSize
    target_concurrency: int = 8
    min_instances: int = 0
    max_instances: int = 8
    keep_alive_s: float = 300.0
    adaptive: bool = False
    slo_ttft_s: float = 5.0


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The knobs of one simulation run besides the policy file and the traces."""

    functions: int = 16
    """Functions the requests are spread over, Zipf-popular (the first the most)."""
    zipf_s: float = 1.0
    """Zipf exponent of the functions' popularity (ServerlessLLM's workloads use ~1)."""
    models: tuple[str, ...] = ("1.3b", "2.7b", "6.7b")
    """Function i runs models[i % len(models)]."""
    hours: float = 1.0
    """Measured hours: the request trace is repeated back to back until they are filled."""
    warmup_s: float = 600.0
    """Simulated before the measured hours (the cluster starts empty: its first launches and
    cold starts would otherwise be charged to the policy); nothing in it is counted."""
    placement: str = "locality"
    keep_alive: str = "5m"
    """A duration, or `adaptive` (its fallback is 5 minutes, as the controller's default)."""
    slo_ttft_s: float = 5.0
    target_concurrency: int = 8
    max_instances: int = 8
    tick_s: float = 5.0
    """How often keep-alive and the node autoscaler decide (the controller's interval)."""
    boot_s: float = 90.0
    """From a node's launch to its registering (a GPU VM's boot and `stoke node` start)."""
    notice_s: float = 120.0
    """Spot preemption notice (AWS: two minutes)."""
    start_overhead_s: float = 0.5
    """An instance's start beyond moving its bytes (process, CUDA context)."""
    first_token_overhead_s: float = 0.0
    """Per request, before its prefill: routing, HTTP and tokenizing (0 on the GPU fleet, where
    it is small beside the prefill; `stoke simulate-check` measures it on the local cluster)."""
    spot_start_s: float = 0.0
    """Where in the spot traces the run starts (seconds)."""
    spot_scale: float | None = None
    """Nodes of capacity per node a spot trace counts; None: the trace's peak is the pool's
    max_nodes (`stoke.simulate.spot_market`)."""
    node: NodeShape = field(default_factory=NodeShape)
    seed: int = 0
