"""Redis storage through an injected redis-py client, one round trip per call."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Final

from cachekit.backends.base import MISSING, Capabilities
from cachekit.backends.redis_async import AsyncRedisBackend
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
from cachekit.backends.redis_persistence import warn_if_persistent
from cachekit.exceptions import missing_dependency
from cachekit.forks import reset_in_child
from cachekit.keys import encode_key

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.cluster import RedisCluster
    from redis.commands.core import Script
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_dependency("redis", "redis") from exc

__all__ = ["AsyncRedisBackend", "RedisBackend"]

_RLOCK: Final = type(threading.RLock())


class RedisBackend:
    """Stores bytes in Redis (standalone or cluster) through an injected client.

    Every method is a single round trip once the server has the compare-and-set script:
    ``get_many`` is one ``MGET``, ``set_many`` one pipeline (or ``MSET`` without a TTL),
    ``delete_many`` one ``DEL``. On a ``RedisCluster`` the batch calls split by hash
    slot, one round trip per node. The first compare-and-set to reach a server (or
    node) without the script takes two more: it is refused (``NOSCRIPT``), the script
    is loaded, and the call is sent again.

    The client is used as given: its timeouts and retry policy apply. redis-py's
    ``Redis(...)`` constructor retries failed commands 10 times with exponential
    backoff by default, which can hold a cache read for seconds when the server is
    down; :meth:`from_url` builds a client with short timeouts and no retries.

    On its first successful write the backend asks each server (``CONFIG GET``, one
    round trip, once) whether it persists data, and logs a warning if so: a Redis that
    reloads a snapshot after a crash brings back entries deleted since (see
    :mod:`cachekit.backends.redis_persistence`). Hits never pay for the check; the first
    write, which may be a miss's lease, pays that one round trip.

    After ``os.fork()``, redis-py's pools open new connections in the child; the
    backend also gives them (and a cluster client's routing tables) new locks there,
    since a lock another thread held at the fork would block the child's first call.

    Args:
        client: a ``redis.Redis`` or ``redis.RedisCluster`` with
            ``decode_responses=False``; values must come back as bytes.

    Raises:
        ConfigurationError: the client decodes responses to ``str``.
    """

    capabilities = Capabilities()

    def __init__(self, client: redis.Redis | RedisCluster) -> None:
        check_client(client, "RedisBackend")
        self.client = client
        self._owns_client = False
        self._compare_and_set = client.register_script(COMPARE_AND_SET)
        self._compare_and_delete = client.register_script(COMPARE_AND_DELETE)
        # Taken, never released, by the one caller that checks persistence.
        self._persistence_unchecked: threading.Lock | None = threading.Lock()
        reset_in_child(self, RedisBackend._renew_driver_locks)

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 0.1) -> RedisBackend:
        """Connect to ``redis://host:port/db`` with cache-friendly failure behaviour.

        A cache that cannot answer quickly should miss rather than stall the caller,
        so each connect and each command gets ``timeout`` seconds, failed commands are
        not retried, and :meth:`close` closes the client. Options in the URL's query
        string (e.g. ``?socket_timeout=1``) take precedence, as in redis-py.

        Args:
            url: a ``redis://``, ``rediss://`` or ``unix://`` URL.
            timeout: seconds allowed for connecting and for each command.
        """
        options = url_options(timeout)
        with malformed_url(url):
            client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)
            client.connection_pool.connection_class(**client.connection_pool.connection_kwargs)
        backend = cls(client)
        backend._owns_client = True
        return backend

    def get(self, key: str) -> Any:
        try:
            value = self.client.get(encode_key(key))
        except DRIVER_ERRORS as exc:
            raise wrap("GET", exc) from exc
        return MISSING if value is None else value

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        if not keys:
            return {}
        encoded = [encode_key(key) for key in keys]
        try:
            if isinstance(self.client, RedisCluster):
                values = self.client.mget_nonatomic(encoded)
            else:
                values = self.client.mget(encoded)
        except DRIVER_ERRORS as exc:
            raise wrap("MGET", exc) from exc
        return hits(keys, values)

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        try:
            self.client.set(encode_key(key), value, px=px_or_none(ttl))
        except DRIVER_ERRORS as exc:
            raise wrap("SET", exc) from exc
        if self._persistence_unchecked is not None:
            self._check_persistence()

    def set_many(self, items: Mapping[str, Any], ttl: float | None) -> None:
        if not items:
            return
        encoded = {encode_key(key): value for key, value in items.items()}
        try:
            if ttl is None:
                self._mset(encoded)
            else:
                pipe = self.client.pipeline(transaction=False)
                ttl_ms = px_or_none(ttl)
                for key, value in encoded.items():
                    pipe.set(key, value, px=ttl_ms)
                pipe.execute()
        except DRIVER_ERRORS as exc:
            raise wrap("MSET" if ttl is None else "SET pipeline", exc) from exc
        if self._persistence_unchecked is not None:
            self._check_persistence()

    def delete(self, key: str) -> None:
        try:
            self.client.delete(encode_key(key))
        except DRIVER_ERRORS as exc:
            raise wrap("DEL", exc) from exc
        if self._persistence_unchecked is not None:
            self._check_persistence()

    def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        try:
            self.client.delete(*[encode_key(key) for key in keys])
        except DRIVER_ERRORS as exc:
            raise wrap("DEL", exc) from exc
        if self._persistence_unchecked is not None:
            self._check_persistence()

    def add(self, key: str, value: Any, ttl: float | None) -> bool:
        try:
            added = self.client.set(encode_key(key), value, px=px_or_none(ttl), nx=True)
        except DRIVER_ERRORS as exc:
            raise wrap("SET NX", exc) from exc
        if self._persistence_unchecked is not None:
            self._check_persistence()
        return bool(added)

    def compare_and_set(self, key: str, expected: Any, value: Any, ttl: float | None) -> bool:
        args = [expected, value, px_or_zero(ttl)]
        try:
            swapped = self._compare_and_set(keys=[encode_key(key)], args=args)
        except DRIVER_ERRORS as exc:
            raise wrap("compare-and-set script", exc) from exc
        return int(swapped) == 1

    def add_many(self, items: Mapping[str, Any], ttl: float | None) -> AbstractSet[str]:
        if not items:
            return set()
        ttl_ms = px_or_none(ttl)
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(encode_key(key), value, px=ttl_ms, nx=True)
            results = pipe.execute()
        except DRIVER_ERRORS as exc:
            raise wrap("SET NX pipeline", exc) from exc
        if self._persistence_unchecked is not None:
            self._check_persistence()
        return stored(items, results)

    def compare_and_set_many(
        self, items: Mapping[str, tuple[Any, Any]], ttl: float | None
    ) -> AbstractSet[str]:
        if not items:
            return set()
        try:
            results = self._run_script_many(self._compare_and_set, script_calls(items, ttl))
        except DRIVER_ERRORS as exc:
            raise wrap("compare-and-set pipeline", exc) from exc
        return stored(items, results)

    def compare_and_delete(self, key: str, expected: Any) -> bool:
        try:
            deleted = self._compare_and_delete(keys=[encode_key(key)], args=[expected])
        except DRIVER_ERRORS as exc:
            raise wrap("compare-and-delete script", exc) from exc
        return int(deleted) == 1

    def close(self) -> None:
        """Close the client if :meth:`from_url` created it; an injected one stays open."""
        if self._owns_client:
            self.client.close()

    def _check_persistence(self) -> None:
        """Warn once if a server persists data; called after a write that reached it,
        so a dead server costs no extra timeout. Never raises."""
        unchecked = self._persistence_unchecked
        if unchecked is None or not unchecked.acquire(blocking=False):
            return  # checked, or another caller is checking
        self._persistence_unchecked = None
        client = self.client
        if isinstance(client, RedisCluster):
            primaries = [
                n for n in client.nodes_manager.nodes_cache.values() if n.server_type == "primary"
            ]
            nodes = [(n.name, client.get_redis_connection(n)) for n in primaries]
        else:
            nodes = [(server_name(client.connection_pool), client)]
        warn_if_persistent(nodes)

    def _renew_driver_locks(self) -> None:
        """In a fork child: new locks for redis-py's pools and a cluster's routing.

        redis-py resets a pool in the child on its first use, but (as of 8.1) takes the
        pool's lock to do it, and a cluster client's node lookup takes its routing lock
        on every keyed command: one held by another parent thread at the fork would
        never be released. Only attributes redis-py has are renewed, with their kind.
        """
        client = self.client
        if isinstance(client, RedisCluster):
            holders: list[Any] = [client, client.nodes_manager]
            holders.append(getattr(client.nodes_manager, "read_load_balancer", None))
            for node in list(client.nodes_manager.nodes_cache.values()):
                if node.redis_connection is not None:
                    holders.append(node.redis_connection.connection_pool)
        else:
            holders = [client.connection_pool]
        for holder in holders:
            for name in ("_lock", "_fork_lock", "_initialization_lock"):
                old = getattr(holder, name, None)
                if old is not None:
                    setattr(
                        holder, name, threading.RLock() if type(old) is _RLOCK else threading.Lock()
                    )

    def _run_script_many(self, script: Script, calls: list[tuple[bytes, list[Any]]]) -> list[Any]:
        """Run a one-key script once per ``(key, args)`` in one pipeline (one per node on
        a cluster); return the replies in order.

        Raw ``EVALSHA`` rather than redis-py's ``Script`` calls: a pipeline of those
        first sends ``SCRIPT EXISTS``, a second round trip on every batch, and
        ``ClusterPipeline`` refuses them outright (yet routes a raw ``EVALSHA`` by its
        key like any command). A server that has not seen the script answers NOSCRIPT
        without running it, so those calls alone run again after ``SCRIPT LOAD``.
        """
        results = self._evalsha_pipeline(script.sha, calls)
        refused = refused_script(results)
        again = []
        if refused:
            self.client.script_load(script.script)
            again = self._evalsha_pipeline(script.sha, [calls[i] for i in refused])
        return merge_retried(results, refused, again)

    def _evalsha_pipeline(self, sha: str, calls: list[tuple[bytes, list[Any]]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for key, args in calls:
            pipe.execute_command("EVALSHA", sha, 1, key, *args)
        return pipe.execute(raise_on_error=False)

    def _mset(self, encoded: dict[bytes, Any]) -> None:
        if isinstance(self.client, RedisCluster):
            # MSET needs every key in one hash slot; this splits by slot, one MSET each.
            self.client.mset_nonatomic(encoded)
        else:
            self.client.mset(encoded)
