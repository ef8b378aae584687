"""Writes: sets, deletes and tag invalidations, failing open into the journal.

A write that cannot reach the server is journaled as an invalidation of what it
replaces (:mod:`cachekit.core.journal`), never dropped: the cache that made it reads
those keys as misses at once, and the server is told when it answers again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from cachekit.core import journal as journal_flows
from cachekit.core import tags as tag_flows
from cachekit.core.ops import Call, Flow
from cachekit.entries import Loaded, pack
from cachekit.exceptions import UNSTORABLE, BackendError, CacheError
from cachekit.ttl import TTL, UseDefault

if TYPE_CHECKING:
    from cachekit.core.state import CacheCore

__all__ = ["delete_many", "invalidate_tags", "set_many", "set_one"]


def set_one(
    core: CacheCore, key: str, value: Any, ttl: TTL | UseDefault, tags: Iterable[str] | None
) -> Flow[None]:
    """``cache.set``: store, or journal the replacement as a delete of the old entry.

    Raises:
        SerializationError, ValueTooLarge: the value cannot be stored; the old entry is
            removed.
        BackendError: the journal is full.
    """
    bkey = core.backend_key(key)
    seconds = core.resolve_ttl(ttl, value)
    yield from journal_flows.settle(core)
    if seconds == 0:  # a None value with negative caching disabled
        yield from delete_many(core, [bkey])  # nothing to store; the old value must go
        return
    try:
        packed = yield from _pack_set(core, bkey, value, seconds, tags)
        yield Call("set", (bkey, *packed))
    except UNSTORABLE:
        yield from delete_many(core, [bkey])  # the caller meant to replace it
        raise
    except CacheError as exc:
        core.defer(exc, keys=[bkey])


def _pack_set(
    core: CacheCore, bkey: str, value: Any, seconds: float | None, tags: Iterable[str] | None
) -> Flow[tuple[Any, float | None]]:
    """What :func:`set_one` stores: the encoded value, annotated with its tag tokens.

    Raises:
        SerializationError, ValueTooLarge: the value cannot be stored.
        BackendError: the tag tokens could not be read.
    """
    if tags is None:
        return core.encode(bkey, value), seconds
    tags = list(tags)
    ttl = tag_flows.token_ttl(core)
    tokens = yield from tag_flows.tokens(core, None, tags, ttl)
    if tokens is None:  # created concurrently by another caller: now they exist
        tokens = yield from tag_flows.tokens(core, None, tags, ttl)
    if tokens is None:
        raise BackendError(f"could not read the tag tokens of {bkey!r}; not stored")
    return pack(core, bkey, Loaded(value, 0.0, tokens), seconds, None)


def set_many(core: CacheCore, mapping: Mapping[str, Any], ttl: TTL | UseDefault) -> Flow[None]:
    """``cache.set_many``: one ``set_many`` per distinct TTL; fails open as :func:`set_one`."""
    try:
        groups = _by_ttl(core, mapping, ttl)
    except UNSTORABLE:
        # As in set_one: a failed replacement leaves nothing old.
        yield from delete_many(core, [core.backend_key(key) for key in mapping])
        raise
    yield from journal_flows.settle(core)
    dropped = groups.pop(0.0, None)  # None values with negative caching off
    if dropped:
        yield from delete_many(core, list(dropped))
    for seconds, items in groups.items():
        try:
            yield Call("set_many", (items, seconds))
        except CacheError as exc:
            core.defer(exc, keys=items)


def _by_ttl(
    core: CacheCore, mapping: Mapping[str, Any], ttl: TTL | UseDefault
) -> dict[float | None, dict[str, Any]]:
    """Encode items and group them by resolved TTL, ``{bkey: data}``; what must not
    be stored (a ``None`` with negative caching off) goes under TTL 0, by key."""
    groups: dict[float | None, dict[str, Any]] = {}
    for key, value in mapping.items():
        seconds = core.resolve_ttl(ttl, value)
        bkey = core.backend_key(key)
        # TTL 0 (a None with negative caching off) is kept apart, not encoded.
        groups.setdefault(seconds, {})[bkey] = None if seconds == 0 else core.encode(bkey, value)
    return groups


def delete_many(core: CacheCore, bkeys: list[str]) -> Flow[None]:
    """Delete backend keys in one round trip; journal them if the server fails.

    Raises:
        BackendError: the journal is full, so the invalidation is lost.
    """
    if not bkeys:
        return
    yield from journal_flows.settle(core)
    try:
        if len(bkeys) > 1:
            yield Call("delete_many", (bkeys,))
        else:
            yield Call("delete", (bkeys[0],))
    except CacheError as exc:
        core.defer(exc, keys=bkeys)


def invalidate_tags(core: CacheCore, tags: Iterable[str]) -> Flow[None]:
    """``cache.invalidate_tags``: two round trips, or journaled if the server fails.

    Raises:
        BackendError: the journal is full, so the invalidation is lost.
    """
    tags = list(tags)
    yield from journal_flows.settle(core)
    try:
        yield from tag_flows.invalidate(core, tags)
    except CacheError as exc:
        core.defer(exc, tags=tags)
