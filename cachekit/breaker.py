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
from collections.abc import Callable
from typing import Any, Literal

from cachekit.backends.base import AsyncBackend, Backend
from cachekit.backends.proxy import AsyncBackendProxy, BackendProxy
from cachekit.exceptions import BackendError, BackendUnavailable, ConfigurationError
from cachekit.forks import renew_locks_in_child, reset_in_child

__all__ = ["AsyncBreakerBackend", "BreakerBackend", "CircuitBreaker"]

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


class BreakerBackend(BackendProxy):
    """A backend whose calls go through a :class:`CircuitBreaker`.

    Any other attribute (``client``, ``evictions``...) is the wrapped backend's.
    """

    def __init__(self, inner: Backend, breaker: CircuitBreaker) -> None:
        super().__init__(inner)
        self.breaker = breaker

    def __repr__(self) -> str:
        return f"BreakerBackend({self.inner!r}, state={self.breaker.state})"

    def _call(self, name: str, *args: Any) -> Any:
        breaker = self.breaker
        if not breaker.allow():
            raise _open()
        try:
            result = getattr(self.inner, name)(*args)
        except BackendError:
            breaker.failed()
            raise
        except BaseException:
            breaker.abandoned()  # no verdict on the server, but a probe must not hang
            raise
        breaker.succeeded()
        return result


class AsyncBreakerBackend(AsyncBackendProxy):
    """:class:`BreakerBackend` for an async backend; a cancelled call is abandoned."""

    def __init__(self, inner: AsyncBackend, breaker: CircuitBreaker) -> None:
        super().__init__(inner)
        self.breaker = breaker

    def __repr__(self) -> str:
        return f"AsyncBreakerBackend({self.inner!r}, state={self.breaker.state})"

    async def _call(self, name: str, *args: Any) -> Any:
        breaker = self.breaker
        if not breaker.allow():
            raise _open()
        try:
            result = await getattr(self.inner, name)(*args)
        except BackendError:
            breaker.failed()
            raise
        except BaseException:
            breaker.abandoned()
            raise
        breaker.succeeded()
        return result


def _open() -> BackendUnavailable:
    return BackendUnavailable("circuit open: the backend failed repeatedly; retrying later")
