"""Drain planning for a node that will be taken back: which running requests can finish there
before the deadline, which must move, in what order. Pure (state in, plan out): the controller
calls it again every tick with what it knows then, so a request that runs longer than its
estimate, or a migration slower than expected, only changes the next plan.

The model, in seconds from now: the node is gone at `seconds_left`; work must be off it a
`margin_s` earlier (the *window*). A request with `tokens_left` to generate at its decode rate
finishes in `tokens_left / rate`; moving it takes about `context_tokens / prefill rate` (the
destination's round 0) plus a hand-over. A request *finishes here* when it ends inside the
window with time to spare for moving it if the estimate was wrong (finish + move <= window);
every other request moves now. Moves run `max_concurrent` at a time, most urgent first: the
longest move (the least slack) starts first, so that what can still make the window does. A
move planned to end after the window is `late`: it moves anyway (a late hand-over still beats
a resume after the node is gone, and if the node dies first the request resumes elsewhere from
its tokens, losing nothing).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_DECODE_TOKENS_PER_S = 20.0
"""A request's decode rate before any has been measured (a small model on one CPU thread)."""
HAND_OVER_S = 0.5
"""What a move costs beyond its round 0: the catch-up rounds, following and the hand-over."""


@dataclass(frozen=True)
class Running:
    """One request running on the node, as the controller sees it."""

    request_id: str
    context_tokens: int
    """Prompt + output tokens so far: what a destination must prefill to take it over."""
    tokens_left: int
    """Up to `max_tokens`; it may stop earlier (a stop string, EOS): finishing is a bound."""
    decode_tokens_per_s: float = DEFAULT_DECODE_TOKENS_PER_S
    moving: bool = False
    """A migration of it is under way already."""


@dataclass(frozen=True)
class Move:
    request_id: str
    estimate_s: float
    """How long its move should take."""
    ends_s: float
    """When it should be handed over (seconds from now), with the moves before it."""
    late: bool
    """Planned to end after the window."""


@dataclass(frozen=True)
class DrainPlan:
    window_s: float
    """Seconds from now by which the node should be empty (the deadline less the margin)."""
    moves: tuple[Move, ...]
    """Requests to move, most urgent first (those already moving are not repeated)."""
    finish: tuple[str, ...]
    """Requests left to finish on the node (re-examined at the next plan)."""

    @property
    def late(self) -> tuple[str, ...]:
        return tuple(m.request_id for m in self.moves if m.late)


def move_estimate_s(context_tokens: int, prefill_tokens_per_s: float) -> float:
    """Seconds to move a request with this context: its round 0 on the destination, then the
    rounds and the hand-over."""
    return context_tokens / max(prefill_tokens_per_s, 1e-9) + HAND_OVER_S


def plan_drain(
    running: Iterable[Running],
    seconds_left: float,
    *,
    margin_s: float,
    prefill_tokens_per_s: float,
    max_concurrent: int,
) -> DrainPlan:
    """What to do with `running` given `seconds_left` until the node is gone (see the module
    docstring). `max_concurrent` moves run at once."""
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent must be at least 1, not {max_concurrent}")
    window = max(0.0, seconds_left - margin_s)
    finish: list[str] = []
    candidates: list[tuple[float, str]] = []
    for req in running:
        estimate = move_estimate_s(req.context_tokens, prefill_tokens_per_s)
        if req.moving:
            continue
        finishes_in = req.tokens_left / max(req.decode_tokens_per_s, 1e-9)
        if finishes_in + estimate <= window:
            finish.append(req.request_id)
        else:
            candidates.append((estimate, req.request_id))
    # Most urgent first: the longest move has the least slack. Ties by id, for a stable plan.
    candidates.sort(key=lambda c: (-c[0], c[1]))
    # List scheduling on `max_concurrent` lanes. The moves already under way hold lanes for an
    # unknown while (their progress is not modelled): they count as ending now, which errs
    # towards "on time"; the caller starts new moves only while fewer than that many run.
    lanes = [0.0] * max_concurrent
    moves = []
    for estimate, request_id in candidates:
        start = heapq.heappop(lanes)
        ends = start + estimate
        heapq.heappush(lanes, ends)
        moves.append(Move(request_id, estimate, ends, late=ends > window))
    return DrainPlan(window, tuple(moves), tuple(sorted(finish)))
