"""Read-through and write-through views: a keyed cache whose misses a loader fills.

A view turns ids into logical keys (``"user:7"``) once, in :meth:`ReadThroughView.key`,
so direct ``cache.get(view.key(7))`` calls and the view always agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from cachekit.backends.base import MISSING
from cachekit.exceptions import CacheError
from cachekit.ttl import TTL, USE_DEFAULT, UseDefault

if TYPE_CHECKING:
    from cachekit.cache import Cache

__all__ = ["ReadThroughView", "WriteThroughView"]

K = TypeVar("K")
V = TypeVar("V")


class ReadThroughView(Generic[K, V]):
    """Values by id, loaded on a miss by ``load(id)`` or, in batches, ``load_many(ids)``.

    ``load`` returns ``None`` for an id that does not exist; that answer is cached
    for the cache's ``none_ttl`` (negative caching). ``load_many`` returns a mapping
    that leaves out the ids it cannot find; those are cached as ``None`` too.
    """

    def __init__(
        self,
        cache: Cache,
        prefix: str,
        *,
        load: Callable[[K], V],
        load_many: Callable[[list[K]], Mapping[K, V]] | None = None,
        ttl: TTL | UseDefault = USE_DEFAULT,
    ) -> None:
        self.cache = cache
        self.prefix = prefix
        self.ttl = ttl
        self._load = load
        self._load_many = load_many
        self._key_prefix = prefix + ":"

    def key(self, id: K) -> str:
        """The logical key of ``id`` (``"user:7"``), usable with ``cache.get()``."""
        return self._key_prefix + str(id)

    def get(self, id: K) -> V:
        """Return the value of ``id``, loading and caching it on a miss."""
        bkey = self.cache.backend_key(self.key(id))
        value = self.cache._lookup(bkey)
        if value is not MISSING:
            return value  # type: ignore[no-any-return]
        return self.cache._load_and_fill(bkey, lambda: self._load(id), self.ttl)

    def get_many(self, ids: Iterable[K]) -> dict[K, V]:
        """Return ``{id: value}`` for the ids that exist.

        One backend read for all ids; the misses are loaded with one ``load_many``
        call (or ``load`` per id without it) and stored with one ``set_many``.
        """
        cache = self.cache
        by_bkey = {cache.backend_key(self.key(id_)): id_ for id_ in ids}
        found = cache._lookup_many(list(by_bkey))
        result = {by_bkey[bkey]: value for bkey, value in found.items() if value is not None}
        missing = [id_ for bkey, id_ in by_bkey.items() if bkey not in found]
        if missing:
            loaded = self._load_missing(missing)
            fills = {}
            for bkey, id_ in by_bkey.items():
                if bkey not in found:
                    value = loaded.get(id_)
                    fills[bkey] = value
                    if value is not None:
                        result[id_] = value
            cache._fill_many(fills, self.ttl)
        return result

    def _load_missing(self, ids: list[K]) -> Mapping[K, Any]:
        if self._load_many is not None:
            loaded = self._load_many(ids)
            self.cache._counters.loads += 1
            return loaded
        self.cache._counters.loads += len(ids)
        return {id_: self._load(id_) for id_ in ids}

    def invalidate(self, id: K) -> None:
        """Drop the cached value of ``id``; the next read loads it again."""
        self.cache.delete(self.key(id))

    def invalidate_many(self, ids: Iterable[K]) -> None:
        """Drop the cached values of ``ids`` in one backend round trip."""
        self.cache.delete_many([self.key(id_) for id_ in ids])


class WriteThroughView(ReadThroughView[K, V]):
    """A read-through view whose writes reach the system of record first.

    ``put`` calls ``save(id, value)`` and changes the cache only if it returned; a
    failing ``save`` leaves the cache as it was. ``delete`` calls ``remove(id)``, then
    drops the entry.
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
        ttl: TTL | UseDefault = USE_DEFAULT,
    ) -> None:
        super().__init__(cache, prefix, load=load, load_many=load_many, ttl=ttl)
        self._save = save
        self._remove = remove

    def put(self, id: K, value: V) -> None:
        """Save ``value`` to the system of record, then store it in the cache."""
        self._save(id, value)
        key = self.key(id)
        try:
            self.cache.set(key, value, ttl=self.ttl)
        except CacheError:
            # The record changed but the cache could not take the new value: the old
            # entry must not survive, so drop it; if even that fails, say so loudly.
            self.cache._counters.errors += 1
            self.cache.delete(key)

    def delete(self, id: K) -> None:
        """Remove ``id`` from the system of record, then from the cache."""
        self._remove(id)
        self.cache.delete(self.key(id))
