"""The task that replays an ``AsyncCache``'s journal in the background, on its event loop.

``Cache`` replays on a thread; an asyncio cache must replay on the loop its backend
lives on. The task is started when an invalidation is journaled, ends when the journal
is empty, is stopped by ``aclose()``, and is reaped if its loop ended without
cancelling it (``loop.run_until_complete`` per request), so that a replay it was in
the middle of lets go of the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from cachekit.core.journal import Journal

__all__ = ["Replayer"]


class Replayer:
    """Starts, watches and stops one journal's replay task.

    Args:
        journal: the journal whose ``wake`` and ``alive`` this sets.
        replay: a new coroutine driving :func:`cachekit.core.journal.background`.
    """

    def __init__(self, journal: Journal, replay: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._journal = journal
        self._replay = replay
        self._task: asyncio.Task[None] | None = None
        journal.wake = self.start
        journal.alive = self.alive

    def start(self) -> None:
        """Start the task on the running loop (the journal's ``wake``)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # recorded outside a loop: the next record starts it
            self._journal.stopped()
            return
        self.reap()
        self._task = loop.create_task(self._run(self._journal.generation), name="cachekit-journal")

    async def _run(self, generation: int) -> None:
        try:
            await self._replay()
        except BaseException:
            self._journal.stopped(generation)
            raise

    def reap(self) -> None:
        """Close the task's coroutine if its event loop is closed."""
        task = self._task
        if task is not None and not task.done() and task.get_loop().is_closed():
            self._task = None
            task.get_coro().close()

    def alive(self) -> bool:
        """Whether the task can still run (the journal's ``alive``)."""
        task = self._task
        if task is None or task.done():
            return task is None  # None: starting, not yet recorded
        try:
            return task.get_loop() is asyncio.get_running_loop()
        except RuntimeError:  # no loop running here: it may be alive in its own
            return True

    async def stop(self) -> None:
        """Cancel the task and wait for it: a replay it is in the middle of ends (and
        lets go of the journal) before the caller's own."""
        task, self._task = self._task, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
