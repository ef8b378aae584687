"""What both memcached backends do alike, with no I/O: exptimes, CAS tokens, checks, errors."""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Final

from cachekit.backends.base import Capabilities, KeyPolicy
from cachekit.exceptions import BackendError, BackendTimeout, ConfigurationError
from cachekit.forks import renew_locks_in_child

#: The facade hashes keys that break the key policy, so keys arrive ASCII-safe.
#: memcached's default item limit is 1 MiB including key and item header; a larger
#: value is refused by the server (and pymemcache reports it as "stored"). Its clock
#: ticks in whole seconds, so a key may live up to a second past its TTL.
CAPABILITIES: Final = Capabilities(
    key_policy=KeyPolicy(max_bytes=250), max_value_size=1024 * 1024 - 512, ttl_slack=1.0
)

# memcached reads an expiry above 30 days as a unix timestamp, not a duration.
_MAX_RELATIVE_EXPIRE: Final = 30 * 24 * 3600
# A negative exptime stores the item already expired: a conditional delete via cas.
_EXPIRED_NOW: Final = -1
# CAS uniques remembered from our own adds: at most this many, for values at most this
# long (lease markers are 18 bytes), so a caller that never swaps leaks nothing.
_MAX_TOKENS: Final = 10_000
_MAX_TOKEN_VALUE: Final = 256


def _expire(ttl: float | None) -> int:
    """The ``exptime`` memcached expects: whole seconds rounded up, 0 for no expiry."""
    if ttl is None:
        return 0
    seconds = max(1, math.ceil(ttl))
    if seconds > _MAX_RELATIVE_EXPIRE:
        return math.ceil(time.time() + ttl)
    return seconds


def _add_expire(ttl: float | None) -> int:
    """``exptime`` for ``add``, which takes leases: at least ``ttl``, never less.

    memcached's clock ticks in whole seconds, so an item stored just before a tick
    with exptime ``n`` lives between ``n - 1`` and ``n`` seconds; a lease that expired
    early would let a second caller load while the first still holds it. One more
    second makes ``lease_ttl`` a floor.
    """
    expire = _expire(ttl)
    return expire + 1 if 0 < expire <= _MAX_RELATIVE_EXPIRE else expire


def _wrap(operation: str, exc: Exception) -> BackendError:
    """The cachekit exception for a driver error; the caller raises it ``from exc``."""
    message = f"memcached {operation} failed: {exc!r}"
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return BackendTimeout(message)
    return BackendError(message)


def _check_counts(**counts: int) -> None:
    """Refuse a count that is not an int of at least 1 (a bool is not a count)."""
    for name, count in counts.items():
        if not (type(count) is int and count >= 1):
            raise ConfigurationError(f"{name} must be an int >= 1, got {count!r}")


class _CasTokens:
    """The CAS unique of each item our ``add`` stored, by ``(key, value)``, used once.

    Why a remembered unique stands in for comparing the value: memcached gives an item
    a new CAS unique on every modification (set, cas, append, incr...) and a fresh
    one to every item it stores, from a per-server counter that only grows. So while
    the item we added still carries the unique our ``add`` answered, it is that same
    item, unmodified, holding the value we wrote; a ``cas`` with that unique succeeds
    only then, atomically. Once anyone wrote the key, or it expired, was deleted or
    evicted, the ``cas`` fails (EXISTS or NOT_FOUND) and nothing is written.

    Keying by ``(key, value)`` means a token only ever answers for the very value it
    was issued for, and the node it came from is kept so that a key the ring has since
    moved to another server (whose uniques are unrelated) is not swapped with it.
    Bounded: beyond ``limit`` entries the oldest is dropped (its swap then costs the
    ``gets`` again). A memcached restart within a lease resets the counter, so in
    principle a new item under the same key could reach the same unique; that needs
    the same key rewritten and the counter landing on that exact number inside one
    lease, a risk the plain ``gets``-then-``cas`` shares on a smaller window.
    """

    def __init__(self, limit: int = _MAX_TOKENS) -> None:
        self._limit = limit
        self._tokens: dict[tuple[str, bytes], tuple[Any, bytes]] = {}
        self._lock = threading.Lock()
        # A child keeps the parent's tokens: each still answers only for the item it was
        # issued for (a cas with it fails once anyone else wrote the key).
        renew_locks_in_child(self, "_lock")

    def remember(self, key: str, value: bytes, node: Any, token: bytes) -> None:
        with self._lock:
            tokens = self._tokens
            tokens.pop((key, value), None)  # re-added: newest again
            tokens[key, value] = (node, token)
            if len(tokens) > self._limit:
                del tokens[next(iter(tokens))]

    def take(self, key: str, value: Any, node: Any) -> bytes | None:
        """The token for ``(key, value)`` on ``node``, forgotten; None if there is none."""
        if type(value) is not bytes or not self._tokens:
            return None
        with self._lock:
            entry = self._tokens.pop((key, value), None)
        if entry is None or entry[0] is not node:
            return None
        return entry[1]

    def __len__(self) -> int:
        return len(self._tokens)
