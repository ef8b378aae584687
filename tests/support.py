"""Test doubles shared by the suites: failing and flaky backends, a fake clock."""

from __future__ import annotations

from typing import Any

from cachekit.backends.base import Backend
from cachekit.backends.counting import CountingBackend
from cachekit.exceptions import BackendError


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
