"""The drain planner (`spot.plan`) on synthetic nodes: what finishes, what moves, in what order."""

from __future__ import annotations

import pytest

from spot.plan import HAND_OVER_S, Running, move_estimate_s, plan_drain

PREFILL = 1000.0  # tokens/s: a 1000-token context moves in 1 s + the hand-over


def test_a_request_that_finishes_with_time_to_spare_stays_and_the_rest_move() -> None:
    running = [
        Running("short", context_tokens=200, tokens_left=20, decode_tokens_per_s=20),  # 1 s
        Running("long", context_tokens=500, tokens_left=2000, decode_tokens_per_s=20),  # 100 s
    ]
    plan = plan_drain(running, 30.0, margin_s=5.0, prefill_tokens_per_s=PREFILL, max_concurrent=4)
    assert plan.window_s == 25.0
    assert plan.finish == ("short",)
    assert [m.request_id for m in plan.moves] == ["long"]
    assert plan.late == ()


def test_finishing_counts_the_time_to_move_it_if_the_estimate_was_wrong() -> None:
    # Finishes in 20 s of a 25 s window, but moving a 10k context takes 10.5 s: move it now.
    req = Running("r", context_tokens=10_000, tokens_left=400, decode_tokens_per_s=20)
    plan = plan_drain([req], 30.0, margin_s=5.0, prefill_tokens_per_s=PREFILL, max_concurrent=1)
    assert [m.request_id for m in plan.moves] == ["r"] and plan.finish == ()


def test_the_longest_move_goes_first_and_lanes_bound_the_concurrency() -> None:
    running = [
        Running(f"r{ctx}", context_tokens=ctx, tokens_left=10_000)
        for ctx in (1000, 4000, 2000, 3000)
    ]
    plan = plan_drain(running, 12.0, margin_s=2.0, prefill_tokens_per_s=PREFILL, max_concurrent=2)
    assert [m.request_id for m in plan.moves] == ["r4000", "r3000", "r2000", "r1000"]
    ends = {m.request_id: m.ends_s for m in plan.moves}
    # Two lanes: 4000 and 3000 start now; 2000 follows 3000 (free first), 1000 follows 4000.
    assert ends["r4000"] == pytest.approx(4.0 + HAND_OVER_S)
    assert ends["r3000"] == pytest.approx(3.0 + HAND_OVER_S)
    assert ends["r2000"] == pytest.approx(3.0 + 2.0 + 2 * HAND_OVER_S)
    assert ends["r1000"] == pytest.approx(4.0 + 1.0 + 2 * HAND_OVER_S)
    assert plan.late == ()


def test_moves_that_cannot_make_the_window_are_flagged_late_but_still_planned() -> None:
    running = [Running(f"r{i}", context_tokens=5000, tokens_left=10_000) for i in range(3)]
    plan = plan_drain(running, 8.0, margin_s=2.0, prefill_tokens_per_s=PREFILL, max_concurrent=1)
    assert [m.late for m in plan.moves] == [False, True, True]
    assert set(plan.late) == {"r1", "r2"}


def test_requests_already_moving_are_not_planned_again() -> None:
    running = [
        Running("moving", context_tokens=100, tokens_left=5000, moving=True),
        Running("next", context_tokens=100, tokens_left=5000),
    ]
    plan = plan_drain(running, 60.0, margin_s=5.0, prefill_tokens_per_s=PREFILL, max_concurrent=2)
    assert [m.request_id for m in plan.moves] == ["next"] and plan.finish == ()


def test_past_the_deadline_everything_moves_late_and_bad_input_is_refused() -> None:
    running = [Running("r", context_tokens=100, tokens_left=1)]
    plan = plan_drain(running, 1.0, margin_s=5.0, prefill_tokens_per_s=PREFILL, max_concurrent=1)
    assert plan.window_s == 0.0 and plan.late == ("r",)
    assert move_estimate_s(1000, PREFILL) == pytest.approx(1.0 + HAND_OVER_S)
    with pytest.raises(ValueError, match="max_concurrent"):
        plan_drain(running, 10.0, margin_s=1.0, prefill_tokens_per_s=PREFILL, max_concurrent=0)
