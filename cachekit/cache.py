"""The Cache facade: the blocking driver of the core's flows, and the public API.

Every rule (keys, TTL defaults, leases, fills, freshness, tags, the journal) lives in
:mod:`cachekit.core`; ``Cache`` performs what the flows ask for with blocking backend
calls and ``time.sleep``. :class:`~cachekit.AsyncCache` drives the same flows with
``await``.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ParamSpec, TypeVar, Unpack, overload

from cachekit.backends.base import MISSING, Backend
from cachekit.breaker import BreakerBackend, CircuitBreaker
from cachekit.core import freshness, leases, reads, writes
from cachekit.core import journal as journal_flows
from cachekit.core.ops import Call, Flow, Sleep
from cachekit.core.reads import FollowUp
from cachekit.core.state import CacheCore, TagsOf, tags_function
from cachekit.decorators import CachedFunction, KeySpec, TagSpec, cached
from cachekit.entries import Entry
from cachekit.exceptions import CacheError, ConfigurationError
from cachekit.policy import FillPolicy, PolicyOptions
from cachekit.serializers import Serializer
from cachekit.ttl import TTL, USE_DEFAULT, UseDefault
from cachekit.views import ReadThroughView, WriteThroughView

__all__ = ["Cache"]

P = ParamSpec("P")
R = TypeVar("R")
K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class Cache(CacheCore):
    """One namespace of cached values over one backend.

    Args:
        backend: where entries live; see :mod:`cachekit.backends`.
        namespace: prefixes every backend key, so caches sharing a server never collide.
        ttl: default time to live; ``None`` keeps entries until evicted.
        none_ttl: time to live of a loader's ``None`` result (negative caching); ``0``
            disables it; by default the smaller of ``ttl`` and 30 seconds.
        serializer: encodes values for network backends; ``JsonSerializer()`` by
            default. Ignored by backends that store objects (memory, unless
            ``MemoryBackend(serialize=True)``).
        lease_ttl: how long a miss's lease lives (see :mod:`cachekit.core.leases`): the
            longest a loader may run before another caller takes over. ``None``
            turns leases off (plain get/load/set, open to stale sets and stampedes).
        lease_poll: the longest interval, in seconds, between a waiter's polls (at
            most one second: it bounds how late a waiter sees the holder's value).
        stale_ttl: opt-in stale-while-revalidate: how long past its TTL an entry is
            still served while one caller reloads it (see :mod:`cachekit.core.freshness`).
        early_refresh: opt-in XFetch ``beta`` (1.0 is the usual choice): refresh hot
            entries shortly before they expire, by one caller, using the measured
            load time.
        clock: the wall clock of entry freshness, shared by every process reading
            the server; inject one to test stale and early refresh without sleeping.
        breaker: the circuit breaker of a network backend (a default one unless
            ``None``); see :mod:`cachekit.breaker`. In-process backends get none.
        max_value_size: the largest encoded value stored, in bytes; larger ones are
            counted (``stats().oversize``) and not stored. Defaults to the backend's
            limit (memcached's item size), if it has one.
    """

    def __init__(
        self,
        backend: Backend,
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
        if not isinstance(backend, Backend):
            hint = " (an async backend: use AsyncCache)" if hasattr(backend, "aclose") else ""
            raise ConfigurationError(
                f"{backend!r} does not implement the cachekit Backend contract{hint}"
            )
        super().__init__(
            backend.capabilities,
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
        # What every call goes through: the backend, behind its breaker if it has one.
        self.store: Backend = (
            backend if self.breaker is None else BreakerBackend(backend, self.breaker)
        )
        self._replayer_thread: threading.Thread | None = None
        self.journal.wake = self._start_replayer
        self.journal.alive = self._replayer_alive
        self.journal.on_exit = self._replay_at_exit
        self.lookup = self._make_lookup()

    def __repr__(self) -> str:
        return f"Cache({self.backend!r}, namespace={self.namespace!r}, ttl={self.ttl!r})"

    # -- the driver -------------------------------------------------------------------------

    def run(self, flow: Flow[T]) -> T:
        """Drive a flow of :mod:`cachekit.core` to its result, performing each operation
        it yields: a backend call, a ``time.sleep``, or a loader call."""
        store, backend = self.store, self.backend
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
                    result = getattr(backend if op.direct else store, op.method)(*op.args)
                elif isinstance(op, Sleep):
                    time.sleep(op.seconds)
                    result = None
                else:
                    result = op.loader()
            except BaseException as exc:
                result, error = None, exc

    def _make_lookup(self) -> Callable[[str], Any]:
        """The hit path, prebuilt: one backend call and a plain function, no generator.

        Returns the value, an annotated :class:`~cachekit.entries.Entry` (for the
        caller to serve, see :meth:`serve_entry`), or MISSING.
        """
        core, journal, get, run = self, self.journal, self.store.get, self.run
        first_look, follow_up, slow = reads.first_look, reads.follow_up, reads.lookup
        objects, counters, not_plain = self.objects, self.counters, reads.NOT_PLAIN

        def lookup(bkey: str) -> Any:
            if journal:
                return run(slow(core, bkey))
            try:
                raw = get(bkey)
            except CacheError as exc:
                core.read_failed(exc)
                return MISSING
            if objects and type(raw) not in not_plain:  # a plain stored object: a hit
                counters.hits += 1
                return raw
            value = first_look(core, bkey, raw)
            if type(value) is FollowUp:
                return run(follow_up(core, bkey, value.value))
            return value

        return lookup

    def _start_replayer(self) -> None:
        generation = self.journal.generation
        thread = threading.Thread(
            target=self._replayer, args=(generation,), name="cachekit-journal", daemon=True
        )
        thread.start()
        self._replayer_thread = thread

    def _replayer(self, generation: int) -> None:
        try:
            self.run(journal_flows.background(self))
        except BaseException:
            self.journal.stopped(generation)
            raise

    def _replayer_alive(self) -> bool:
        thread = self._replayer_thread
        return thread is None or thread.is_alive()  # None: starting, not yet recorded

    def _replay_at_exit(self) -> bool:
        return self.run(
            journal_flows.settle(self, direct=True, force=True, wait=journal_flows.EXIT_WAIT)
        )

    def replay_invalidations(self) -> bool:
        """Replay journaled invalidations now, past the retry interval and the breaker;
        return whether none is left (see :mod:`cachekit.core.journal`)."""
        return self.run(journal_flows.settle(self, direct=True, force=True))

    # -- reads ----------------------------------------------------------------------------

    def get(self, key: str, default: Any = MISSING) -> Any:
        """Return the cached value, or ``default`` (:data:`MISSING`) on a miss.

        Never raises because of the backend: a failing server is counted as an error
        and answered as a miss.
        """
        value = self.lookup(self.backend_key(key))
        if type(value) is Entry:
            return reads.read_without_loader(self, value)
        return default if value is MISSING else value

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Return ``{key: value}`` for the keys that hit, in one backend round trip."""
        bkeys = {self.backend_key(key): key for key in keys}
        found = self.run(reads.lookup_many(self, list(bkeys)))
        return {bkeys[bkey]: value for bkey, value in found.items()}

    # -- writes ---------------------------------------------------------------------------

    def set(
        self,
        key: str,
        value: Any,
        ttl: TTL | UseDefault = USE_DEFAULT,
        *,
        tags: Iterable[str] | None = None,
    ) -> None:
        """Store ``value`` under ``key``.

        Fails open, like :meth:`delete`: if the backend fails, the replacement is
        journaled as a delete of the old entry (:mod:`cachekit.core.journal`), so this
        cache reads the key as a miss at once and no process reads the old value once
        the server answers. A ``None`` value with negative caching off (``none_ttl=0``)
        stores nothing and removes the old entry.

        Args:
            ttl: seconds or a timedelta; ``None`` for no expiry; omitted, the cache's
                default (``none_ttl`` for a ``None`` value; with ``none_ttl=0`` a
                ``None`` is not stored and the old entry is deleted).
            tags: key sets the entry belongs to: :meth:`invalidate_tags` with any of
                them removes it (see :mod:`cachekit.core.tags`).

        Raises:
            SerializationError: the serializer cannot encode ``value`` (a TypeError);
                the old entry is removed.
            BackendError: only when :meth:`delete` would: the journal is full.
        """
        self.run(writes.set_one(self, key, value, ttl, tags))

    def set_many(self, mapping: Mapping[str, Any], ttl: TTL | UseDefault = USE_DEFAULT) -> None:
        """Store every item, in one backend round trip per distinct TTL (``None`` values
        take ``none_ttl``, as in :meth:`set`); fails open as :meth:`set` does."""
        self.run(writes.set_many(self, mapping, ttl))

    def delete(self, key: str) -> None:
        """Remove ``key``; removing an absent key is not an error.

        If the backend fails, the delete is journaled (:mod:`cachekit.core.journal`):
        this cache treats the key as a miss at once and replays the delete when the
        server answers, so the old entry is never read again.

        Raises:
            BackendError: the journal is full, so the invalidation is lost.
        """
        self.run(writes.delete_many(self, [self.backend_key(key)]))

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key, in one backend round trip; failures are journaled."""
        self.run(writes.delete_many(self, [self.backend_key(key) for key in keys]))

    def invalidate_tags(self, tags: Iterable[str]) -> None:
        """Remove every entry tagged with any of ``tags``, in two round trips.

        If the backend fails, the tags are journaled (:mod:`cachekit.core.journal`):
        honoured by this cache at once and replayed when the server answers.

        Raises:
            BackendError: the journal is full, so the invalidation is lost.
        """
        self.run(writes.invalidate_tags(self, tags))

    # -- cache-aside ----------------------------------------------------------------------

    def get_or_load(
        self,
        key: str,
        loader: Callable[[], V],
        ttl: TTL | UseDefault = USE_DEFAULT,
        *,
        tags: Iterable[str] | Callable[[V], Iterable[str]] | None = None,
        **options: Unpack[PolicyOptions],
    ) -> V:
        """Return the cached value, or call ``loader()``, store its result and return it.

        The miss runs under a lease (:mod:`cachekit.core.leases`): concurrent misses on
        the key call the loader once, and a value loaded before a concurrent write or
        invalidation is not stored. A ``None`` result is stored for ``none_ttl``. A
        backend failure never raises here: the loader's value is returned and the
        failure counted. ``tags`` (a list, or a function of the loaded value) puts the
        entry in key sets. The keyword options override the cache's for this call.
        """
        bkey = self.backend_key(key)
        value = self.lookup(bkey)
        if value is not MISSING and type(value) is not Entry:
            return value  # type: ignore[no-any-return]
        if inspect.iscoroutinefunction(loader):  # checked on the miss path only
            raise TypeError("get_or_load() got an async loader: use AsyncCache for async code")
        policy = self.policy(ttl, **options)
        return self.load_or_serve(bkey, value, loader, policy, tags_function(tags))  # type: ignore[no-any-return]

    def load_or_serve(
        self, bkey: str, found: Any, loader: Callable[[], Any], policy: FillPolicy, tags_of: TagsOf
    ) -> Any:
        """After :attr:`lookup` returned ``found`` (MISSING or an annotated entry): the
        miss path under a lease, or the entry served and maybe refreshed."""
        if found is MISSING:
            return self.run(leases.load_and_fill(self, bkey, loader, policy, tags_of))
        return self.run(freshness.serve(self, bkey, found, loader, policy, tags_of))

    # -- strategies -------------------------------------------------------------------------

    @overload
    def cached(self, func: Callable[P, R], /) -> CachedFunction[P, R]: ...

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
    ) -> Callable[[Callable[P, R]], CachedFunction[P, R]]: ...

    def cached(
        self,
        func: Callable[P, R] | None = None,
        /,
        *,
        ttl: TTL | UseDefault = USE_DEFAULT,
        key: KeySpec | None = None,
        tags: TagSpec | None = None,
        **options: Unpack[PolicyOptions],
    ) -> CachedFunction[P, R] | Callable[[Callable[P, R]], CachedFunction[P, R]]:
        """Decorate a function for cache-aside, as ``@cache.cached`` (the cache's
        defaults) or ``@cache.cached(ttl=..., ...)``; see :func:`cachekit.decorators.cached`."""
        decorate: Callable[[Callable[P, R]], CachedFunction[P, R]] = cached(
            self, key=key, policy=self.policy(ttl, **options), tags=tags
        )
        return decorate if func is None else decorate(func)

    def read_through(
        self,
        prefix: str,
        *,
        load: Callable[[K], V],
        load_many: Callable[[list[K]], Mapping[K, V]] | None = None,
        ttl: TTL | UseDefault = USE_DEFAULT,
        tags: Callable[[K, V], Iterable[str]] | None = None,
        **options: Unpack[PolicyOptions],
    ) -> ReadThroughView[K, V]:
        """A keyed view whose misses are filled by ``load``/``load_many``."""
        policy = self.policy(ttl, **options)
        return ReadThroughView(
            self, prefix, load=load, load_many=load_many, policy=policy, tags=tags
        )

    def write_through(
        self,
        prefix: str,
        *,
        load: Callable[[K], V],
        save: Callable[[K, V], object],
        remove: Callable[[K], object],
        load_many: Callable[[list[K]], Mapping[K, V]] | None = None,
        ttl: TTL | UseDefault = USE_DEFAULT,
        tags: Callable[[K, V], Iterable[str]] | None = None,
        **options: Unpack[PolicyOptions],
    ) -> WriteThroughView[K, V]:
        """A read-through view whose writes go to the system of record, then the cache."""
        policy = self.policy(ttl, **options)
        return WriteThroughView(
            self,
            prefix,
            load=load,
            save=save,
            remove=remove,
            load_many=load_many,
            policy=policy,
            tags=tags,
        )
