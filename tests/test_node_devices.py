"""GPU discovery parses `nvidia-smi` output and degrades to "no GPUs" on a CPU node."""

from __future__ import annotations

import shutil

import pytest

from node_agent.devices import DeviceProbeError, parse_nvidia_smi, probe_gpus

SAMPLE = "0, NVIDIA H100 80GB HBM3, 81559, 81002\n1, NVIDIA H100 80GB HBM3, 81559, 1024\n"


def test_parses_each_gpu_in_bytes() -> None:
    first, second = parse_nvidia_smi(SAMPLE)
    assert (first.index, first.name) == (0, "NVIDIA H100 80GB HBM3")
    assert first.total_bytes == 81559 << 20 and second.free_bytes == 1024 << 20


@pytest.mark.parametrize("bad", ["0, H100, 80", "0, H100, lots, 1"])
def test_malformed_output_is_an_error(bad: str) -> None:
    with pytest.raises(DeviceProbeError, match="nvidia-smi line"):
        parse_nvidia_smi(bad)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this node has nvidia-smi")
def test_cpu_node_reports_no_gpus() -> None:
    assert probe_gpus() == []
