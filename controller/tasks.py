"""Background tasks the controller starts and must not lose (loads, unloads, streams closed
from a callback): kept referenced until done, cancelled together at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `coro` in a task held here until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)
        return task

    async def close(self) -> None:
        """Cancel every task still running and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _log_failure(task: asyncio.Task[Any]) -> None:
    """A background task's unexpected exception is logged, never lost."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", exc_info=task.exception())
