"""Turning a loader's result into what the cache stores: timed, tagged, encoded.

Every miss path (leases, refreshes, the unleased baseline) goes through these, so the
rules for what may be stored live in one place: a fill rejected by a tag invalidation,
a key with an invalidation still to replay, a ``None`` with negative caching off, and
an unencodable or oversize value are never stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from cachekit.entries import Loaded, pack
from cachekit.exceptions import UNSTORABLE, CacheError
from cachekit.invalidation import UNBOUNDED_TOKEN_TTL, TagGuard
from cachekit.policy import FillPolicy

if TYPE_CHECKING:
    from cachekit.cache import Cache, TagsOf

__all__ = ["load_uncached", "pack_fill", "store_unleased", "timed_load", "token_ttl"]

V = TypeVar("V")


def timed_load(cache: Cache, loader: Callable[[], Any], tags_of: TagsOf = None) -> Loaded:
    """Call the loader, count it and time it (early refresh reads the time); for a
    tagged fill, read the tag epoch first and the tokens after (invalidation)."""
    guard = None
    if tags_of is not None:
        try:
            guard = TagGuard(cache)
        except CacheError as exc:
            cache._write_failed(exc)
    start = time.monotonic()
    value = loader()
    cache._counters.loads += 1
    loaded = Loaded(value, time.monotonic() - start)
    if tags_of is not None:
        loaded.tags = _tokens(cache, guard, tags_of(value))
        loaded.rejected = loaded.tags is None
    return loaded


def _tokens(cache: Cache, guard: TagGuard | None, tags: Iterable[str]) -> dict[str, str] | None:
    """The tag tokens to store, or ``None`` when the fill must not be stored."""
    if guard is None:
        return None
    try:
        tokens = guard.tokens(tags, token_ttl(cache))
    except CacheError as exc:
        cache._write_failed(exc)
        return None
    if tokens is None:
        cache._counters.fills_rejected += 1  # a tag was invalidated during the load
    return tokens


def token_ttl(cache: Cache) -> float:
    """The TTL tag tokens are based on (they live twice as long): the entries' TTL, or
    a day for entries without one, so that tokens always expire."""
    base = UNBOUNDED_TOKEN_TTL if cache.ttl is None else cache.ttl
    return max(base, cache.none_ttl or 0.0)


def pack_fill(
    cache: Cache, bkey: str, loaded: Loaded, policy: FillPolicy
) -> tuple[Any, float | None] | None:
    """Encode a loaded value and its physical TTL; ``None`` if it must not be stored.

    Raises:
        SerializationError: the serializer cannot encode the value.
        ValueTooLarge: the encoded value is over the cache's size limit.
    """
    if loaded.rejected:
        return None
    journal = cache.journal
    if journal and (bkey in journal.keys or (loaded.tags and journal.tags & loaded.tags.keys())):
        return None  # an invalidation of it is still to be replayed
    seconds = cache._resolve_ttl(policy.ttl, loaded.value)
    if seconds == 0:  # a None with negative caching off
        return None
    if policy.annotated or loaded.tags:
        return pack(cache, bkey, loaded, seconds, policy.stale_ttl)
    return cache._encode(bkey, loaded.value), seconds


def store_unleased(cache: Cache, bkey: str, loaded: Loaded, policy: FillPolicy) -> None:
    """Leases off: an unconditional set, open to the stale-set race leases close."""
    try:
        packed = pack_fill(cache, bkey, loaded, policy)
        if packed is not None:
            cache.store.set(bkey, *packed)
    except (CacheError, *UNSTORABLE) as exc:
        cache._write_failed(exc)


def load_uncached(cache: Cache, loader: Callable[[], V]) -> V:
    """Call the loader without storing: the cache failed or a lease holder hung."""
    value = loader()
    cache._counters.loads += 1
    return value
