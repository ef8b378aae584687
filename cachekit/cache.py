"""The Cache facade: namespaced keys, TTL defaults, serialization, stats and fail-open reads.

Policy lives here and storage in the backend, so every strategy (cache-aside,
read-through, write-through, the decorator) shares one implementation of each rule.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ParamSpec, TypeVar, Unpack, overload

from cachekit import codec
from cachekit.backends.base import MISSING, Backend
from cachekit.breaker import BreakerBackend, CircuitBreaker
from cachekit.decorators import CachedFunction, KeySpec, TagSpec, cached
from cachekit.entries import ENTRY_BYTE, Entry, Loaded, pack, unpack
from cachekit.exceptions import (
    UNSTORABLE,
    BackendError,
    CacheError,
    ConfigurationError,
    DecodeError,
    SerializationError,
    ValueTooLarge,
)
from cachekit.fills import token_ttl
from cachekit.freshness import read_without_loader, serve
from cachekit.invalidation import TagGuard, invalidate_tags, replay_invalidations, stale_entries
from cachekit.journal import Journal
from cachekit.keys import make_backend_key, validate_namespace
from cachekit.leases import load_and_fill
from cachekit.markers import MARKER_BYTE, Marker
from cachekit.policy import FillPolicy, PolicyOptions, resolve
from cachekit.serializers import JsonSerializer, Serializer
from cachekit.stats import CacheStats, Counters
from cachekit.ttl import TTL, USE_DEFAULT, UseDefault, poll_seconds, to_seconds
from cachekit.views import ReadThroughView, WriteThroughView

__all__ = ["Cache"]

logger = logging.getLogger("cachekit")

P = ParamSpec("P")
R = TypeVar("R")
K = TypeVar("K")
V = TypeVar("V")


_NONE_TTL_CAP = 30.0
_LOG_INTERVAL = 10.0


#: A function from a loaded value to its tags, or ``None`` for an untagged fill.
TagsOf = Callable[[Any], Iterable[str]] | None


def _tags_function(tags: Iterable[str] | Callable[[Any], Iterable[str]] | None) -> TagsOf:
    if tags is None or callable(tags):
        return tags
    fixed = list(tags)
    return lambda value: fixed


class Cache:
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
        lease_ttl: how long a miss's lease lives (see :mod:`cachekit.leases`): the
            longest a loader may run before another caller takes over. ``None``
            turns leases off (plain get/load/set, open to stale sets and stampedes).
        lease_poll: the longest interval, in seconds, between a waiter's polls (at
            most one second: it bounds how late a waiter sees the holder's value).
        stale_ttl: opt-in stale-while-revalidate: how long past its TTL an entry is
            still served while one caller reloads it (see :mod:`cachekit.freshness`).
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
            raise ConfigurationError(
                f"{backend!r} does not implement the cachekit Backend contract"
            )
        if breaker is USE_DEFAULT:
            # In-process storage never fails (even serialize=True, which stores bytes); a
            # pool with a breaker per server must not have one server's outage open a
            # breaker over all of them.
            caps = backend.capabilities
            breaker = None if caps.in_process or caps.isolates_failures else CircuitBreaker()
        self.breaker = breaker
        self.backend = backend
        # What every call goes through: the backend, behind its breaker if it has one.
        self.store: Backend = backend if breaker is None else BreakerBackend(backend, breaker)
        self.max_value_size: int | None = (
            backend.capabilities.max_value_size if max_value_size is USE_DEFAULT else max_value_size
        )
        self.journal = Journal(
            functools.partial(replay_invalidations, self, self.store),
            # The background replay goes straight to the server: it is the breaker's
            # probe, so no cool-down delays it (see cachekit.journal).
            functools.partial(replay_invalidations, self, backend, breaker=breaker),
        )
        # Leases whose writes failed in flight, {bkey: marker}; see leases.py.
        self.lost_leases: dict[str, Any] = {}
        self.namespace = validate_namespace(namespace)
        self.ttl = to_seconds(ttl)
        self.none_ttl = self._none_ttl(none_ttl)
        self.serializer: Serializer = serializer if serializer is not None else JsonSerializer()
        if not isinstance(self.serializer, Serializer):
            raise ConfigurationError(f"{serializer!r} does not implement dumps(value, key)/loads")
        self.lease_ttl = to_seconds(lease_ttl, what="lease_ttl")
        self.clock = clock
        self.defaults = resolve(
            FillPolicy(USE_DEFAULT, self.lease_ttl, None, None),
            stale_ttl=stale_ttl,
            early_refresh=early_refresh,
        )
        self.lease_poll = poll_seconds(lease_poll)
        self._prefix = self.namespace + ":"
        self._policy = backend.capabilities.key_policy
        self._objects = backend.capabilities.stores_objects
        self._backend_get = self.store.get
        self._counters = Counters()
        self._last_log = float("-inf")

    def _none_ttl(self, none_ttl: TTL | UseDefault) -> float | None:
        if none_ttl is USE_DEFAULT:
            return _NONE_TTL_CAP if self.ttl is None else min(self.ttl, _NONE_TTL_CAP)
        if none_ttl == 0:
            return 0.0
        return to_seconds(none_ttl, what="none_ttl")

    def __repr__(self) -> str:
        return f"Cache({self.backend!r}, namespace={self.namespace!r}, ttl={self.ttl!r})"

    # -- keys ---------------------------------------------------------------------------

    def backend_key(self, key: str) -> str:
        """Return ``key`` exactly as stored in the backend: namespaced, hashed if needed."""
        if self._policy is None and type(key) is str:
            return self._prefix + key
        return make_backend_key(self._prefix, key, self._policy)

    # -- reads ----------------------------------------------------------------------------

    def get(self, key: str, default: Any = MISSING) -> Any:
        """Return the cached value, or ``default`` (:data:`MISSING`) on a miss.

        Never raises because of the backend: a failing server is counted as an error
        and answered as a miss.
        """
        value = self._lookup(self.backend_key(key))
        if type(value) is Entry:
            return read_without_loader(self, value)
        return default if value is MISSING else value

    def policy(
        self, ttl: TTL | UseDefault = USE_DEFAULT, **options: Unpack[PolicyOptions]
    ) -> FillPolicy:
        """This cache's fill options with the given overrides, validated."""
        return resolve(self.defaults, ttl=ttl, **options)

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Return ``{key: value}`` for the keys that hit, in one backend round trip."""
        bkeys = {self.backend_key(key): key for key in keys}
        found = self._lookup_many(list(bkeys))
        return {bkeys[bkey]: value for bkey, value in found.items()}

    def _lookup(self, bkey: str) -> Any:
        """The hit path: one backend call, then decode; counts the outcome."""
        if self.journal and self._journaled(bkey):
            self._counters.misses += 1
            return MISSING
        try:
            raw = self._backend_get(bkey)
        except CacheError as exc:
            self._read_failed(exc)
            return MISSING
        if raw is not MISSING:
            # Object backends are checked inline: one call less on the hottest path.
            if self._objects:
                value = MISSING if type(raw) is Marker else raw
            else:
                value = self._decode(bkey, raw)
            if type(value) is Entry and value.tags and self._drop_invalidated({bkey: value}):
                value = MISSING
            if value is not MISSING:
                self._counters.hits += 1
                return value
        self._counters.misses += 1
        return MISSING

    def _lookup_many(self, bkeys: list[str]) -> dict[str, Any]:
        if self.journal:
            pending = [bkey for bkey in bkeys if self._journaled(bkey)]
            self._counters.misses += len(pending)
            bkeys = [bkey for bkey in bkeys if bkey not in pending]
        if not bkeys:
            return {}
        try:
            raw = self.store.get_many(bkeys)
        except CacheError as exc:
            self._read_failed(exc, count=len(bkeys))
            return {}
        decoded = {bkey: self._decode(bkey, data) for bkey, data in raw.items()}
        entries = {bkey: value for bkey, value in decoded.items() if type(value) is Entry}
        invalidated = self._drop_invalidated(entries) if entries else set()
        found = {}
        for bkey, value in decoded.items():
            if type(value) is Entry:
                if bkey not in invalidated:
                    found[bkey] = read_without_loader(self, value)
            elif value is not MISSING:
                found[bkey] = value
        self._counters.hits += len(found)
        self._counters.misses += len(bkeys) - len(found)
        return found

    def _decode(self, bkey: str, raw: Any) -> Any:
        """Turn a stored entry into a value, or an :class:`Entry` for an annotated one;
        markers and bad entries become MISSING."""
        if self._objects:
            return MISSING if type(raw) is Marker else raw
        head = raw[:1]
        try:
            if head == MARKER_BYTE:
                return MISSING
            if head == ENTRY_BYTE:
                return unpack(self.serializer, bkey, raw)
            return codec.decode(self.serializer, bkey, raw)
        except DecodeError as exc:
            self._counters.decode_errors += 1
            self._log(f"dropping undecodable entry {bkey!r}: {exc}")
            try:
                self.store.delete(bkey)
            except CacheError as delete_exc:
                self._read_failed(delete_exc, count=0)
            return MISSING

    def _journaled(self, bkey: str) -> bool:
        """Whether ``bkey`` has an invalidation still to replay (after trying to)."""
        return not self.journal.settle() and bkey in self.journal.keys

    def _drop_invalidated(self, entries: Mapping[str, Entry]) -> set[str]:
        """Delete tagged entries whose tags were invalidated; return their keys."""
        gone = stale_entries(self, entries)
        for bkey in gone:
            try:
                self.store.compare_and_delete(bkey, entries[bkey].raw)
            except CacheError as exc:
                self._write_failed(exc)  # still a miss; it stays unreadable
        return gone

    def _read_failed(self, exc: CacheError, *, count: int = 1) -> None:
        self._counters.errors += 1
        self._counters.misses += count
        self._log(f"cache read failed, falling through to the loader: {exc!r}")

    def _log(self, message: str) -> None:
        # At most one line per interval: a dead server must not flood the logs.
        now = time.monotonic()
        if now - self._last_log >= _LOG_INTERVAL:
            self._last_log = now
            logger.warning("%s (namespace %s)", message, self.namespace)

    # -- writes ---------------------------------------------------------------------------

    def _encode(self, bkey: str, value: Any) -> Any:
        """Serialize for a byte backend, enforcing its item size limit.

        Raises:
            SerializationError: the serializer cannot encode ``value`` (counted).
            ValueTooLarge: the encoded value is over ``max_value_size`` (counted).
        """
        if self._objects:
            return value
        try:
            return codec.encode(self.serializer, bkey, value, self.max_value_size)
        except SerializationError:
            self._counters.serialization_errors += 1
            raise
        except ValueTooLarge:
            self._counters.oversize += 1
            raise

    def _resolve_ttl(self, ttl: TTL | UseDefault, value: Any = MISSING) -> float | None:
        if ttl is USE_DEFAULT:
            return self.none_ttl if value is None else self.ttl
        return to_seconds(ttl)

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
        journaled as a delete of the old entry (:mod:`cachekit.journal`), so this cache
        reads the key as a miss at once and no process reads the old value once the
        server answers. A ``None`` value with negative caching off (``none_ttl=0``)
        stores nothing and removes the old entry.

        Args:
            ttl: seconds or a timedelta; ``None`` for no expiry; omitted, the cache's
                default (``none_ttl`` for a ``None`` value; with ``none_ttl=0`` a
                ``None`` is not stored and the old entry is deleted).
            tags: key sets the entry belongs to: :meth:`invalidate_tags` with any of
                them removes it (see :mod:`cachekit.invalidation`).

        Raises:
            SerializationError: the serializer cannot encode ``value`` (a TypeError);
                the old entry is removed.
            BackendError: only when :meth:`delete` would: the journal is full.
        """
        bkey = self.backend_key(key)
        seconds = self._resolve_ttl(ttl, value)
        if self.journal:
            self.journal.settle()
        if seconds == 0:  # a None value with negative caching disabled
            self.delete(key)  # nothing to store, and the old value must not stay
            return
        try:
            packed = self._pack_set(bkey, value, seconds, tags)
            self.store.set(bkey, *packed)
        except UNSTORABLE:
            self.delete(key)  # the caller meant to replace it: never leave the old one
            raise
        except CacheError as exc:
            self._defer(exc, keys=[bkey])

    def _pack_set(
        self, bkey: str, value: Any, seconds: float | None, tags: Iterable[str] | None
    ) -> tuple[Any, float | None]:
        """What :meth:`set` stores: the encoded value, annotated with its tag tokens.

        Raises:
            SerializationError, ValueTooLarge: the value cannot be stored.
            BackendError: the tag tokens could not be read.
        """
        if tags is None:
            return self._encode(bkey, value), seconds
        tags = list(tags)
        guard = TagGuard(self, check_epoch=False)
        tokens = guard.tokens(tags, token_ttl(self))
        if tokens is None:  # created concurrently by another caller: now they exist
            tokens = guard.tokens(tags, token_ttl(self))
        if tokens is None:
            raise BackendError(f"could not read the tag tokens of {bkey!r}; not stored")
        return pack(self, bkey, Loaded(value, 0.0, tokens), seconds, None)

    def invalidate_tags(self, tags: Iterable[str]) -> None:
        """Remove every entry tagged with any of ``tags``, in two round trips.

        If the backend fails, the tags are journaled (:mod:`cachekit.journal`):
        honoured by this cache at once and replayed when the server answers.

        Raises:
            BackendError: the journal is full, so the invalidation is lost.
        """
        tags = list(tags)
        if self.journal:
            self.journal.settle()
        try:
            invalidate_tags(self, tags)
        except CacheError as exc:
            self._defer(exc, tags=tags)

    def set_many(self, mapping: Mapping[str, Any], ttl: TTL | UseDefault = USE_DEFAULT) -> None:
        """Store every item, in one backend round trip per distinct TTL (``None`` values
        take ``none_ttl``, as in :meth:`set`); fails open as :meth:`set` does."""
        try:
            groups = self._by_ttl(mapping, ttl)
        except UNSTORABLE:
            self.delete_many(mapping)  # as in set: a failed replacement leaves nothing old
            raise
        if self.journal:
            self.journal.settle()
        dropped = groups.pop(0.0, None)  # None values with negative caching off
        if dropped:
            self._delete_bkeys(list(dropped))
        for seconds, items in groups.items():
            try:
                self.store.set_many(items, seconds)
            except CacheError as exc:
                self._defer(exc, keys=items)

    def _by_ttl(
        self, mapping: Mapping[str, Any], ttl: TTL | UseDefault
    ) -> dict[float | None, dict[str, Any]]:
        """Encode items and group them by resolved TTL, ``{bkey: data}``; what must not
        be stored (a ``None`` with negative caching off) goes under TTL 0, by key."""
        groups: dict[float | None, dict[str, Any]] = {}
        for key, value in mapping.items():
            seconds = self._resolve_ttl(ttl, value)
            bkey = self.backend_key(key)
            # TTL 0 (a None with negative caching off) is kept apart, not encoded.
            groups.setdefault(seconds, {})[bkey] = (
                None if seconds == 0 else self._encode(bkey, value)
            )
        return groups

    def delete(self, key: str) -> None:
        """Remove ``key``; removing an absent key is not an error.

        If the backend fails, the delete is journaled (:mod:`cachekit.journal`):
        this cache treats the key as a miss at once and replays the delete when the
        server answers, so the old entry is never read again.

        Raises:
            BackendError: the journal is full, so the invalidation is lost.
        """
        self.delete_many([key])

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key, in one backend round trip; failures are journaled."""
        self._delete_bkeys([self.backend_key(key) for key in keys])

    def _delete_bkeys(self, bkeys: list[str]) -> None:
        if not bkeys:
            return
        if self.journal:
            self.journal.settle()
        try:
            self.store.delete_many(bkeys) if len(bkeys) > 1 else self.store.delete(bkeys[0])
        except CacheError as exc:
            self._defer(exc, keys=bkeys)

    def _defer(
        self, exc: CacheError, *, keys: Iterable[str] = (), tags: Iterable[str] = ()
    ) -> None:
        keys, tags = list(keys), list(tags)
        self.journal.record(keys=keys, tags=tags)
        self._counters.invalidations_deferred += len(keys) + len(tags)
        self._log(f"invalidation failed, journaled for replay: {exc!r}")

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

        The miss runs under a lease (:mod:`cachekit.leases`): concurrent misses on the
        key call the loader once, and a value loaded before a concurrent write or
        invalidation is not stored. A ``None`` result is stored for ``none_ttl``. A
        backend failure never raises here: the loader's value is returned and the
        failure counted. ``tags`` (a list, or a function of the loaded value) puts the
        entry in key sets. The keyword options override the cache's for this call.
        """
        bkey = self.backend_key(key)
        value = self._lookup(bkey)
        if value is not MISSING and type(value) is not Entry:
            return value  # type: ignore[no-any-return]
        policy = self.policy(ttl, **options)
        tags_of = _tags_function(tags)
        if value is MISSING:
            return load_and_fill(self, bkey, loader, policy, tags_of)
        return serve(self, bkey, value, loader, policy, tags_of)

    def _write_failed(self, exc: Exception) -> None:
        if isinstance(exc, UNSTORABLE):  # counted where it failed to encode: no server error
            self._log(f"value not cached: {exc!r}")
            return
        self._counters.errors += 1
        self._log(f"cache write failed: {exc!r}")

    # -- stats ------------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """Return a snapshot of the counters, the journal and the breaker."""
        stats = self._counters.snapshot()
        stats = dataclasses.replace(stats, pending_invalidations=len(self.journal))
        if self.breaker is None:
            return stats
        return dataclasses.replace(
            stats,
            breaker_state=self.breaker.state,
            breaker_opened=self.breaker.opened,
            short_circuited=self.breaker.short_circuited,
        )

    def reset_stats(self) -> None:
        """Zero the counters."""
        self._counters.reset()

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
