"""autoscaler.keepalive: the hybrid histogram of idle times, its windows and its JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest

from autoscaler.keepalive import (
    DEFAULT_CONFIG,
    IdleHistogram,
    KeepAliveConfig,
    format_duration,
    windows,
)

MINUTE = 60.0
FALLBACK_S = 300.0


def histogram(*idle_s: float, config: KeepAliveConfig = DEFAULT_CONFIG) -> IdleHistogram:
    h = IdleHistogram.empty(config)
    for idle in idle_s:
        h = h.recorded(idle)
    return h


def periodic(minutes: float, n: int = 20) -> IdleHistogram:
    """`n` idle times of just under `minutes` minutes (a request every `minutes`, 5 s long)."""
    return histogram(*[minutes * MINUTE - 5] * n)


# -- the histogram ----------------------------------------------------------------------------


def test_default_bins_cover_four_hours_in_minutes() -> None:
    h = IdleHistogram.empty()
    assert (h.bin_s, len(h.counts), h.range_s) == (MINUTE, 240, 4 * 3600)


def test_idle_times_land_in_their_bins_and_past_the_range_out_of_bounds() -> None:
    h = histogram(0, 59.9, 60, 61, -3, 4 * 3600 - 1, 4 * 3600, 10 * 3600)
    assert (h.counts[0], h.counts[1], h.counts[-1]) == (3, 2, 1)  # -3 counts as 0
    assert (h.in_range, h.out_of_bounds, h.total) == (6, 2, 8)


def test_recorded_returns_a_new_histogram() -> None:
    empty = IdleHistogram.empty()
    assert empty.recorded(30).total == 1 and empty.total == 0


def test_bin_width_and_range_are_parameters() -> None:
    config = KeepAliveConfig(bin_s=10, range_s=600)
    h = histogram(15, 599, 600, config=config)
    assert len(h.counts) == 60 and (h.counts[1], h.counts[59], h.out_of_bounds) == (1, 1, 1)


def test_percentile_bin_is_the_nearest_rank() -> None:
    h = histogram(*[0] * 5, *[2 * MINUTE] * 94, 9 * MINUTE)  # 100 idle times
    assert h.percentile_bin(5) == 0
    assert h.percentile_bin(6) == 2
    assert h.percentile_bin(99) == 2
    assert h.percentile_bin(100) == 9


def test_bin_cv_is_high_for_one_peak_and_zero_for_an_even_spread() -> None:
    assert periodic(10).bin_cv() > 10
    assert histogram(*[i * MINUTE for i in range(240)]).bin_cv() == 0.0
    assert IdleHistogram.empty().bin_cv() == 0.0


# -- windows ----------------------------------------------------------------------------------


def test_a_periodic_function_gets_a_prewarm_and_a_keep_alive_window() -> None:
    w = windows(periodic(10), FALLBACK_S)
    head, tail = 9 * MINUTE, 10 * MINUTE  # idle 9m55s: bin [9m, 10m), its edges
    assert w.from_histogram
    assert w.prewarm_s == pytest.approx(head * 0.9)
    assert w.end_s == pytest.approx(tail * 1.1)
    assert w.keep_alive_s == pytest.approx(tail * 1.1 - head * 0.9)
    assert "p99 idle 10m" in w.reason and "pre-warm 8m6s" in w.reason


def test_the_windows_bracket_the_idle_time_they_learned() -> None:
    for minutes in (3, 10, 47, 180):
        w = windows(periodic(minutes), FALLBACK_S)
        idle = minutes * MINUTE - 5
        assert w.prewarm_s < idle < w.end_s and w.wants_instance(idle)
        assert not w.wants_instance(w.prewarm_s - 1) and not w.wants_instance(w.end_s)


def test_head_in_the_first_bin_means_no_prewarm() -> None:
    w = windows(histogram(*[10] * 3, *[4 * MINUTE] * 30), FALLBACK_S)
    assert w.from_histogram and w.prewarm_s == 0.0
    assert w.keep_alive_s == pytest.approx(5 * MINUTE * 1.1)


def test_the_margin_is_a_parameter() -> None:
    w = windows(periodic(10), FALLBACK_S, KeepAliveConfig(margin=0.0))
    assert (w.prewarm_s, w.end_s) == (9 * MINUTE, 10 * MINUTE)


def test_too_few_idle_times_fall_back_to_the_fixed_keep_alive() -> None:
    w = windows(periodic(10, n=DEFAULT_CONFIG.min_samples - 1), FALLBACK_S)
    assert (w.prewarm_s, w.keep_alive_s, w.from_histogram) == (0.0, FALLBACK_S, False)
    assert "9 idle times recorded, fewer than 10" in w.reason and "fixed keep-alive 5m" in w.reason
    assert windows(periodic(10, n=DEFAULT_CONFIG.min_samples), FALLBACK_S).from_histogram


def test_idle_times_without_a_pattern_fall_back() -> None:
    spread = histogram(*[i * MINUTE + 1 for i in range(0, 240, 2)])  # every other bin
    w = windows(spread, FALLBACK_S)
    assert not w.from_histogram and w.keep_alive_s == FALLBACK_S
    assert "no pattern" in w.reason and "< 2" in w.reason


def test_mostly_out_of_bounds_idle_times_fall_back() -> None:
    h = histogram(*[5 * 3600] * 11, *[10 * MINUTE] * 10)
    w = windows(h, FALLBACK_S)
    assert not w.from_histogram and "11 of 21 idle times exceed 4h" in w.reason
    assert windows(histogram(*[5 * 3600] * 9, *[10 * MINUTE] * 10), FALLBACK_S).from_histogram


def test_the_thresholds_are_parameters() -> None:
    h = periodic(10, n=3)
    assert not windows(h, FALLBACK_S).from_histogram
    assert windows(h, FALLBACK_S, KeepAliveConfig(min_samples=3)).from_histogram
    assert not windows(periodic(10), FALLBACK_S, KeepAliveConfig(min_cv=100)).from_histogram


# -- JSON -------------------------------------------------------------------------------------


def test_json_round_trips_through_text() -> None:
    h = histogram(5, 5, 600, 599, 9000, 4 * 3600 + 1)
    text = json.dumps(h.to_json())
    assert IdleHistogram.from_json(json.loads(text)) == h


def test_json_is_sparse() -> None:
    data = histogram(5, 5, 600).to_json()
    assert data == {
        "version": 1,
        "bin_s": 60.0,
        "bins": 240,
        "counts": {"0": 2, "10": 1},
        "out_of_bounds": 0,
    }


def test_an_empty_histogram_round_trips() -> None:
    h = IdleHistogram.empty(KeepAliveConfig(bin_s=30, range_s=3600))
    assert IdleHistogram.from_json(h.to_json()) == h


def good() -> dict[str, Any]:
    return histogram(5, 600).to_json()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"version": 2}, "version 2, not 1"),
        ({"bin_s": 0}, "bin_s 0 is not a positive number"),
        ({"bin_s": "60"}, "bin_s '60' is not a positive number"),
        ({"bins": True}, "bins True is not a positive whole number"),
        ({"bins": 0}, "bins 0 is not a positive whole number"),
        ({"out_of_bounds": -1}, "out_of_bounds -1 is not a count"),
        ({"counts": [1, 2]}, "counts [1, 2] is not an object"),
        ({"counts": {"240": 1}}, "bin '240' is not one of 0..239"),
        ({"counts": {"-1": 1}}, "bin '-1' is not one of 0..239"),
        ({"counts": {"3": 1.5}}, "bin 3 count 1.5 is not a count"),
    ],
)
def test_bad_json_names_the_field(change: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError, match="idle histogram: ") as info:
        IdleHistogram.from_json(good() | change)
    assert expected in str(info.value)


def test_json_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ValueError, match="list, not an object"):
        IdleHistogram.from_json([])


def test_durations_read_like_the_spec() -> None:
    assert [format_duration(s) for s in (0, 45, 90, 486, 3600, 5400.4)] == [
        "0s",
        "45s",
        "1m30s",
        "8m6s",
        "1h",
        "1h30m",
    ]
