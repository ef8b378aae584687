"""An async backend seen as a sync one, so the sync suites (and Cache) can drive it.

Its coroutines run on an event loop in a thread of its own, whichever thread calls
(the Cache's journal replays from a thread of its own too).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from cachekit.backends.base import AsyncBackend
from cachekit.backends.proxy import BackendProxy

T = TypeVar("T")


class EventLoopThread:
    """An event loop running in a daemon thread; :meth:`call` runs a coroutine there."""

    def __init__(self, name: str = "test-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop, as a task in a copy of the caller's context
        (so a contextvar the caller set, such as the lease re-entrancy check, travels
        with it), and wait for its result (or its exception)."""
        context = contextvars.copy_context()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def start() -> None:
            task = self.loop.create_task(coroutine, context=context)
            task.add_done_callback(lambda task: _settle(done, task))

        self.loop.call_soon_threadsafe(start)
        return done.result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def _settle(done: concurrent.futures.Future[T], task: asyncio.Task[T]) -> None:
    if task.cancelled():
        done.cancel()
    elif (exc := task.exception()) is not None:
        done.set_exception(exc)
    else:
        done.set_result(task.result())


class Blocking(BackendProxy):
    """A :class:`~cachekit.backends.base.Backend` whose calls are an async backend's,
    each run to completion by ``run`` (:meth:`EventLoopThread.call`, or a submission to
    the test's own loop); other coroutine methods (``add_server``) are run there too."""

    def __init__(self, inner: AsyncBackend, run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities
        self._run = run

    def __repr__(self) -> str:
        return f"Blocking({self.inner!r})"

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if inspect.iscoroutinefunction(attribute):
            return lambda *args, **kwargs: self._run(attribute(*args, **kwargs))
        return attribute

    def _call(self, name: str, *args: Any) -> Any:
        return self._run(getattr(self.inner, name)(*args))

    def close(self) -> None:
        self._run(self.inner.aclose())
