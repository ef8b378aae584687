"""Stale-while-revalidate and probabilistic early refresh, over annotated entries.

Both are opt-in (``stale_ttl=``, ``early_refresh=``). An annotated entry carries, with
its value, the wall-clock time it stops being fresh and how long its load took, so
every process sharing the server reads the same facts:

- **Stale-while-revalidate.** The entry lives ``stale_ttl`` past its TTL. A read in
  that window takes a *refresh lease* (a separate key, so the stale value stays
  readable) and reloads; every other reader gets the stale value at once instead of
  waiting. If the reload fails, the stale value is served and the error counted.
- **Early refresh** (XFetch, "Optimal Probabilistic Cache Stampede Prevention",
  VLDB 2015). A fresh read refreshes early when
  ``now - delta * beta * ln(U) >= expiry`` with ``U`` uniform in (0, 1], ``delta``
  the measured load time: hot keys are reloaded by about one caller shortly before
  they expire, and almost never long before.

A refresh stores its value with ``compare_and_set`` against the entry it read, so a
write or invalidation that happened meanwhile wins, exactly as with miss leases.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from cachekit.exceptions import CacheError, DecodeError, SerializationError
from cachekit.keys import make_backend_key
from cachekit.markers import new_lease
from cachekit.policy import FillPolicy

if TYPE_CHECKING:
    from cachekit.cache import Cache

__all__ = ["ENTRY_BYTE", "Entry", "pack", "read_without_loader", "serve", "unpack"]

V = TypeVar("V")

#: First byte of an annotated entry in a byte backend (never a serializer's first byte).
ENTRY_BYTE: Final = b"\x01"
_HEADER = struct.Struct("!dd")  # fresh_until (wall clock), delta (load seconds)
_FOREVER = math.inf


class Entry:
    """A value with its freshness metadata; stored as is by object backends."""

    __slots__ = ("delta", "fresh_until", "raw", "value")

    def __init__(self, value: Any, fresh_until: float, delta: float, raw: Any = None) -> None:
        self.value = value
        self.fresh_until = fresh_until
        self.delta = delta
        # What the backend holds, for compare_and_set: the bytes, or this very object.
        self.raw = self if raw is None else raw


def pack(
    cache: Cache,
    bkey: str,
    value: Any,
    seconds: float | None,
    *,
    policy: FillPolicy,
    delta: float,
) -> tuple[Any, float | None]:
    """Encode ``value`` as an annotated entry; return it with its physical TTL.

    Raises:
        SerializationError: the serializer cannot encode ``value``.
    """
    fresh_until = _FOREVER if seconds is None else cache.clock() + seconds
    physical = None if seconds is None else seconds + (policy.stale_ttl or 0.0)
    if cache.backend.stores_objects:
        return Entry(value, fresh_until, delta), physical
    payload = cache.serializer.dumps(value, bkey)
    return ENTRY_BYTE + _HEADER.pack(fresh_until, delta) + payload, physical


def unpack(cache: Cache, bkey: str, raw: bytes) -> Entry:
    """Decode an annotated entry read from a byte backend.

    Raises:
        DecodeError: a truncated header or an undecodable value.
    """
    start = len(ENTRY_BYTE) + _HEADER.size
    if len(raw) < start:
        raise DecodeError("truncated annotated entry")
    fresh_until, delta = _HEADER.unpack_from(raw, len(ENTRY_BYTE))
    return Entry(cache.serializer.loads(raw[start:], bkey), fresh_until, delta, raw)


def serve(cache: Cache, bkey: str, entry: Entry, loader: Callable[[], V], policy: FillPolicy) -> V:
    """Return the entry's value, refreshing it first if it is stale or due early."""
    now = cache.clock()
    stale = now >= entry.fresh_until
    if not stale and not _due_early(entry, now, policy.early_refresh):
        return entry.value  # type: ignore[no-any-return]
    return _refresh(cache, bkey, entry, loader, policy, stale=stale)


def _due_early(entry: Entry, now: float, beta: float | None) -> bool:
    if beta is None or entry.fresh_until == _FOREVER:
        return False
    draw = 1.0 - random.random()  # noqa: S311 - (0, 1], so the log is finite
    return now - entry.delta * beta * math.log(draw) >= entry.fresh_until


def _refresh(
    cache: Cache,
    bkey: str,
    entry: Entry,
    loader: Callable[[], V],
    policy: FillPolicy,
    *,
    stale: bool,
) -> V:
    lease_key = make_backend_key(cache.namespace + "!", bkey, cache.backend.key_policy)
    marker = new_lease(cache.backend.stores_objects)
    try:
        acquired = cache.backend.add(lease_key, marker, policy.lease_ttl or cache.lease_ttl)
    except CacheError as exc:
        cache._write_failed(exc)
        acquired = False
    if not acquired:  # another caller is refreshing: serve what we have
        return _served(cache, entry, stale)  # type: ignore[no-any-return]
    try:
        try:
            value, delta = cache._timed_load(loader)
        except Exception as exc:  # serve-stale-on-error: the caller still gets a value
            cache._counters.errors += 1
            cache._log(f"refresh of {bkey!r} failed, serving the cached value: {exc!r}")
            return _served(cache, entry, stale)  # type: ignore[no-any-return]
        _store(cache, bkey, entry, value, policy=policy, delta=delta)
        return value
    finally:
        try:
            cache.backend.compare_and_delete(lease_key, marker)
        except CacheError as exc:
            cache._write_failed(exc)  # the refresh lease expires on its own


def _store(
    cache: Cache, bkey: str, entry: Entry, value: Any, *, policy: FillPolicy, delta: float
) -> None:
    try:
        packed = cache._pack_fill(bkey, value, policy, delta)
    except SerializationError as exc:
        cache._write_failed(exc)
        return
    try:
        if packed is None:
            stored = cache.backend.compare_and_delete(bkey, entry.raw)
        else:
            stored = cache.backend.compare_and_set(bkey, entry.raw, *packed)
    except CacheError as exc:
        cache._write_failed(exc)
        return
    if not stored:
        cache._counters.fills_rejected += 1


def _served(cache: Cache, entry: Entry, stale: bool) -> Any:
    if stale:
        cache._counters.stale_served += 1
    return entry.value


def read_without_loader(cache: Cache, entry: Entry) -> Any:
    """A read with nothing to refresh from (``get``, ``get_many``): the value as is."""
    return _served(cache, entry, cache.clock() >= entry.fresh_until)
