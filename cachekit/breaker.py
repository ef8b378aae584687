"""A circuit breaker around a backend: stop paying a timeout on every call to a dead server.

After ``failures`` consecutive failed calls the breaker *opens*: calls fail at once
with :class:`~cachekit.exceptions.BackendUnavailable` (reads fall through to the
loader, as for any backend error) for ``cooldown`` seconds. Then one call is let
through as a probe (*half-open*): its success closes the breaker, its failure opens
it for another cool-down. Without it, a hung server costs every request the full
socket timeout; with it, only one request per cool-down does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Literal, TypeVar

from cachekit.backends.base import Backend, KeyPolicy
from cachekit.exceptions import BackendError, BackendUnavailable, ConfigurationError
from cachekit.forks import renew_locks_in_child, reset_in_child

__all__ = ["BreakerBackend", "CircuitBreaker"]

T = TypeVar("T")
State = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    """Counts consecutive failures and decides whether a call may go to the server.

    Args:
        failures: consecutive failures that open the breaker.
        cooldown: seconds the breaker stays open before one probe is let through.
        timer: a monotonic clock, injectable for tests.
    """

    def __init__(
        self,
        *,
        failures: int = 5,
        cooldown: float = 1.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or not cooldown > 0:
            raise ConfigurationError("CircuitBreaker needs failures >= 1 and cooldown > 0")
        self.failures = failures
        self.cooldown = cooldown
        self.timer = timer
        self.state: State = "closed"
        self.opened = 0  # how many times it opened
        self.short_circuited = 0  # calls refused while open
        self._consecutive = 0
        self._opened_at = 0.0
        self._lock = threading.Lock()
        renew_locks_in_child(self, "_lock")  # a child inherits the state, not a held lock
        reset_in_child(self, CircuitBreaker._probe_lost_in_fork)

    def _probe_lost_in_fork(self) -> None:
        # A probe in flight in another thread does not exist in a child: without this,
        # the child's breaker would stay half-open, refusing every call, for good.
        if self.state == "half-open":
            self.state = "open"
            self._opened_at = float("-inf")  # the child's next call probes

    def allow(self) -> bool:
        """Whether a call may go to the server now (at most one probe when half-open)."""
        if self.state == "closed":  # the common case, without the lock
            return True
        with self._lock:
            if self.state == "open" and self.timer() >= self._opened_at + self.cooldown:
                self.state = "half-open"
                return True  # this caller is the probe
            self.short_circuited += 1
            return False

    def succeeded(self) -> None:
        """Record a call that reached the server and got an answer."""
        if self.state == "closed" and not self._consecutive:
            return
        with self._lock:
            self._consecutive = 0
            self.state = "closed"

    def abandoned(self) -> None:
        """A call ended without an answer either way (interrupted, or a bug outside the
        backend): a half-open probe goes back to open, so a later one can run."""
        if self.state != "half-open":
            return
        with self._lock:
            if self.state == "half-open":
                self.state = "open"
                self._opened_at = self.timer()

    def failed(self) -> None:
        """Record a failed call; open the breaker at the threshold, or after a probe."""
        with self._lock:
            self._consecutive += 1
            if self.state == "half-open" or self._consecutive >= self.failures:
                if self.state != "open":
                    self.opened += 1
                self.state = "open"
                self._opened_at = self.timer()


class BreakerBackend:
    """A backend whose calls go through a :class:`CircuitBreaker`.

    Any other attribute (``client``, ``evictions``...) is the wrapped backend's.
    """

    def __init__(self, inner: Backend, breaker: CircuitBreaker) -> None:
        self.inner = inner
        self.breaker = breaker
        self.stores_objects = inner.stores_objects
        self.key_policy: KeyPolicy | None = inner.key_policy

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"BreakerBackend({self.inner!r}, state={self.breaker.state})"

    def _call(self, method: Callable[..., T], *args: Any) -> T:
        breaker = self.breaker
        if not breaker.allow():
            raise BackendUnavailable("circuit open: the backend failed repeatedly; retrying later")
        try:
            result = method(*args)
        except BackendError:
            breaker.failed()
            raise
        except BaseException:
            breaker.abandoned()  # no verdict on the server, but a probe must not hang
            raise
        breaker.succeeded()
        return result

    def get(self, key: str) -> Any:
        return self._call(self.inner.get, key)

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        return self._call(self.inner.get_many, keys)

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        self._call(self.inner.set, key, value, ttl)

    def set_many(self, items: Mapping[str, Any], ttl: float | None) -> None:
        self._call(self.inner.set_many, items, ttl)

    def delete(self, key: str) -> None:
        self._call(self.inner.delete, key)

    def delete_many(self, keys: Sequence[str]) -> None:
        self._call(self.inner.delete_many, keys)

    def add(self, key: str, value: Any, ttl: float | None) -> bool:
        return self._call(self.inner.add, key, value, ttl)

    def add_many(self, items: Mapping[str, Any], ttl: float | None) -> AbstractSet[str]:
        return self._call(self.inner.add_many, items, ttl)

    def compare_and_set(self, key: str, expected: Any, value: Any, ttl: float | None) -> bool:
        return self._call(self.inner.compare_and_set, key, expected, value, ttl)

    def compare_and_set_many(
        self, items: Mapping[str, tuple[Any, Any]], ttl: float | None
    ) -> AbstractSet[str]:
        return self._call(self.inner.compare_and_set_many, items, ttl)

    def compare_and_delete(self, key: str, expected: Any) -> bool:
        return self._call(self.inner.compare_and_delete, key, expected)

    def close(self) -> None:
        self.inner.close()
