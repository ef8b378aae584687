"""An async backend seen as a sync one, so the sync suites (and Cache) can drive it.

Its coroutines run on an event loop in a thread of its own, whichever thread calls
(the Cache's journal replays from a thread of its own too).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from cachekit.backends.base import AsyncBackend
from cachekit.backends.proxy import BackendProxy

T = TypeVar("T")


class EventLoopThread:
    """An event loop running in a daemon thread; :meth:`call` runs a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and wait for its result (or its exception)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Blocking(BackendProxy):
    """A :class:`~cachekit.backends.base.Backend` whose calls are an async backend's,
    run on ``loop``; other coroutine methods (``add_server``) are run there too."""

    def __init__(self, inner: AsyncBackend, loop: EventLoopThread) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities
        self._loop = loop

    def __repr__(self) -> str:
        return f"Blocking({self.inner!r})"

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if inspect.iscoroutinefunction(attribute):
            return lambda *args, **kwargs: self._loop.call(attribute(*args, **kwargs))
        return attribute

    def _call(self, name: str, *args: Any) -> Any:
        return self._loop.call(getattr(self.inner, name)(*args))

    def close(self) -> None:
        self._loop.call(self.inner.aclose())
