"""Single-flight: concurrent requests for the same work share one execution.

The first caller for a key runs the work; callers arriving while it runs wait and get the
same result (or the same exception). Once it finishes, the next caller starts afresh.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Coalesces concurrent `run(key, work)` calls per key (thread-safe)."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, tuple[Future[T], int]] = {}
        self._cond = threading.Condition()

    def run(self, key: Hashable, work: Callable[[], T]) -> T:
        """`work()`'s result; if a call for `key` is already running, wait for its result."""
        with self._cond:
            flight = self._flights.get(key)
            if flight is not None:
                future, followers = flight
                self._flights[key] = (future, followers + 1)
                self._cond.notify_all()
            else:
                future = Future()
                self._flights[key] = (future, 0)
        if flight is not None:
            return future.result()
        try:
            result = work()
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(result)
            return result
        finally:
            with self._cond:
                del self._flights[key]

    def followers(self, key: Hashable) -> int:
        """Callers waiting on the running flight for `key` (0 if none runs)."""
        with self._cond:
            flight = self._flights.get(key)
            return flight[1] if flight else 0

    def wait_for_followers(self, key: Hashable, count: int, timeout: float) -> bool:
        """Block until `count` callers wait on `key`'s flight; False on timeout. For tests and
        diagnostics (proving that a second request joined instead of starting its own)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.followers(key) >= count, timeout)
