"""Running requests through an in-process `LLMEngine` in tests: every event by request, and the
token ids of a stream."""

from __future__ import annotations

from node_agent.engine import LLMEngine, Request
from node_agent.engine.sequence import TokenEvent

MAX_STEPS = 10_000
"""More steps than any test's requests need: past it, the engine spins."""


def run(engine: LLMEngine, *requests: Request) -> dict[str, list[TokenEvent]]:
    """Add `requests` and step the engine until it has no work; every event by request id
    (events of requests added before, e.g. a held migration's, included)."""
    for req in requests:
        engine.add(engine.validate(req))
    events: dict[str, list[TokenEvent]] = {r.request_id: [] for r in requests}
    steps = 0
    while engine.has_work():
        steps += 1
        assert steps < MAX_STEPS, "the engine spins"
        for event in engine.step():
            events.setdefault(event.request_id, []).append(event)
    return events


def ids(events: list[TokenEvent]) -> list[int]:
    """The token ids of `events`, in order."""
    return [e.token_id for e in events if e.token_id is not None]
