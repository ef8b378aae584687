"""Leases on the miss path: no stale sets, and one loader call per key per miss.

The protocol is the one of "Scaling Memcache at Facebook" (NSDI 2013), built only on
the backend's atomic primitives:

1. A caller that misses stores a fresh, random lease marker under the key with
   ``add`` (set-if-absent), *before* it runs the loader.
2. The holder fills with ``compare_and_set(key, marker, value)``: the value lands only
   if its marker is still there. Any ``delete``, ``set`` or invalidation in between
   removed or replaced the marker, so a value read before that write can never be
   stored after it (the fill-after-invalidate race).
3. Callers that miss while a lease is held wait, polling the key with jittered,
   growing intervals, and return the value the holder stores. If the marker
   disappears (released, expired, invalidated) they compete for a new lease, so
   exactly one of them loads next.
4. A holder whose loader raises releases its lease with ``compare_and_delete``; a
   holder that dies leaves a lease that expires after ``lease_ttl``.

Limits: a holder that outlives ``lease_ttl`` loses its lease (its fill is rejected
and another caller loads). A server that evicts a lease early only costs a second
loader call; neither can store stale data. Waiters give up after ``lease_ttl`` plus
one second and call the loader themselves, without storing its result.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from cachekit.backends.base import MISSING
from cachekit.exceptions import CacheError, SerializationError
from cachekit.markers import MARKER_BYTE, Marker
from cachekit.ttl import TTL, UseDefault

if TYPE_CHECKING:
    from cachekit.cache import Cache

__all__ = ["is_marker", "load_under_lease", "new_lease"]

V = TypeVar("V")

_LEASE_TAG = MARKER_BYTE + b"L"
_TOKEN_BYTES = 16
# Waiters past the lease's own expiry allow this much for a new holder to appear.
_GRACE = 1.0


def new_lease(objects: bool) -> Any:
    """A lease marker unique to this attempt: an object (memory) or bytes."""
    token = os.urandom(_TOKEN_BYTES)
    return Marker(token) if objects else _LEASE_TAG + token


def is_marker(raw: Any) -> bool:
    """Whether a raw stored entry is a cachekit marker rather than a value."""
    if type(raw) is Marker:
        return True
    return type(raw) is bytes and raw[:1] == MARKER_BYTE


def load_under_lease(
    cache: Cache,
    bkey: str,
    loader: Callable[[], V],
    ttl: TTL | UseDefault,
    lease_ttl: float,
) -> V:
    """The miss path: take the lease and load, or wait for the holder's value."""
    backend = cache.backend
    deadline = None
    delay = cache.lease_poll / 8
    while True:
        marker = new_lease(backend.stores_objects)
        try:
            acquired = backend.add(bkey, marker, lease_ttl)
        except CacheError as exc:
            cache._write_failed(exc)
            return cache._load_uncached(loader)
        if acquired:
            return _load_as_holder(cache, bkey, marker, loader, ttl)
        if deadline is None:
            cache._counters.lease_waits += 1
            deadline = time.monotonic() + lease_ttl + _GRACE
        while True:
            try:
                raw = backend.get(bkey)
            except CacheError as exc:
                cache._read_failed(exc, count=0)
                return cache._load_uncached(loader)
            if raw is MISSING:
                break  # released, expired or invalidated: compete for a new lease
            if not is_marker(raw):
                value = cache._decode(bkey, raw)
                if value is MISSING:
                    break  # undecodable, and now deleted
                return value  # type: ignore[no-any-return]
            if time.monotonic() >= deadline:
                return cache._load_uncached(loader)  # the holder is stuck: don't wait forever
            # Full jitter keeps waiters from polling in lockstep.
            time.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - not cryptographic
            delay = min(delay * 2, cache.lease_poll)


def _load_as_holder(
    cache: Cache, bkey: str, marker: Any, loader: Callable[[], V], ttl: TTL | UseDefault
) -> V:
    try:
        value = loader()
    except BaseException:
        _release(cache, bkey, marker)  # let a waiter take over now, not at lease expiry
        raise
    cache._counters.loads += 1
    seconds = cache._resolve_ttl(ttl, value)
    if seconds == 0:  # a None with negative caching off: nothing to store
        _release(cache, bkey, marker)
        return value
    try:
        data = cache._encode(bkey, value)
    except SerializationError as exc:
        # The call must still work; the error is the caller's to see in stats and logs.
        _release(cache, bkey, marker)
        cache._write_failed(exc)
        return value
    try:
        stored = cache.backend.compare_and_set(bkey, marker, data, seconds)
    except CacheError as exc:
        cache._write_failed(exc)
        return value
    if not stored:
        cache._counters.fills_rejected += 1
    return value


def _release(cache: Cache, bkey: str, marker: Any) -> None:
    try:
        cache.backend.compare_and_delete(bkey, marker)
    except CacheError as exc:
        cache._write_failed(exc)  # the lease will expire on its own
