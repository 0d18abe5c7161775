"""Each function's idle times, as adaptive keep-alive (`autoscaler.keepalive`) learns from them.

A function goes idle when a request finishes and no other request of it is in flight on any
instance; the next request to take a slot ends the idle period, and its length goes into the
function's histogram, which is written through to the store (the registry's SQLite file) so a
restarted controller keeps what it learned. An idle period that began before a restart is not
known and is not counted. Times are the controller's monotonic clock.
"""

from __future__ import annotations

from typing import Protocol

from autoscaler.keepalive import DEFAULT_CONFIG, IdleHistogram, KeepAliveConfig, Windows, windows


class HistogramStore(Protocol):
    """Where histograms persist (`controller.registry.Registry`)."""

    def idle_histograms(self) -> dict[str, IdleHistogram]: ...

    def put_idle_histogram(self, function: str, histogram: IdleHistogram) -> None: ...


class IdleTimes:
    """Idle periods and histograms by function name. Call `went_idle` and `arrived` as requests
    leave and take slots (`ClusterState.release` and `.acquire` do); read `idle_since` and
    `windows` to decide."""

    def __init__(
        self, store: HistogramStore | None = None, config: KeepAliveConfig = DEFAULT_CONFIG
    ) -> None:
        self.config = config
        self._store = store
        self._histograms: dict[str, IdleHistogram] = store.idle_histograms() if store else {}
        self._since: dict[str, float] = {}

    def went_idle(self, function: str, now: float) -> None:
        """`function` has nothing in flight from `now` on."""
        self._since[function] = now

    def arrived(self, function: str, now: float) -> None:
        """A request of `function` took a slot at `now`: record the idle period it ends."""
        since = self._since.pop(function, None)
        if since is None:
            return  # it was not idle (or not since this controller started)
        histogram = self.histogram(function).recorded(now - since)
        self._histograms[function] = histogram
        if self._store is not None:
            self._store.put_idle_histogram(function, histogram)

    def idle_since(self, function: str) -> float | None:
        """When `function` went idle; None while it serves or when unknown."""
        return self._since.get(function)

    def histogram(self, function: str) -> IdleHistogram:
        return self._histograms.get(function) or IdleHistogram.empty(self.config)

    def windows(self, function: str, fallback_s: float) -> Windows:
        """The adaptive windows for `function`, or `fallback_s` of keep-alive when its
        histogram is not representative."""
        return windows(self.histogram(function), fallback_s, self.config)

    def forget(self, function: str) -> None:
        """Drop what is known of a deleted function (the store drops its row itself)."""
        self._histograms.pop(function, None)
        self._since.pop(function, None)
