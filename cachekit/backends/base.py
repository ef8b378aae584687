"""The storage contract every backend implements, and the MISSING sentinel.

A backend is dumb storage: it does not know about namespaces, serialization, TTL
defaults, statistics or leases; the :class:`~cachekit.Cache` facade owns all of that.
Each method is one round trip to the server (per server for a client-side pool), so
the facade can reason about cost, and each is idempotent where the operation allows.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

__all__ = ["MISSING", "AsyncBackend", "Backend", "Capabilities", "KeyPolicy", "Missing"]


class Missing(enum.Enum):
    """Type of :data:`MISSING`; an enum so type checkers can narrow on ``is MISSING``."""

    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "MISSING"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return False


#: Returned for a miss, so that ``None`` stays a cacheable value.
MISSING: Final = Missing.MISSING


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """What a backend can store as a key without transformation.

    A backend with a policy takes printable ASCII keys (no whitespace or control
    characters) of at most ``max_bytes``; the facade hashes any other key (see
    :mod:`cachekit.keys`). A backend whose keys are arbitrary byte strings (Redis,
    memory) has no policy.
    """

    max_bytes: int


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend declares about itself, read by the facade instead of probing.

    Attributes:
        stores_objects: values are Python objects kept by reference (no serialization,
            no copies); otherwise they are ``bytes``.
        key_policy: key restrictions the facade must satisfy, or ``None`` for any string.
        max_value_size: the largest value the server stores, in bytes, or ``None``.
        in_process: storage in this process that cannot fail (no circuit breaker).
        isolates_failures: failures are isolated per server (a client-side pool with a
            breaker per node), so the facade adds no breaker over all of them.
        ttl_slack: how long past its TTL a key may still be read, in seconds (memcached
            counts whole seconds); lease waiters allow for it.
    """

    stores_objects: bool = False
    key_policy: KeyPolicy | None = None
    max_value_size: int | None = None
    in_process: bool = False
    isolates_failures: bool = False
    ttl_slack: float = 0.0


@runtime_checkable
class Backend(Protocol):
    """Key/value storage with batch variants and the atomic primitives leases need.

    Keys are ``str``. Values are ``bytes`` unless ``capabilities.stores_objects``, in
    which case the backend stores Python objects by reference. ``ttl`` is in seconds,
    strictly positive, or ``None`` for no expiry; the facade resolves defaults.
    Backends wrap their driver's errors in :class:`~cachekit.exceptions.BackendError`.
    """

    #: What the facade may rely on; see :class:`Capabilities`.
    capabilities: Capabilities

    def get(self, key: str) -> Any:
        """Return the stored value or :data:`MISSING`."""
        ...

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """Return the hits only, in one round trip (one per server for a pool)."""
        ...

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        """Store unconditionally."""
        ...

    def set_many(self, items: Mapping[str, Any], ttl: float | None) -> None:
        """Store every item with one TTL, in one round trip (one per server for a pool)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the key if present; deleting an absent key is not an error."""
        ...

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove every key that is present, in one round trip."""
        ...

    def add(self, key: str, value: Any, ttl: float | None) -> bool:
        """Store only if the key is absent; return whether it was stored. Atomic."""
        ...

    def compare_and_set(self, key: str, expected: Any, value: Any, ttl: float | None) -> bool:
        """Replace the value only if the key still holds ``expected``. Atomic.

        ``expected`` matches by equality for bytes and by identity for stored objects.
        Returns whether the new value was stored; an absent key never matches.
        """
        ...

    def add_many(self, items: Mapping[str, Any], ttl: float | None) -> AbstractSet[str]:
        """:meth:`add` for each item; return the keys stored. One round trip (per server)."""
        ...

    def compare_and_set_many(
        self, items: Mapping[str, tuple[Any, Any]], ttl: float | None
    ) -> AbstractSet[str]:
        """:meth:`compare_and_set` for each ``key: (expected, value)``; return the keys
        stored. Each key is atomic on its own; the batch as a whole is not."""
        ...

    def compare_and_delete(self, key: str, expected: Any) -> bool:
        """Delete the key only if it still holds ``expected`` (matched as above). Atomic.

        Returns whether it was deleted. Leases use it to release themselves without
        ever removing a value or another caller's lease.
        """
        ...

    def close(self) -> None:
        """Release connections the backend created itself (not an injected client's)."""
        ...


@runtime_checkable
class AsyncBackend(Protocol):
    """:class:`Backend` for asyncio: the same methods, each a coroutine, with the same
    meaning, and safe under cancellation (a cancelled call never leaves its reply to be
    read by the next one). Used by :class:`~cachekit.AsyncCache`.

    Keys are ``str``. Values are ``bytes`` unless ``capabilities.stores_objects``, in
    which case the backend stores Python objects by reference. ``ttl`` is in seconds,
    strictly positive, or ``None`` for no expiry; the facade resolves defaults.
    Backends wrap their driver's errors in :class:`~cachekit.exceptions.BackendError`.
    """

    #: What the facade may rely on; see :class:`Capabilities`.
    capabilities: Capabilities

    async def get(self, key: str) -> Any:
        """Return the stored value or :data:`MISSING`."""
        ...

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """Return the hits only, in one round trip (one per server for a pool)."""
        ...

    async def set(self, key: str, value: Any, ttl: float | None) -> None:
        """Store unconditionally."""
        ...

    async def set_many(self, items: Mapping[str, Any], ttl: float | None) -> None:
        """Store every item with one TTL, in one round trip (one per server for a pool)."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the key if present; deleting an absent key is not an error."""
        ...

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Remove every key that is present, in one round trip."""
        ...

    async def add(self, key: str, value: Any, ttl: float | None) -> bool:
        """Store only if the key is absent; return whether it was stored. Atomic."""
        ...

    async def compare_and_set(self, key: str, expected: Any, value: Any, ttl: float | None) -> bool:
        """Replace the value only if the key still holds ``expected``. Atomic.

        ``expected`` matches by equality for bytes and by identity for stored objects.
        Returns whether the new value was stored; an absent key never matches.
        """
        ...

    async def add_many(self, items: Mapping[str, Any], ttl: float | None) -> AbstractSet[str]:
        """:meth:`add` for each item; return the keys stored. One round trip (per server)."""
        ...

    async def compare_and_set_many(
        self, items: Mapping[str, tuple[Any, Any]], ttl: float | None
    ) -> AbstractSet[str]:
        """:meth:`compare_and_set` for each ``key: (expected, value)``; return the keys
        stored. Each key is atomic on its own; the batch as a whole is not."""
        ...

    async def compare_and_delete(self, key: str, expected: Any) -> bool:
        """Delete the key only if it still holds ``expected`` (matched as above). Atomic.

        Returns whether it was deleted. Leases use it to release themselves without
        ever removing a value or another caller's lease.
        """
        ...

    async def aclose(self) -> None:
        """Release connections the backend created itself (not an injected client's)."""
        ...
