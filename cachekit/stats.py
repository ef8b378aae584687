"""Counters a user reads to see the cache working, and the hit ratio derived from them.

Counters are plain integers bumped without a lock: the hit path must not pay for one.
Under heavy thread contention an increment can rarely be lost, so treat the figures as
measurements, not as an audit log.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CacheStats", "Counters"]


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of one cache's counters.

    Attributes:
        hits: reads answered from the cache.
        misses: reads the cache could not answer (absent, expired, undecodable, or
            the backend failed).
        loads: loader calls made to fill misses.
        errors: backend calls that failed; reads fell through to the loader.
        decode_errors: entries that failed to verify or decode (counted, deleted).
        serialization_errors: values the serializer could not encode, so not stored
            (``cache.set`` raised :class:`~cachekit.exceptions.SerializationError`;
            a fill returned the loaded value uncached).
        lease_waits: misses that found another caller's lease and waited for its value
            instead of calling the loader (single-flight at work).
        fills_rejected: loaded values not stored because the key was written or
            invalidated while they loaded (the stale-set race, prevented).
        stale_served: reads answered with an entry past its TTL, inside its
            ``stale_ttl`` window (while another caller refreshed it, or because the
            refresh failed).
        oversize: values not stored because they exceed the backend's item limit.
        invalidations_deferred: keys and tags whose invalidation failed and was
            journaled (honoured locally, replayed when the server answers).
        pending_invalidations: journaled invalidations not yet replayed.
        breaker_state: ``"closed"``, ``"open"``, ``"half-open"``, or ``"none"``.
        breaker_opened: how many times the circuit breaker opened.
        short_circuited: calls refused while the breaker was open.
    """

    hits: int = 0
    misses: int = 0
    loads: int = 0
    errors: int = 0
    decode_errors: int = 0
    serialization_errors: int = 0
    lease_waits: int = 0
    fills_rejected: int = 0
    stale_served: int = 0
    oversize: int = 0
    invalidations_deferred: int = 0
    pending_invalidations: int = 0
    breaker_state: str = "none"
    breaker_opened: int = 0
    short_circuited: int = 0

    @property
    def hit_ratio(self) -> float:
        """Hits over reads, 0.0 before the first read."""
        reads = self.hits + self.misses
        return self.hits / reads if reads else 0.0


class Counters:
    """The mutable counters behind :class:`CacheStats`; one attribute per field."""

    __slots__ = (
        "decode_errors",
        "errors",
        "fills_rejected",
        "hits",
        "invalidations_deferred",
        "lease_waits",
        "loads",
        "misses",
        "oversize",
        "serialization_errors",
        "stale_served",
    )

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.loads = 0
        self.errors = 0
        self.decode_errors = 0
        self.serialization_errors = 0
        self.lease_waits = 0
        self.fills_rejected = 0
        self.stale_served = 0
        self.oversize = 0
        self.invalidations_deferred = 0

    def reset(self) -> None:
        """Zero every counter."""
        self.__init__()  # type: ignore[misc]  # re-running the initialiser is the reset

    def snapshot(self) -> CacheStats:
        """Copy the counters into an immutable :class:`CacheStats`."""
        return CacheStats(**{name: getattr(self, name) for name in self.__slots__})
