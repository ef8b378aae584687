"""One proxy base for wrappers around a backend: every contract call goes through ``_call``.

The circuit breaker and the counting wrapper are such proxies. A subclass overrides
``_call(name, *args)`` once; the contract's methods are written here, once, for sync
and async backends alike (an async ``_call`` makes every method a coroutine).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cachekit.backends.base import AsyncBackend, Backend, Capabilities

__all__ = ["AsyncBackendProxy", "BackendProxy", "InProcessAsync"]


class _Proxy:
    """The data methods of the contract, each forwarded to ``_call``."""

    capabilities: Capabilities

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities

    def __getattr__(self, name: str) -> Any:
        # Anything else (``client``, ``evictions``, ...) is the wrapped backend's.
        return getattr(self.inner, name)

    def _call(self, name: str, *args: Any) -> Any:
        return getattr(self.inner, name)(*args)

    def get(self, key: str) -> Any:
        return self._call("get", key)

    def get_many(self, keys: Sequence[str]) -> Any:
        return self._call("get_many", keys)

    def set(self, key: str, value: Any, ttl: float | None) -> Any:
        return self._call("set", key, value, ttl)

    def set_many(self, items: Mapping[str, Any], ttl: float | None) -> Any:
        return self._call("set_many", items, ttl)

    def delete(self, key: str) -> Any:
        return self._call("delete", key)

    def delete_many(self, keys: Sequence[str]) -> Any:
        return self._call("delete_many", keys)

    def add(self, key: str, value: Any, ttl: float | None) -> Any:
        return self._call("add", key, value, ttl)

    def add_many(self, items: Mapping[str, Any], ttl: float | None) -> Any:
        return self._call("add_many", items, ttl)

    def compare_and_set(self, key: str, expected: Any, value: Any, ttl: float | None) -> Any:
        return self._call("compare_and_set", key, expected, value, ttl)

    def compare_and_set_many(self, items: Mapping[str, tuple[Any, Any]], ttl: float | None) -> Any:
        return self._call("compare_and_set_many", items, ttl)

    def compare_and_delete(self, key: str, expected: Any) -> Any:
        return self._call("compare_and_delete", key, expected)


class BackendProxy(_Proxy):
    """A proxy over a :class:`~cachekit.backends.base.Backend`."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)

    def close(self) -> None:
        self.inner.close()


class AsyncBackendProxy(_Proxy):
    """A proxy over an :class:`~cachekit.backends.base.AsyncBackend`."""

    def __init__(self, inner: AsyncBackend) -> None:
        super().__init__(inner)

    async def aclose(self) -> None:
        await self.inner.aclose()


class InProcessAsync(AsyncBackendProxy):
    """An in-process backend (``MemoryBackend``) seen as an async one: its calls take a
    lock for a dictionary operation and never wait on I/O, so they run inline."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities

    def __repr__(self) -> str:
        return f"InProcessAsync({self.inner!r})"

    async def _call(self, name: str, *args: Any) -> Any:
        return getattr(self.inner, name)(*args)

    async def aclose(self) -> None:
        self.inner.close()
