"""Read-through and write-through views for ``AsyncCache``: async loaders and savers.

The twins of :mod:`cachekit.views`, sharing its keys (:class:`ViewKeys`) and the core's
batch miss path (:func:`cachekit.core.batches.load_many_under_lease`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from cachekit.backends.base import MISSING
from cachekit.core import batches, reads
from cachekit.entries import Entry
from cachekit.policy import FillPolicy
from cachekit.views import ViewKeys

if TYPE_CHECKING:
    from cachekit.async_cache import AsyncCache

__all__ = ["AsyncReadThroughView", "AsyncWriteThroughView"]

K = TypeVar("K")
V = TypeVar("V")


class AsyncReadThroughView(ViewKeys[K, V]):
    """:class:`~cachekit.views.ReadThroughView` with async ``load`` and ``load_many``."""

    def __init__(
        self,
        cache: AsyncCache,
        prefix: str,
        *,
        load: Callable[[K], Awaitable[V]],
        load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]] | None = None,
        policy: FillPolicy | None = None,
        tags: Callable[[K, V], Iterable[str]] | None = None,
    ) -> None:
        super().__init__(prefix, cache.defaults if policy is None else policy, tags)
        self.cache = cache
        self._load = load
        self._load_many = load_many

    async def get(self, id: K) -> V:
        """Return the value of ``id``, loading and caching it on a miss."""
        bkey = self.cache.backend_key(self.key(id))
        value = await self.cache.lookup(bkey)
        if value is not MISSING and type(value) is not Entry:
            return value  # type: ignore[no-any-return]
        loader = functools.partial(self._load, id)
        return await self.cache.load_or_serve(bkey, value, loader, self.policy, self._tags_of(id))  # type: ignore[no-any-return]

    async def get_many(self, ids: Iterable[K]) -> dict[K, V]:
        """Return ``{id: value}`` for the ids that exist, with the round trips of
        :meth:`ReadThroughView.get_many`."""
        cache = self.cache
        by_bkey = {cache.backend_key(self.key(id_)): id_ for id_ in ids}
        found = await cache.run(reads.lookup_many(cache, list(by_bkey)))
        missing = {bkey: id_ for bkey, id_ in by_bkey.items() if bkey not in found}
        if missing:
            found.update(await self._load_missing(missing))
        return {by_bkey[bkey]: value for bkey, value in found.items() if value is not None}

    async def _load_missing(self, missing: dict[str, K]) -> dict[str, Any]:
        cache, policy = self.cache, self.policy
        if policy.lease_ttl is not None:
            flow = batches.load_many_under_lease(
                cache, missing, self._batch_loader, self._load, policy=policy, tags_of=self._tags
            )
            return await cache.run(flow)
        # Leases off (the unprotected baseline): one load per id, no batching.
        return {
            bkey: await cache.load_or_serve(
                bkey, MISSING, functools.partial(self._load, id_), policy, self._tags_of(id_)
            )
            for bkey, id_ in missing.items()
        }

    async def _batch_loader(self, ids: list[K]) -> Mapping[K, Any]:
        """Load ids with one ``load_many``, or one ``load`` each without it (counted)."""
        if self._load_many is not None:
            return await self._load_many(ids)
        self.cache.counters.loads += len(ids) - 1
        return {id_: await self._load(id_) for id_ in ids}

    async def invalidate(self, id: K) -> None:
        """Drop the cached value of ``id``; the next read loads it again."""
        await self.cache.delete(self.key(id))

    async def invalidate_many(self, ids: Iterable[K]) -> None:
        """Drop the cached values of ``ids`` in one backend round trip."""
        await self.cache.delete_many([self.key(id_) for id_ in ids])


class AsyncWriteThroughView(AsyncReadThroughView[K, V]):
    """:class:`~cachekit.views.WriteThroughView` with async ``save`` and ``remove``."""

    def __init__(
        self,
        cache: AsyncCache,
        prefix: str,
        *,
        load: Callable[[K], Awaitable[V]],
        save: Callable[[K, V], Awaitable[object]],
        remove: Callable[[K], Awaitable[object]],
        load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]] | None = None,
        policy: FillPolicy | None = None,
        tags: Callable[[K, V], Iterable[str]] | None = None,
    ) -> None:
        super().__init__(cache, prefix, load=load, load_many=load_many, policy=policy, tags=tags)
        self._save = save
        self._remove = remove

    async def put(self, id: K, value: V) -> None:
        """Save, then invalidate and reload under a lease (see ``WriteThroughView.put``).

        Raises:
            BackendError: the entry could not be invalidated; it may be stale.
        """
        await self._save(id, value)
        await self.invalidate(id)
        await self.get(id)

    async def delete(self, id: K) -> None:
        """Remove ``id`` from the system of record, then from the cache."""
        await self._remove(id)
        await self.cache.delete(self.key(id))
