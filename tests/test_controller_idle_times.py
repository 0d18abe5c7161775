"""controller.idle_times and its feeds: idle periods from ClusterState's acquire/release, the
histograms persisted in the registry, and the function views the autoscaler gets."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from autoscaler.keepalive import IdleHistogram
from controller.cluster import InstanceStatus
from controller.idle_times import IdleTimes
from controller.models import ModelInfo
from controller.registry import FunctionRecord, Registry
from controller.spec import spec_from_dict
from controller.state import ClusterState, function_view

SOURCE = "/models/m"


def record(tmp_path: Path, name: str = "f", **spec: Any) -> FunctionRecord:
    model = ModelInfo(SOURCE, tmp_path, 1, "float32", 64)
    return FunctionRecord(name, spec_from_dict({"model": SOURCE, **spec}), model, 0.0, 0.0)


# -- IdleTimes --------------------------------------------------------------------------------


def test_an_idle_period_is_recorded_when_the_next_request_arrives() -> None:
    idle = IdleTimes()
    idle.went_idle("f", 100.0)
    assert idle.idle_since("f") == 100.0 and idle.histogram("f").total == 0
    idle.arrived("f", 100.0 + 7 * 60 + 5)
    assert idle.idle_since("f") is None
    assert idle.histogram("f").counts[7] == 1 and idle.histogram("f").total == 1


def test_an_arrival_without_a_known_idle_start_records_nothing() -> None:
    idle = IdleTimes()
    idle.arrived("f", 50.0)
    idle.went_idle("g", 10.0)
    idle.arrived("f", 60.0)
    assert idle.histogram("f").total == 0 and idle.idle_since("g") == 10.0


def test_windows_fall_back_until_the_histogram_is_representative() -> None:
    idle = IdleTimes()
    assert idle.windows("f", 120.0).keep_alive_s == 120.0
    for start in range(0, 20 * 600, 600):
        idle.went_idle("f", float(start))
        idle.arrived("f", start + 595.0)
    w = idle.windows("f", 120.0)
    assert w.from_histogram and w.prewarm_s > 0


def test_histograms_persist_in_the_registry_and_go_with_the_function(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "controller.db")
    idle = IdleTimes(registry)
    idle.went_idle("f", 0.0)
    idle.arrived("f", 300.0)
    registry.close()

    reopened = Registry(tmp_path / "controller.db")
    assert IdleTimes(reopened).histogram("f") == idle.histogram("f")
    assert reopened.idle_histograms()["f"].total == 1
    reopened.put_function("f", record(tmp_path).spec, record(tmp_path).model)
    assert reopened.delete_function("f")
    assert reopened.idle_histograms() == {}


def test_a_corrupt_stored_histogram_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(tmp_path / "controller.db")
    registry.put_idle_histogram("good", IdleHistogram.empty().recorded(5))
    registry._db.execute("INSERT INTO idle_times VALUES ('bad', '{\"version\": 9}')")
    registry._db.execute("INSERT INTO idle_times VALUES ('worse', 'not json')")
    with caplog.at_level(logging.WARNING):
        found = registry.idle_histograms()
    assert set(found) == {"good"}
    assert "bad: ignoring its stored idle times (idle histogram: version 9" in caplog.text
    assert "worse: ignoring its stored idle times" in caplog.text


# -- ClusterState feeds it --------------------------------------------------------------------


def test_the_function_goes_idle_only_when_no_instance_serves(tmp_path: Path) -> None:
    async def scenario() -> None:
        state = ClusterState()
        fn = record(tmp_path)
        a, b = (state.new_instance(fn, "n1", "dram", 0.0) for _ in range(2))
        for i in (a, b):
            i.state = InstanceStatus.READY
        state.acquire(a)
        state.acquire(b)
        state.release(a)
        assert state.idle_times.idle_since("f") is None, "b still serves"
        state.release(b)
        assert state.idle_times.idle_since("f") == b.idle_since
        state.acquire(a)
        assert state.idle_times.idle_since("f") is None
        assert state.idle_times.histogram("f").total == 1
        state.acquire(b)  # the function was not idle: no second idle time
        assert state.idle_times.histogram("f").total == 1

    asyncio.run(scenario())


def test_scaling_view_carries_adaptive_windows_idle_time_and_slo(tmp_path: Path) -> None:
    async def scenario() -> None:
        state = ClusterState()
        spec = {"autoscaling": {"keep_alive": "adaptive", "keep_alive_fallback": "2m"}}
        adaptive = record(tmp_path, "a", **spec, slo={"ttft_p99": "1.5s"})
        fixed = record(tmp_path, "x", autoscaling={"keep_alive": "10m"})
        state.idle_times.went_idle("a", 42.0)
        state.queued["a"] = 3
        view = state.scaling_view(adaptive)
        assert view.windows is not None and view.windows.keep_alive_s == 120.0
        assert (view.idle_since, view.queued, view.keep_alive_s) == (42.0, 3, 120.0)
        assert view.slo_ttft_p99_s == 1.5
        plain = state.scaling_view(fixed)
        assert (plain.windows, plain.keep_alive_s, plain.slo_ttft_p99_s) == (None, 600.0, None)
        assert function_view(adaptive).windows is None  # routing needs no windows

    asyncio.run(scenario())
