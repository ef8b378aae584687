"""Redis storage for asyncio through an injected redis.asyncio client, one round trip per call."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from cachekit.backends.base import MISSING, Capabilities
from cachekit.backends.redis_common import (
    COMPARE_AND_DELETE,
    COMPARE_AND_SET,
    DRIVER_ERRORS,
    check_client,
    hits,
    malformed_url,
    merge_retried,
    px_or_none,
    px_or_zero,
    refused_script,
    script_calls,
    server_name,
    stored,
    url_options,
    wrap,
)
from cachekit.backends.redis_persistence import awarn_if_persistent
from cachekit.exceptions import missing_dependency
from cachekit.keys import encode_key

try:
    from redis.asyncio import ConnectionPool, Redis
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.commands.core import AsyncScript
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_dependency("redis", "redis") from exc

__all__ = ["AsyncRedisBackend"]


class AsyncRedisBackend:
    """Stores bytes in Redis (standalone, Sentinel-managed or cluster) for asyncio.

    The twin of :class:`~cachekit.backends.redis.RedisBackend`, with the same meaning
    and cost per call: ``get_many`` is one ``MGET``, ``set_many`` one pipeline (or
    ``MSET`` without a TTL), ``delete_many`` one ``DEL``; on a ``RedisCluster`` the
    batch calls split by hash slot, one round trip per node, sent to the nodes at
    once. The first compare-and-set to reach a server (or node) without the script
    takes two more round trips (NOSCRIPT, ``SCRIPT LOAD``, the call again).

    The client is used as given: its timeouts and retry policy apply.
    ``redis.asyncio.Redis(...)`` retries failed commands with backoff by default;
    :meth:`from_url` builds a client with short timeouts and no retries.

    Cancellation is safe: a call cancelled while it waits for its reply leaves no
    reply behind for the next caller, since redis-py (4.5.5 and later) drops the
    connection it was reading from rather than returning it to the pool.

    On its first successful write the backend asks each server (``CONFIG GET``, one
    round trip, once) whether it persists data, and logs a warning if so (see
    :mod:`cachekit.backends.redis_persistence`).

    Args:
        client: a ``redis.asyncio.Redis`` (including one from
            ``redis.asyncio.sentinel.Sentinel(...).master_for(...)``) or a
            ``redis.asyncio.cluster.RedisCluster``, with ``decode_responses=False``.

    Raises:
        ConfigurationError: the client decodes responses to ``str``.
    """

    capabilities = Capabilities()

    def __init__(self, client: Redis | RedisCluster) -> None:
        check_client(client, "AsyncRedisBackend")
        self.client = client
        self._owns_client = False
        self._compare_and_set = client.register_script(COMPARE_AND_SET)
        self._compare_and_delete = client.register_script(COMPARE_AND_DELETE)
        # Cleared by the one caller that checks persistence, before its first await.
        self._persistence_unchecked = True
        self._undiscovered = isinstance(client, RedisCluster)  # see _discover

    @classmethod
    def from_url(
        cls, url: str, *, timeout: float = 0.1, max_connections: int = 100
    ) -> AsyncRedisBackend:
        """Connect to ``redis://host:port/db`` with cache-friendly failure behaviour.

        As :meth:`RedisBackend.from_url <cachekit.backends.redis.RedisBackend.from_url>`:
        ``timeout`` seconds for each connect and each command, no retries, and
        :meth:`aclose` closes the client. Options in the URL's query string take
        precedence, as in redis-py. No connection is made until the first call.

        Args:
            url: a ``redis://``, ``rediss://`` or ``unix://`` URL.
            timeout: seconds allowed for connecting and for each command.
            max_connections: the most connections open at once; more concurrent calls
                wait for one (redis.asyncio's default pool refuses them instead).
        """
        options = url_options(timeout)
        # Calls past max_connections wait for a connection instead of failing at once:
        # a busy pool is not a failing server, and must not open the breaker or journal
        # invalidations. (redis-py's BlockingConnectionPool waits too, at ~25 us a call.)
        with malformed_url(url):
            pool = _WaitingPool.from_url(
                url, max_connections=max_connections, retry=Retry(NoBackoff(), 0), **options
            )
            pool.connection_class(**pool.connection_kwargs)
        client = Redis.from_pool(pool)
        backend = cls(client)
        backend._owns_client = True
        return backend

    async def get(self, key: str) -> Any:
        try:
            if self._undiscovered:
                await self._discover()
            value = await self.client.get(encode_key(key))
        except DRIVER_ERRORS as exc:
            raise wrap("GET", exc) from exc
        return MISSING if value is None else value

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        if not keys:
            return {}
        encoded = [encode_key(key) for key in keys]
        try:
            if isinstance(self.client, RedisCluster):
                values = await self.client.mget_nonatomic(encoded)
            else:
                values = await self.client.mget(encoded)
        except DRIVER_ERRORS as exc:
            raise wrap("MGET", exc) from exc
        return hits(keys, values)

    async def set(self, key: str, value: Any, ttl: float | None) -> None:
        try:
            if self._undiscovered:
                await self._discover()
            await self.client.set(encode_key(key), value, px=px_or_none(ttl))
        except DRIVER_ERRORS as exc:
            raise wrap("SET", exc) from exc
        if self._persistence_unchecked:
            await self._check_persistence()

    async def set_many(self, items: Mapping[str, Any], ttl: float | None) -> None:
        if not items:
            return
        encoded = {encode_key(key): value for key, value in items.items()}
        try:
            if ttl is None:
                await self._mset(encoded)
            else:
                pipe = self.client.pipeline(transaction=False)
                ttl_ms = px_or_none(ttl)
                for key, value in encoded.items():
                    pipe.set(key, value, px=ttl_ms)
                await pipe.execute()
        except DRIVER_ERRORS as exc:
            raise wrap("MSET" if ttl is None else "SET pipeline", exc) from exc
        if self._persistence_unchecked:
            await self._check_persistence()

    async def delete(self, key: str) -> None:
        try:
            if self._undiscovered:
                await self._discover()
            await self.client.delete(encode_key(key))
        except DRIVER_ERRORS as exc:
            raise wrap("DEL", exc) from exc
        if self._persistence_unchecked:
            await self._check_persistence()

    async def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        try:
            # On a cluster, DEL of many keys splits by slot, one pipeline per node.
            await self.client.delete(*[encode_key(key) for key in keys])
        except DRIVER_ERRORS as exc:
            raise wrap("DEL", exc) from exc
        if self._persistence_unchecked:
            await self._check_persistence()

    async def add(self, key: str, value: Any, ttl: float | None) -> bool:
        try:
            if self._undiscovered:
                await self._discover()
            added = await self.client.set(encode_key(key), value, px=px_or_none(ttl), nx=True)
        except DRIVER_ERRORS as exc:
            raise wrap("SET NX", exc) from exc
        if self._persistence_unchecked:
            await self._check_persistence()
        return bool(added)

    async def compare_and_set(self, key: str, expected: Any, value: Any, ttl: float | None) -> bool:
        args = [expected, value, px_or_zero(ttl)]
        try:
            if self._undiscovered:
                await self._discover()
            swapped = await self._compare_and_set(keys=[encode_key(key)], args=args)
        except DRIVER_ERRORS as exc:
            raise wrap("compare-and-set script", exc) from exc
        return int(swapped) == 1

    async def add_many(self, items: Mapping[str, Any], ttl: float | None) -> AbstractSet[str]:
        if not items:
            return set()
        ttl_ms = px_or_none(ttl)
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(encode_key(key), value, px=ttl_ms, nx=True)
            results = await pipe.execute()
        except DRIVER_ERRORS as exc:
            raise wrap("SET NX pipeline", exc) from exc
        if self._persistence_unchecked:
            await self._check_persistence()
        return stored(items, results)

    async def compare_and_set_many(
        self, items: Mapping[str, tuple[Any, Any]], ttl: float | None
    ) -> AbstractSet[str]:
        if not items:
            return set()
        calls = script_calls(items, ttl)
        try:
            results = await self._run_script_many(self._compare_and_set, calls)
        except DRIVER_ERRORS as exc:
            raise wrap("compare-and-set pipeline", exc) from exc
        return stored(items, results)

    async def compare_and_delete(self, key: str, expected: Any) -> bool:
        try:
            if self._undiscovered:
                await self._discover()
            deleted = await self._compare_and_delete(keys=[encode_key(key)], args=[expected])
        except DRIVER_ERRORS as exc:
            raise wrap("compare-and-delete script", exc) from exc
        return int(deleted) == 1

    async def aclose(self) -> None:
        """Close the client if :meth:`from_url` created it; an injected one stays open."""
        if self._owns_client:
            await self.client.aclose()

    async def _discover(self) -> None:
        """Have a cluster client read the slot map before its first single-key command.

        redis-py (8.1) routes a command sent before the client knows any node as if it
        had no key: a burst of concurrent first calls on a new client goes to arbitrary
        nodes, is answered MOVED, and the reconnects that follow break other calls'
        connections mid-handshake (``AttributeError``, not a ``RedisError``). The
        batch calls discover the cluster first by themselves. ``initialize()`` holds
        the client's lock, so concurrent first callers wait for one discovery.
        """
        if isinstance(self.client, RedisCluster):
            await self.client.initialize()
        self._undiscovered = False

    async def _check_persistence(self) -> None:
        """Warn once if a server persists data; called after a write that reached it,
        so a dead server costs no extra timeout. Never raises an ``Exception``."""
        if not self._persistence_unchecked:
            return
        self._persistence_unchecked = False  # before any await: one caller checks
        client = self.client
        if isinstance(client, RedisCluster):
            primaries = client.get_primaries()
            nodes = [(node.name, {"target_nodes": node}) for node in primaries]
        else:
            nodes = [(server_name(client.connection_pool), {})]
        await awarn_if_persistent(client.pipeline(transaction=False), nodes)

    async def _run_script_many(
        self, script: AsyncScript, calls: list[tuple[bytes, list[Any]]]
    ) -> list[Any]:
        """Run a one-key script once per ``(key, args)`` in one pipeline (one per node on
        a cluster); return the replies in order. Raw ``EVALSHA``, and NOSCRIPT answered
        as ``RedisBackend._run_script_many`` explains."""
        results = await self._evalsha_pipeline(script.sha, calls)
        refused = refused_script(results)
        again = []
        if refused:
            await self.client.script_load(script.script)
            again = await self._evalsha_pipeline(script.sha, [calls[i] for i in refused])
        return merge_retried(results, refused, again)

    async def _evalsha_pipeline(self, sha: str, calls: list[tuple[bytes, list[Any]]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for key, args in calls:
            pipe.execute_command("EVALSHA", sha, 1, key, *args)
        return await pipe.execute(raise_on_error=False)

    async def _mset(self, encoded: dict[bytes, Any]) -> None:
        if isinstance(self.client, RedisCluster):
            # MSET needs every key in one hash slot; this splits by slot, one MSET each.
            await self.client.mset_nonatomic(encoded)
        else:
            await self.client.mset(encoded)


class _WaitingPool(ConnectionPool):
    """A connection pool whose calls past ``max_connections`` wait for a connection (a
    semaphore: each waits only as long as calls in flight take, each bounded by the
    socket timeout) instead of raising ``MaxConnectionsError``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = asyncio.Semaphore(self.max_connections)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        await self._slots.acquire()
        try:
            return await super().get_connection()  # type: ignore[no-untyped-call]
        except BaseException:
            self._slots.release()
            raise

    async def release(self, connection: Any) -> None:
        try:
            await super().release(connection)
        finally:
            self._slots.release()
