"""`autoscaler.demand.slots_needed`: load over target concurrency, bounds, and the SLO's extra
slot."""

from __future__ import annotations

from autoscaler.demand import SLO_MIN_SAMPLES, FunctionLoad, p99, slots_needed


def load(**kw: object) -> FunctionLoad:
    base: dict[str, object] = dict(
        name="f", running=0, queued=0, min_instances=0, max_instances=8, target_concurrency=2
    )
    base.update(kw)
    return FunctionLoad(**base)  # type: ignore[arg-type]


def test_running_and_queued_requests_over_target_concurrency_within_bounds() -> None:
    assert slots_needed(load(running=3, queued=2))[0] == 3
    assert slots_needed(load())[0] == 0
    assert slots_needed(load(min_instances=2))[0] == 2
    n, why = slots_needed(load(running=40))
    assert n == 8 and "max 8" in why


def test_a_missed_ttft_slo_asks_for_one_more_slot_while_there_is_load() -> None:
    slow = [0.1] * (SLO_MIN_SAMPLES - 1) + [3.0]
    n, why = slots_needed(load(running=2, slo_ttft_p99_s=2.0, recent_ttfts=slow))
    assert n == 2 and "over its SLO 2s" in why
    assert slots_needed(load(running=2, slo_ttft_p99_s=5.0, recent_ttfts=slow))[0] == 1
    assert slots_needed(load(running=2, slo_ttft_p99_s=2.0, recent_ttfts=slow[1:]))[0] == 1
    assert slots_needed(load(running=0, slo_ttft_p99_s=2.0, recent_ttfts=slow))[0] == 0


def test_p99_is_the_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 201)]
    assert p99(samples) == 198.0
    assert p99([4.0]) == 4.0


def test_instances_kept_alive_hold_their_slots() -> None:
    n, why = slots_needed(load(running=1, instances=3))
    assert n == 3 and "3 instance(s) kept alive" in why
    assert slots_needed(load(running=6, instances=1))[0] == 3
