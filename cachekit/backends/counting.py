"""A backend proxy that counts each contract call: round trips made visible.

Wrap any backend to see what a cache operation costs, e.g. that a ``get_many`` of 100
keys is one backend call, or how many calls a lease-protected miss makes. The tests and
``benchmarks/overhead.py`` both measure with it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from cachekit.backends.base import Backend, KeyPolicy

__all__ = ["CountingBackend"]


class CountingBackend:
    """Proxies another backend and counts each contract call by method name."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.stores_objects = inner.stores_objects
        self.key_policy: KeyPolicy | None = inner.key_policy

    def _call(self, name: str, *args: Any) -> Any:
        self.calls[name] += 1
        return getattr(self.inner, name)(*args)

    def get(self, key: str) -> Any:
        return self._call("get", key)

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        return self._call("get_many", keys)  # type: ignore[no-any-return]

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        self._call("set", key, value, ttl)

    def set_many(self, items: Mapping[str, Any], ttl: float | None) -> None:
        self._call("set_many", items, ttl)

    def delete(self, key: str) -> None:
        self._call("delete", key)

    def delete_many(self, keys: Sequence[str]) -> None:
        self._call("delete_many", keys)

    def add(self, key: str, value: Any, ttl: float | None) -> bool:
        return self._call("add", key, value, ttl)  # type: ignore[no-any-return]

    def compare_and_set(self, key: str, expected: Any, value: Any, ttl: float | None) -> bool:
        return self._call("compare_and_set", key, expected, value, ttl)  # type: ignore[no-any-return]

    def add_many(self, items: Mapping[str, Any], ttl: float | None) -> AbstractSet[str]:
        return self._call("add_many", items, ttl)  # type: ignore[no-any-return]

    def compare_and_set_many(
        self, items: Mapping[str, tuple[Any, Any]], ttl: float | None
    ) -> AbstractSet[str]:
        return self._call("compare_and_set_many", items, ttl)  # type: ignore[no-any-return]

    def compare_and_delete(self, key: str, expected: Any) -> bool:
        return self._call("compare_and_delete", key, expected)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.inner.close()
