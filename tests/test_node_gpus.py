"""GPU accounting with fake GPU lists: placement, budgets and refusals, no GPU needed."""

from __future__ import annotations

from typing import Any

import pytest

from node_agent.instances import GpuLedger, NoRoomError
from node_agent.instances.gpus import GPU_SAFETY_MARGIN_BYTES, choose_gpu, gpu_budget
from node_agent.proto import node_agent_pb2 as pb

GIB = 1 << 30


def gpu(index: int, **overrides: Any) -> pb.GpuDevice:
    fields: dict[str, Any] = {"name": "fake", "total_bytes": 16 * GIB, "free_bytes": 16 * GIB}
    return pb.GpuDevice(index=index, **(fields | overrides))


def test_budget_is_total_memory_minus_the_margin() -> None:
    assert gpu_budget(gpu(0)) == 16 * GIB - GPU_SAFETY_MARGIN_BYTES
    assert gpu_budget(gpu(0, total_bytes=GPU_SAFETY_MARGIN_BYTES // 2)) == 0


def test_choose_picks_the_gpu_with_most_unreserved_memory() -> None:
    gpus = [gpu(0), gpu(1), gpu(2, total_bytes=8 * GIB)]
    assert choose_gpu(gpus, {0: 5 * GIB, 1: 2 * GIB}, GIB) == 1


def test_choose_breaks_ties_by_lowest_index() -> None:
    assert choose_gpu([gpu(3), gpu(1), gpu(2)], {}, GIB) == 1


def test_choose_skips_gpus_it_does_not_fit() -> None:
    gpus = [gpu(0, total_bytes=4 * GIB), gpu(1)]
    assert choose_gpu(gpus, {1: 14 * GIB}, 2 * GIB) == 0


def test_choose_uses_a_gpu_exactly_to_its_budget_and_not_a_byte_more() -> None:
    budget = gpu_budget(gpu(0))
    assert choose_gpu([gpu(0)], {0: GIB}, budget - GIB) == 0
    assert choose_gpu([gpu(0)], {0: GIB}, budget - GIB + 1) is None


def test_choose_ignores_measured_free_memory() -> None:
    # Our own loading instances make nvidia-smi's free memory stale; the ledger is the truth.
    assert choose_gpu([gpu(0, free_bytes=0)], {}, GIB) == 0


def test_ledger_reserves_on_the_chosen_gpu_and_release_frees_it() -> None:
    ledger = GpuLedger([gpu(0), gpu(1)])
    assert ledger.reserve(10 * GIB, "a") == 0
    assert ledger.reserve(10 * GIB, "b") == 1
    assert ledger.reserved() == {0: 10 * GIB, 1: 10 * GIB}
    ledger.release(0, 10 * GIB)
    assert ledger.reserve(12 * GIB, "c") == 0


def test_ledger_refuses_what_fits_no_gpu_and_reserves_nothing() -> None:
    ledger = GpuLedger([gpu(0), gpu(1)])
    ledger.reserve(10 * GIB, "a")
    with pytest.raises(NoRoomError, match=r"'big'.*GPU 0: .*GPU 1: .*unload an instance"):
        ledger.reserve(gpu_budget(gpu(1)) + 1, "'big'")
    assert ledger.reserved() == {0: 10 * GIB, 1: 0}


def test_ledger_needs_a_gpu() -> None:
    with pytest.raises(ValueError, match="CPU node"):
        GpuLedger([])


def test_report_lowers_free_memory_to_what_is_unreserved() -> None:
    ledger = GpuLedger([gpu(0), gpu(1)])
    ledger.reserve(10 * GIB, "a")
    probed = [gpu(0, free_bytes=15 * GIB), gpu(1, free_bytes=GIB)]
    first, second = ledger.report(probed)
    assert first.free_bytes == gpu_budget(gpu(0)) - 10 * GIB  # reserved, not yet allocated
    assert second.free_bytes == GIB  # measured is lower: another process uses it
    assert probed[0].free_bytes == 15 * GIB, "the probe's list is not modified"
