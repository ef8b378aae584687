"""Test doubles shared by the suites: a call-counting proxy and a failing backend."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from cachekit.backends.base import Backend, KeyPolicy
from cachekit.exceptions import BackendError


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

    def add_many(self, items: Mapping[str, Any], ttl: float | None) -> set[str]:
        return self._call("add_many", items, ttl)  # type: ignore[no-any-return]

    def compare_and_set_many(
        self, items: Mapping[str, tuple[Any, Any]], ttl: float | None
    ) -> set[str]:
        return self._call("compare_and_set_many", items, ttl)  # type: ignore[no-any-return]

    def compare_and_delete(self, key: str, expected: Any) -> bool:
        return self._call("compare_and_delete", key, expected)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.inner.close()


class FailingBackend(CountingBackend):
    """Every call fails the way a dead server does: with a BackendError."""

    def _call(self, name: str, *args: Any) -> Any:
        self.calls[name] += 1
        raise BackendError(f"{name}: server unreachable")


class FakeClock:
    """An injectable timer that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FlakyBackend(CountingBackend):
    """A backend whose server can be taken down and brought back by the test."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.down = False

    def _call(self, name: str, *args: Any) -> Any:
        if self.down:
            self.calls[name] += 1
            raise BackendError(f"{name}: connection refused")
        return super()._call(name, *args)
