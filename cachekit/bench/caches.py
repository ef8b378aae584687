"""The cache under test: a backend for the URL given, checked reachable, emptied after.

Each run gets a fresh backend and namespace, so runs never see each other's entries.
A percentage of rows can bound the in-process cache (``maxsize``, evicting by the policy
asked for) but not a Redis or memcached server, whose memory limit and eviction are its
own: there every strategy runs once, unbounded, and the report says so.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from cachekit.backends.base import Backend
from cachekit.backends.eviction import Eviction
from cachekit.backends.memory import MemoryBackend
from cachekit.bench.config import BackendUrl, BenchError
from cachekit.cache import Cache
from cachekit.exceptions import BackendError

__all__ = ["check_reachable", "forget", "open_cache"]

# Far longer than a run, so nothing expires mid-run; a crashed run's keys still go.
SERVER_TTL = 3600.0
# Longer than the backends' 0.1 s default: a loaded 2-core machine must not turn a
# slow reply into a miss, which would be counted against the cache.
SERVER_TIMEOUT = 1.0
_CHUNK = 1000


def _backend(url: BackendUrl, entries: int, eviction: Eviction = "lru") -> Backend:
    if url.kind == "memory":
        return MemoryBackend(maxsize=entries, eviction=eviction)
    if url.kind == "redis":
        from cachekit.backends.redis import RedisBackend  # noqa: PLC0415 - optional driver

        return RedisBackend.from_url(url.url, timeout=SERVER_TIMEOUT)
    from cachekit.backends.memcached import MemcachedBackend  # noqa: PLC0415 - likewise

    return MemcachedBackend(
        list(url.servers), timeout=SERVER_TIMEOUT, connect_timeout=SERVER_TIMEOUT
    )


def check_reachable(url: BackendUrl) -> None:
    """Fail now if the cache server does not answer: the facade fails open, so a dead
    server would otherwise show up only as a hit ratio of zero.

    Raises:
        BenchError: the server did not answer, or the URL's options are not redis-py's.
        MissingDependencyError: its driver is not installed (the message names the extra).
    """
    try:
        backend = _backend(url, 1)
        try:
            backend.get("cachekit-bench:ping")
        finally:
            backend.close()
    except BackendError as exc:
        raise BenchError(f"cannot reach the {url.kind} cache at {url.label}: {exc}") from exc
    except (ValueError, TypeError) as exc:
        # redis-py reads the URL's query string only here: a bad value is a ValueError
        # from from_url, an unknown option a TypeError from the first connection.
        what = "Redis" if url.kind == "redis" else url.kind
        raise BenchError(f"malformed {what} URL {url.label!r}: {exc}") from exc


def open_cache(url: BackendUrl, *, entries: int, label: str, eviction: Eviction = "lru") -> Cache:
    """A cache in a namespace of its own; ``entries`` and ``eviction`` apply only to the
    in-process cache."""
    namespace = f"cachekit-bench-{label}-{uuid.uuid4().hex[:8]}"
    ttl = None if url.kind == "memory" else SERVER_TTL
    return Cache(_backend(url, entries, eviction), namespace=namespace, ttl=ttl)


def forget(cache: Cache, keys: Iterable[str]) -> None:
    """Delete a run's keys from a server and close the backend (memory just goes away)."""
    try:
        if not isinstance(cache.backend, MemoryBackend):
            batch = list(keys)
            for start in range(0, len(batch), _CHUNK):
                cache.delete_many(batch[start : start + _CHUNK])
    finally:
        cache.backend.close()
