"""AsyncCache: the asyncio driver of the core's flows, with the same API as ``Cache``.

Every rule lives in :mod:`cachekit.core`; ``AsyncCache`` performs what the flows ask for
with ``await``: async backend calls, ``asyncio.sleep`` (a lease waiter never blocks the
event loop) and awaited loaders. In one process, tasks that miss on the same key share
one miss path: one lease attempt, one poll loop, one loader call.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, ParamSpec, TypeVar, Unpack, cast, overload

from cachekit.async_decorators import AsyncCachedFunction, acached
from cachekit.async_replayer import Replayer
from cachekit.async_views import AsyncReadThroughView, AsyncWriteThroughView
from cachekit.backends.base import MISSING, AsyncBackend, Backend
from cachekit.backends.proxy import InProcessAsync
from cachekit.breaker import AsyncBreakerBackend, CircuitBreaker
from cachekit.core import fills, freshness, leases, reads, writes
from cachekit.core import journal as journal_flows
from cachekit.core.ops import Call, Flow, Sleep
from cachekit.core.reads import FollowUp
from cachekit.core.state import CacheCore, TagsOf, tags_function
from cachekit.decorators import KeySpec, TagSpec
from cachekit.entries import Entry
from cachekit.exceptions import CacheError, ConfigurationError
from cachekit.policy import FillPolicy, PolicyOptions
from cachekit.serializers import Serializer
from cachekit.single_flight import SharedMisses
from cachekit.ttl import TTL, USE_DEFAULT, UseDefault

__all__ = ["AsyncCache"]

P = ParamSpec("P")
R = TypeVar("R")
K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


def _async_store(backend: AsyncBackend | Backend) -> AsyncBackend:
    """The backend as an async one: in-process storage is called inline."""
    if isinstance(backend, AsyncBackend):
        return backend
    if isinstance(backend, Backend) and backend.capabilities.in_process:
        return InProcessAsync(backend)
    if isinstance(backend, Backend):
        raise ConfigurationError(
            f"{backend!r} is a blocking backend: AsyncCache takes an async one "
            "(AsyncRedisBackend, AsyncMemcachedBackend) or an in-process MemoryBackend"
        )
    raise ConfigurationError(f"{backend!r} does not implement the cachekit AsyncBackend contract")


class AsyncCache(CacheCore):
    """One namespace of cached values over one backend, for asyncio code.

    Takes the arguments of :class:`~cachekit.Cache`, with an async backend
    (:class:`~cachekit.backends.redis.AsyncRedisBackend`,
    :class:`~cachekit.backends.memcached.AsyncMemcachedBackend`) or an in-process
    :class:`~cachekit.backends.memory.MemoryBackend`. Every method that may reach the
    backend is a coroutine. Invalidations that fail are journaled and replayed by a
    task on the running loop; ``await cache.aclose()`` (or ``async with``) replays what
    is left before the loop ends.
    """

    def __init__(
        self,
        backend: AsyncBackend | Backend,
        *,
        namespace: str = "default",
        ttl: TTL = 300.0,
        none_ttl: TTL | UseDefault = USE_DEFAULT,
        serializer: Serializer | None = None,
        lease_ttl: TTL = 5.0,
        lease_poll: float = 0.05,
        stale_ttl: TTL = None,
        early_refresh: float | None = None,
        clock: Callable[[], float] = time.time,
        breaker: CircuitBreaker | UseDefault | None = USE_DEFAULT,
        max_value_size: int | UseDefault | None = USE_DEFAULT,
    ) -> None:
        inner = _async_store(backend)
        super().__init__(
            inner.capabilities,
            identity=id(backend),
            namespace=namespace,
            ttl=ttl,
            none_ttl=none_ttl,
            serializer=serializer,
            lease_ttl=lease_ttl,
            lease_poll=lease_poll,
            stale_ttl=stale_ttl,
            early_refresh=early_refresh,
            clock=clock,
            breaker=breaker,
            max_value_size=max_value_size,
        )
        self.backend = backend
        self._direct: AsyncBackend = inner
        self.store: AsyncBackend = (
            inner if self.breaker is None else AsyncBreakerBackend(inner, self.breaker)
        )
        # In-process storage is read inline on the hit path: no coroutine per hit.
        inline = isinstance(inner, InProcessAsync) and self.breaker is None
        self.inline_get: Callable[[str], Any] | None = (
            cast(InProcessAsync, inner).inner.get if inline else None
        )
        self._misses = SharedMisses(self.counters)
        self._replayer = Replayer(self.journal, lambda: self.run(journal_flows.background(self)))
        self.lookup = self._make_lookup()

    def __repr__(self) -> str:
        return f"AsyncCache({self.backend!r}, namespace={self.namespace!r}, ttl={self.ttl!r})"

    async def __aenter__(self) -> AsyncCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Replay pending invalidations (a WARNING at exit names any left) and stop the
        background replay task. The backend stays open: it is the caller's."""
        await self._replayer.stop()  # first: a replay in flight must let go of the journal
        await self.replay_invalidations()

    # -- the driver -------------------------------------------------------------------------

    async def run(self, flow: Flow[T]) -> T:
        """Drive a flow of :mod:`cachekit.core` to its result, awaiting each operation it
        yields: a backend call, an ``asyncio.sleep``, or a loader call (whose result is
        awaited if it is awaitable). A cancellation is thrown into the flow, which
        releases what it holds (a lease) on the way out."""
        store, direct = self.store, self._direct
        result: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = flow.send(result) if error is None else flow.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            error = None
            try:
                if isinstance(op, Call):
                    result = await getattr(direct if op.direct else store, op.method)(*op.args)
                elif isinstance(op, Sleep):
                    await asyncio.sleep(op.seconds)
                    result = None
                else:
                    result = op.loader()
                    if inspect.isawaitable(result):
                        result = await result
            except GeneratorExit:  # this coroutine is being closed: so is the flow
                flow.close()
                raise
            except BaseException as exc:
                result, error = None, exc

    def _make_lookup(self) -> Callable[[str], Awaitable[Any]]:
        """The hit path, prebuilt: one backend call and a plain function, no generator
        (see :meth:`Cache._make_lookup`)."""
        core, journal, get, sync_get, run = (
            self,
            self.journal,
            self.store.get,
            self.inline_get,
            self.run,
        )
        first_look, follow_up, slow = reads.first_look, reads.follow_up, reads.lookup
        objects, counters, not_plain = self.objects, self.counters, reads.NOT_PLAIN

        reap = self._replayer.reap

        async def lookup(bkey: str) -> Any:
            if journal:
                reap()
                return await run(slow(core, bkey))
            try:
                raw = sync_get(bkey) if sync_get is not None else await get(bkey)
            except CacheError as exc:
                core.read_failed(exc)
                return MISSING
            if objects and type(raw) not in not_plain:  # a plain stored object: a hit
                counters.hits += 1
                return raw
            value = first_look(core, bkey, raw)
            if type(value) is FollowUp:
                return await run(follow_up(core, bkey, value.value))
            return value

        return lookup

    async def replay_invalidations(self) -> bool:
        """Replay journaled invalidations now, past the retry interval and the breaker;
        return whether none is left (see :mod:`cachekit.core.journal`)."""
        self._replayer.reap()
        return await self.run(journal_flows.settle(self, direct=True, force=True))

    # -- reads ----------------------------------------------------------------------------

    async def get(self, key: str, default: Any = MISSING) -> Any:
        """Return the cached value, or ``default`` (:data:`MISSING`) on a miss; never
        raises because of the backend (see :meth:`Cache.get`)."""
        value = await self.lookup(self.backend_key(key))
        if type(value) is Entry:
            return reads.read_without_loader(self, value)
        return default if value is MISSING else value

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Return ``{key: value}`` for the keys that hit, in one backend round trip."""
        bkeys = {self.backend_key(key): key for key in keys}
        found = await self.run(reads.lookup_many(self, list(bkeys)))
        return {bkeys[bkey]: value for bkey, value in found.items()}

    # -- writes ---------------------------------------------------------------------------

    async def set(
        self,
        key: str,
        value: Any,
        ttl: TTL | UseDefault = USE_DEFAULT,
        *,
        tags: Iterable[str] | None = None,
    ) -> None:
        """Store ``value`` under ``key``; fails open into the journal (see :meth:`Cache.set`)."""
        await self.run(writes.set_one(self, key, value, ttl, tags))
        self._misses.forget([self.backend_key(key)])

    async def set_many(
        self, mapping: Mapping[str, Any], ttl: TTL | UseDefault = USE_DEFAULT
    ) -> None:
        """Store every item, in one backend round trip per distinct TTL."""
        await self.run(writes.set_many(self, mapping, ttl))
        self._misses.forget([self.backend_key(key) for key in mapping])

    async def delete(self, key: str) -> None:
        """Remove ``key``; a failure is journaled and replayed (see :meth:`Cache.delete`)."""
        bkeys = [self.backend_key(key)]
        await self.run(writes.delete_many(self, bkeys))
        self._misses.forget(bkeys)

    async def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key, in one backend round trip; failures are journaled."""
        bkeys = [self.backend_key(key) for key in keys]
        await self.run(writes.delete_many(self, bkeys))
        self._misses.forget(bkeys)

    async def invalidate_tags(self, tags: Iterable[str]) -> None:
        """Remove every entry tagged with any of ``tags``, in two round trips."""
        await self.run(writes.invalidate_tags(self, tags))
        self._misses.forget(None)

    # -- cache-aside ----------------------------------------------------------------------

    async def get_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[V]],
        ttl: TTL | UseDefault = USE_DEFAULT,
        *,
        tags: Iterable[str] | Callable[[V], Iterable[str]] | None = None,
        **options: Unpack[PolicyOptions],
    ) -> V:
        """Return the cached value, or await ``loader()``, store its result and return
        it, under a lease (see :meth:`Cache.get_or_load`)."""
        bkey = self.backend_key(key)
        value = await self.lookup(bkey)
        if value is not MISSING and type(value) is not Entry:
            return value  # type: ignore[no-any-return]
        policy = self.policy(ttl, **options)
        return await self.load_or_serve(bkey, value, loader, policy, tags_function(tags))  # type: ignore[no-any-return]

    async def load_or_serve(
        self,
        bkey: str,
        found: Any,
        loader: Callable[[], Any],
        policy: FillPolicy,
        tags_of: TagsOf,
    ) -> Any:
        """After :attr:`lookup` returned ``found`` (MISSING or an annotated entry): the
        miss path, shared by every task of this cache that misses on ``bkey`` meanwhile
        (:mod:`cachekit.single_flight`), or the entry served and maybe refreshed."""
        if found is not MISSING:
            return await self.run(freshness.serve(self, bkey, found, loader, policy, tags_of))
        leases.refuse_reentry(self, (bkey,))  # joining our own miss path would deadlock
        lease_ttl = policy.lease_ttl or self.lease_ttl or leases.GRACE
        patience = lease_ttl + leases.GRACE + self.capabilities.ttl_slack  # as a waiter's

        def lead(outcome: leases.Outcome) -> Awaitable[Any]:
            return self.run(leases.load_and_fill(self, bkey, loader, policy, tags_of, outcome))

        def alone() -> Awaitable[Any]:
            return self.run(fills.load_uncached(self, loader))

        return await self._misses.share(bkey, lead, patience, alone)

    # -- strategies -------------------------------------------------------------------------

    @overload
    def cached(self, func: Callable[P, Awaitable[R]], /) -> AsyncCachedFunction[P, R]: ...

    @overload
    def cached(
        self,
        func: None = None,
        /,
        *,
        ttl: TTL | UseDefault = USE_DEFAULT,
        key: KeySpec | None = None,
        tags: TagSpec | None = None,
        **options: Unpack[PolicyOptions],
    ) -> Callable[[Callable[P, Awaitable[R]]], AsyncCachedFunction[P, R]]: ...

    def cached(
        self,
        func: Callable[P, Awaitable[R]] | None = None,
        /,
        *,
        ttl: TTL | UseDefault = USE_DEFAULT,
        key: KeySpec | None = None,
        tags: TagSpec | None = None,
        **options: Unpack[PolicyOptions],
    ) -> (
        AsyncCachedFunction[P, R] | Callable[[Callable[P, Awaitable[R]]], AsyncCachedFunction[P, R]]
    ):
        """Decorate an ``async def`` for cache-aside, as ``@cache.cached`` or
        ``@cache.cached(ttl=..., ...)``; see :meth:`Cache.cached`."""
        decorate: Callable[[Callable[P, Awaitable[R]]], AsyncCachedFunction[P, R]] = acached(
            self, key=key, policy=self.policy(ttl, **options), tags=tags
        )
        return decorate if func is None else decorate(func)

    def read_through(
        self,
        prefix: str,
        *,
        load: Callable[[K], Awaitable[V]],
        load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]] | None = None,
        ttl: TTL | UseDefault = USE_DEFAULT,
        tags: Callable[[K, V], Iterable[str]] | None = None,
        **options: Unpack[PolicyOptions],
    ) -> AsyncReadThroughView[K, V]:
        """A keyed view whose misses are filled by async ``load``/``load_many``."""
        policy = self.policy(ttl, **options)
        return AsyncReadThroughView(
            self, prefix, load=load, load_many=load_many, policy=policy, tags=tags
        )

    def write_through(
        self,
        prefix: str,
        *,
        load: Callable[[K], Awaitable[V]],
        save: Callable[[K, V], Awaitable[object]],
        remove: Callable[[K], Awaitable[object]],
        load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]] | None = None,
        ttl: TTL | UseDefault = USE_DEFAULT,
        tags: Callable[[K, V], Iterable[str]] | None = None,
        **options: Unpack[PolicyOptions],
    ) -> AsyncWriteThroughView[K, V]:
        """A read-through view whose writes go to the system of record, then the cache."""
        policy = self.policy(ttl, **options)
        return AsyncWriteThroughView(
            self,
            prefix,
            load=load,
            save=save,
            remove=remove,
            load_many=load_many,
            policy=policy,
            tags=tags,
        )
