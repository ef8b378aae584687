"""Backend proxies that count each contract call: round trips made visible.

Wrap any backend to see what a cache operation costs, e.g. that a ``get_many`` of 100
keys is one backend call, or how many calls a lease-protected miss makes. The tests and
``benchmarks/overhead.py`` both measure with them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from cachekit.backends.base import AsyncBackend, Backend
from cachekit.backends.proxy import AsyncBackendProxy, BackendProxy

__all__ = ["AsyncCountingBackend", "CountingBackend"]


class CountingBackend(BackendProxy):
    """Proxies a backend and counts each contract call by method name."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.calls: Counter[str] = Counter()

    def _call(self, name: str, *args: Any) -> Any:
        self.calls[name] += 1
        return getattr(self.inner, name)(*args)


class AsyncCountingBackend(AsyncBackendProxy):
    """Proxies an async backend and counts each contract call by method name."""

    def __init__(self, inner: AsyncBackend) -> None:
        super().__init__(inner)
        self.calls: Counter[str] = Counter()

    def _call(self, name: str, *args: Any) -> Any:
        self.calls[name] += 1
        return getattr(self.inner, name)(*args)  # the coroutine, awaited by the caller
