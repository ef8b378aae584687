"""Read-through and write-through views: a keyed cache whose misses a loader fills.

A view turns ids into logical keys (``"user:7"``) once, in :meth:`ReadThroughView.key`,
so direct ``cache.get(view.key(7))`` calls and the view always agree. Each id is
rendered by :func:`cachekit.keycodec.render`, so ids of different values or types
(``7``, ``"7"``, ``7.0``) never share a key.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from cachekit.backends.base import MISSING
from cachekit.core import batches, reads
from cachekit.entries import Entry
from cachekit.keycodec import render
from cachekit.policy import FillPolicy

if TYPE_CHECKING:
    from cachekit.cache import Cache

__all__ = ["ReadThroughView", "ViewKeys", "WriteThroughView"]

K = TypeVar("K")
V = TypeVar("V")


class ViewKeys(Generic[K, V]):
    """What the sync and async views share: ids to keys, and each id's tags."""

    def __init__(
        self,
        prefix: str,
        policy: FillPolicy,
        tags: Callable[[K, V], Iterable[str]] | None,
    ) -> None:
        self.prefix = prefix
        self.policy = policy
        self._tags = tags
        self._key_prefix = prefix + ":"

    def key(self, id: K) -> str:
        """The logical key of ``id``, usable with ``cache.get()``: ``"user:7"`` for 7,
        ``"user:ada"`` for ``"ada"``, ``"user:%37"`` for ``"7"`` (see
        :func:`~cachekit.keycodec.render`).

        Raises:
            KeyEncodingError: ``id`` has no stable encoding.
        """
        return self._key_prefix + render(id)

    def _tags_of(self, id: K) -> Callable[[Any], Iterable[str]] | None:
        return None if self._tags is None else functools.partial(self._tags, id)


class ReadThroughView(ViewKeys[K, V]):
    """Values by id, loaded on a miss by ``load(id)`` or, in batches, ``load_many(ids)``.

    ``load`` returns ``None`` for an id that does not exist; that answer is cached
    for the cache's ``none_ttl`` (negative caching). ``load_many`` returns a mapping
    that leaves out the ids it cannot find; those are cached as ``None`` too.
    ``tags(id, value)`` puts each entry in key sets (:meth:`Cache.invalidate_tags`).
    """

    def __init__(
        self,
        cache: Cache,
        prefix: str,
        *,
        load: Callable[[K], V],
        load_many: Callable[[list[K]], Mapping[K, V]] | None = None,
        policy: FillPolicy | None = None,
        tags: Callable[[K, V], Iterable[str]] | None = None,
    ) -> None:
        super().__init__(prefix, cache.defaults if policy is None else policy, tags)
        self.cache = cache
        self._load = load
        self._load_many = load_many

    def get(self, id: K) -> V:
        """Return the value of ``id``, loading and caching it on a miss."""
        bkey = self.cache.backend_key(self.key(id))
        value = self.cache.lookup(bkey)
        if value is not MISSING and type(value) is not Entry:
            return value  # type: ignore[no-any-return]
        loader = functools.partial(self._load, id)
        return self.cache.load_or_serve(bkey, value, loader, self.policy, self._tags_of(id))  # type: ignore[no-any-return]

    def get_many(self, ids: Iterable[K]) -> dict[K, V]:
        """Return ``{id: value}`` for the ids that exist.

        One backend read for all ids; the misses are leased with one batch call,
        loaded with one ``load_many`` call (or ``load`` per id without it) and stored
        with one batch fill per TTL.
        """
        cache = self.cache
        by_bkey = {cache.backend_key(self.key(id_)): id_ for id_ in ids}
        found = cache.run(reads.lookup_many(cache, list(by_bkey)))
        missing = {bkey: id_ for bkey, id_ in by_bkey.items() if bkey not in found}
        if missing:
            found.update(self._load_missing(missing))
        return {by_bkey[bkey]: value for bkey, value in found.items() if value is not None}

    def _load_missing(self, missing: dict[str, K]) -> dict[str, Any]:
        cache, policy = self.cache, self.policy
        if policy.lease_ttl is not None:
            return cache.run(
                batches.load_many_under_lease(
                    cache,
                    missing,
                    self._batch_loader,
                    self._load,
                    policy=policy,
                    tags_of=self._tags,
                )
            )
        # Leases off (the unprotected baseline): one load per id, no batching.
        return {
            bkey: cache.load_or_serve(
                bkey, MISSING, functools.partial(self._load, id_), policy, self._tags_of(id_)
            )
            for bkey, id_ in missing.items()
        }

    def _batch_loader(self, ids: list[K]) -> Mapping[K, Any]:
        """Load ids in one ``load_many`` call, or one ``load`` call each without it
        (the caller counts one load; the extra per-id calls are counted here)."""
        if self._load_many is not None:
            return self._load_many(ids)
        self.cache.counters.loads += len(ids) - 1
        return {id_: self._load(id_) for id_ in ids}

    def invalidate(self, id: K) -> None:
        """Drop the cached value of ``id``; the next read loads it again."""
        self.cache.delete(self.key(id))

    def invalidate_many(self, ids: Iterable[K]) -> None:
        """Drop the cached values of ``ids`` in one backend round trip."""
        self.cache.delete_many([self.key(id_) for id_ in ids])


class WriteThroughView(ReadThroughView[K, V]):
    """A read-through view whose writes reach the system of record first.

    ``put`` calls ``save(id, value)`` and changes the cache only if it returned (a
    failing ``save`` leaves the cache as it was), by invalidating the entry and
    reloading it under a lease. ``delete`` calls ``remove(id)``, then drops the entry.
    """

    def __init__(
        self,
        cache: Cache,
        prefix: str,
        *,
        load: Callable[[K], V],
        save: Callable[[K, V], object],
        remove: Callable[[K], object],
        load_many: Callable[[list[K]], Mapping[K, V]] | None = None,
        policy: FillPolicy | None = None,
        tags: Callable[[K, V], Iterable[str]] | None = None,
    ) -> None:
        super().__init__(cache, prefix, load=load, load_many=load_many, policy=policy, tags=tags)
        self._save = save
        self._remove = remove

    def put(self, id: K, value: V) -> None:
        """Save ``value`` to the system of record, then refresh the cache from it.

        The cache is never set unconditionally after the save: with two writers that
        save A then B, an unconditional set could land A last. Instead the entry is
        deleted, which also voids any fill in flight, and reloaded under a lease, so
        the cache holds whatever the record holds once the last writer is done. This
        costs one ``load`` per write and spares readers a stampede after it.

        Raises:
            BackendError: the entry could not be invalidated; it may be stale.
        """
        self._save(id, value)
        self.invalidate(id)
        self.get(id)

    def delete(self, id: K) -> None:
        """Remove ``id`` from the system of record, then from the cache."""
        self._remove(id)
        self.cache.delete(self.key(id))
