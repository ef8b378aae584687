"""What both facades hold: configuration, counters, the journal, and the pure helpers
(keys, encoding, TTLs, error accounting) every flow uses."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, Unpack

from cachekit import codec
from cachekit.backends.base import MISSING, Capabilities
from cachekit.breaker import CircuitBreaker
from cachekit.core.journal import Journal
from cachekit.entries import ENTRY_BYTE, unpack
from cachekit.exceptions import (
    UNSTORABLE,
    CacheError,
    ConfigurationError,
    DecodeError,
    SerializationError,
    ValueTooLarge,
)
from cachekit.keys import make_backend_key, validate_namespace
from cachekit.markers import MARKER_BYTE, Marker
from cachekit.policy import FillPolicy, PolicyOptions, resolve
from cachekit.serializers import JsonSerializer, Serializer
from cachekit.stats import CacheStats, Counters
from cachekit.ttl import TTL, USE_DEFAULT, UseDefault, poll_seconds, to_seconds

__all__ = ["BAD", "CacheCore", "TagsOf", "tags_function"]

logger = logging.getLogger("cachekit")

_NONE_TTL_CAP = 30.0
_LOG_INTERVAL = 10.0


class _Bad:
    """Type of :data:`BAD`."""

    def __repr__(self) -> str:
        return "BAD"


#: What :meth:`CacheCore.decode` returns for an undecodable entry (to be deleted).
BAD: Final = _Bad()

#: A function from a loaded value to its tags, or ``None`` for an untagged fill.
TagsOf = Callable[[Any], Iterable[str]] | None


def tags_function(tags: Iterable[str] | Callable[[Any], Iterable[str]] | None) -> TagsOf:
    """``tags=`` as given to ``get_or_load``: a list, a function of the value, or None."""
    if tags is None or callable(tags):
        return tags
    fixed = list(tags)
    return lambda value: fixed


class CacheCore:
    """The state of one cache, shared by its flows; ``Cache`` and ``AsyncCache`` add the
    I/O. The arguments are documented on :class:`~cachekit.Cache`."""

    def __init__(
        self,
        capabilities: Capabilities,
        *,
        identity: int,
        namespace: str,
        ttl: TTL,
        none_ttl: TTL | UseDefault,
        serializer: Serializer | None,
        lease_ttl: TTL,
        lease_poll: float,
        stale_ttl: TTL,
        early_refresh: float | None,
        clock: Callable[[], float],
        breaker: CircuitBreaker | UseDefault | None,
        max_value_size: int | UseDefault | None,
    ) -> None:
        if breaker is USE_DEFAULT:
            # In-process storage never fails; a pool with a breaker per server must not
            # have one server's outage open a breaker over all of them.
            isolated = capabilities.in_process or capabilities.isolates_failures
            breaker = None if isolated else CircuitBreaker()
        self.breaker: CircuitBreaker | None = breaker
        self.capabilities = capabilities
        # Which backend this is, for the lease re-entrancy check (core/leases.py).
        self.identity = identity
        self.max_value_size: int | None = (
            capabilities.max_value_size if max_value_size is USE_DEFAULT else max_value_size
        )
        self.journal = Journal()
        # Leases whose writes failed in flight, {bkey: marker}; see core/leases.py.
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
        self.prefix = self.namespace + ":"
        self.key_policy = capabilities.key_policy
        self.objects = capabilities.stores_objects
        self.counters = Counters()
        self._last_log = float("-inf")

    def _none_ttl(self, none_ttl: TTL | UseDefault) -> float | None:
        if none_ttl is USE_DEFAULT:
            return _NONE_TTL_CAP if self.ttl is None else min(self.ttl, _NONE_TTL_CAP)
        if none_ttl == 0:
            return 0.0
        return to_seconds(none_ttl, what="none_ttl")

    # -- keys and options ----------------------------------------------------------------

    def backend_key(self, key: str) -> str:
        """Return ``key`` exactly as stored in the backend: namespaced, hashed if needed."""
        if self.key_policy is None and type(key) is str:
            return self.prefix + key
        return make_backend_key(self.prefix, key, self.key_policy)

    def policy(
        self, ttl: TTL | UseDefault = USE_DEFAULT, **options: Unpack[PolicyOptions]
    ) -> FillPolicy:
        """This cache's fill options with the given overrides, validated."""
        return resolve(self.defaults, ttl=ttl, **options)

    def resolve_ttl(self, ttl: TTL | UseDefault, value: Any = MISSING) -> float | None:
        """The TTL in seconds: the default (``none_ttl`` for a ``None`` value) or ``ttl``."""
        if ttl is USE_DEFAULT:
            return self.none_ttl if value is None else self.ttl
        return to_seconds(ttl)

    # -- values --------------------------------------------------------------------------

    def encode(self, bkey: str, value: Any) -> Any:
        """Serialize for a byte backend, enforcing its item size limit.

        Raises:
            SerializationError: the serializer cannot encode ``value`` (counted).
            ValueTooLarge: the encoded value is over ``max_value_size`` (counted).
        """
        if self.objects:
            return value
        try:
            return codec.encode(self.serializer, bkey, value, self.max_value_size)
        except SerializationError:
            self.counters.serialization_errors += 1
            raise
        except ValueTooLarge:
            self.counters.oversize += 1
            raise

    def decode(self, bkey: str, raw: Any) -> Any:
        """A stored entry as a value, an :class:`~cachekit.entries.Entry` for an annotated
        one, MISSING for a marker, or :data:`BAD` (counted) for one to delete."""
        if self.objects:
            return MISSING if type(raw) is Marker else raw
        head = raw[:1]
        try:
            if head == MARKER_BYTE:
                return MISSING
            if head == ENTRY_BYTE:
                return unpack(self.serializer, bkey, raw)
            return codec.decode(self.serializer, bkey, raw)
        except DecodeError as exc:
            self.counters.decode_errors += 1
            self.log(f"dropping undecodable entry {bkey!r}: {exc}")
            return BAD

    # -- accounting ------------------------------------------------------------------------

    def read_failed(self, exc: CacheError, *, count: int = 1) -> None:
        """A read that failed: an error, and ``count`` misses."""
        self.counters.errors += 1
        self.counters.misses += count
        self.log(f"cache read failed, falling through to the loader: {exc!r}")

    def write_failed(self, exc: Exception) -> None:
        """A write that failed, or a value that could not be encoded (counted already)."""
        if isinstance(exc, UNSTORABLE):
            self.log(f"value not cached: {exc!r}")
            return
        self.counters.errors += 1
        self.log(f"cache write failed: {exc!r}")

    def defer(self, exc: CacheError, *, keys: Iterable[str] = (), tags: Iterable[str] = ()) -> None:
        """Journal invalidations that failed (see :mod:`cachekit.core.journal`).

        Raises:
            BackendError: the journal is full, so they are lost.
        """
        keys, tags = list(keys), list(tags)
        self.journal.record(keys=keys, tags=tags)
        self.counters.invalidations_deferred += len(keys) + len(tags)
        self.log(f"invalidation failed, journaled for replay: {exc!r}")

    def log(self, message: str) -> None:
        """Log a WARNING, at most one per interval: a dead server must not flood the logs."""
        now = time.monotonic()
        if now - self._last_log >= _LOG_INTERVAL:
            self._last_log = now
            logger.warning("%s (namespace %s)", message, self.namespace)

    def stats(self) -> CacheStats:
        """Return a snapshot of the counters, the journal and the breaker."""
        stats = self.counters.snapshot()
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
        self.counters.reset()
