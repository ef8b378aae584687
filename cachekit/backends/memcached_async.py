"""Memcached storage for asyncio, on connections of its own: MemcachedBackend's twin."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from functools import partial
from typing import Any, Final

from cachekit.backends import memcached_protocol as protocol
from cachekit.backends.base import MISSING
from cachekit.backends.memcached_async_connections import ServerConnections
from cachekit.backends.memcached_async_ring import _AsyncNodes, _AsyncRing, nodes_for
from cachekit.backends.memcached_core import (
    _EXPIRED_NOW,
    _MAX_TOKEN_VALUE,
    CAPABILITIES,
    _add_expire,
    _CasTokens,
    _check_counts,
    _expire,
    _wrap,
)
from cachekit.backends.memcached_nodes import _check_seconds, _server_specs
from cachekit.backends.memcached_protocol import IllegalKey, ProtocolError, ServerReplyError
from cachekit.backends.memcached_ring import NodeHealth
from cachekit.exceptions import BackendError, ConfigurationError

__all__ = ["AsyncMemcachedBackend"]

# OSError covers refused, lost and timed-out connections, and a busy pool (PoolTimeout).
_DRIVER_ERRORS: Final = (OSError, ServerReplyError, ProtocolError, IllegalKey)
_STORED: Final = b"STORED"


class AsyncMemcachedBackend:
    """Stores bytes in memcached from asyncio: one server, or a client-side hashed pool.

    The same storage as :class:`~cachekit.backends.memcached.MemcachedBackend`, call
    for call: the same TTL rules, the same keys on the same servers, ``add`` as a meta
    set that answers the item's CAS unique (so releasing or filling a lease this
    backend took is one ``cas``), batches as one round trip per server (sent to the
    servers concurrently), and a pool's per-server breakers and flush-on-rejoin, from
    the very same code (:mod:`~cachekit.backends.memcached_ring`). It speaks
    memcached's text protocol on connections of its own
    (:mod:`~cachekit.backends.memcached_protocol`).

    Safe under cancellation: a call that is cancelled or times out closes the
    connection it was using, so its reply can never be read by another call; only a
    connection whose every reply was read goes back to the pool.

    Args:
        servers: ``"host:port"`` (``unix:/path`` works too), or a list of them; two or
            more make a pool, hashed as pymemcache's ``HashClient`` hashes.
        timeout: seconds a call may take, waiting for a free connection included.
        connect_timeout: seconds allowed for opening a connection (on top of
            ``timeout``).
        node_failures: consecutive unanswered calls that mark a pool server down.
        node_cooldown: seconds between probes of a pool server that is down.
        flush_on_join: flush a pool server before it is used again after being down,
            and before an added server joins (``False``: rely on the Cache's journal).
        pool_size: connections per server, at most. More concurrent callers wait for
            one (within ``timeout``): a coroutine is cheap, a socket is not.

    A backend belongs to the event loop it is first used in; after :meth:`aclose` it
    may be used in another.

    Raises:
        ConfigurationError: no servers, a malformed address, or a bad setting.
    """

    #: Keys within memcached's policy, its item size limit, its whole-second clock
    #: (see :data:`~cachekit.backends.memcached_core.CAPABILITIES`).
    capabilities = CAPABILITIES

    def __init__(
        self,
        servers: str | Sequence[str],
        *,
        timeout: float = 0.1,
        connect_timeout: float = 0.1,
        node_failures: int = 3,
        node_cooldown: float = 1.0,
        flush_on_join: bool = True,
        pool_size: int = 16,
    ) -> None:
        _check_counts(node_failures=node_failures, pool_size=pool_size)
        for name, seconds in (
            ("timeout", timeout),
            ("connect_timeout", connect_timeout),
            ("node_cooldown", node_cooldown),
        ):
            _check_seconds(name, seconds)
        connect = partial(
            ServerConnections, size=pool_size, timeout=timeout, connect_timeout=connect_timeout
        )
        self._nodes: _AsyncNodes = nodes_for(
            _server_specs(servers),
            connect,
            failures=node_failures,
            cooldown=node_cooldown,
            flush=bool(flush_on_join),
        )
        if isinstance(self._nodes, _AsyncRing):
            # Failures are isolated per server, so the Cache needs no breaker of its own.
            self.capabilities = dataclasses.replace(self.capabilities, isolates_failures=True)
        self._tokens = _CasTokens()
        # Off once a server refused the meta command (memcached before 1.6).
        self._meta = True

    async def _one(self, operation: str, key: str, command: Callable[[], Any]) -> Any:
        """Run ``command()`` (built here, so a bad key is wrapped too) for ``key``."""
        nodes = self._nodes
        try:
            return await nodes.run(nodes.node_for(key), command())
        except _DRIVER_ERRORS as exc:
            raise _wrap(operation, exc) from exc

    async def _each_server(
        self,
        operation: str,
        keys: Iterable[str],
        call: Callable[[Any, list[str]], Awaitable[None]],
    ) -> None:
        """``call(node, its_keys)`` for each server the keys live on, concurrently. A
        server that fails does not stop the others: its error is raised once they are
        done."""
        groups = self._nodes.group(keys)
        calls = [call(node, node_keys) for node, node_keys in groups.items()]
        if len(calls) == 1:  # no task to create
            results: list[Any] = []
            try:
                await calls[0]
            except Exception as exc:
                results.append(exc)
        else:
            results = await asyncio.gather(*calls, return_exceptions=True)
        errors: list[Exception] = []
        for result in results:
            if isinstance(result, (*_DRIVER_ERRORS, BackendError)):
                errors.append(result)
            elif isinstance(result, BaseException):
                raise result  # not the server's doing (a value that is not bytes...)
        if errors and isinstance(errors[0], BackendError):
            raise errors[0]
        if errors:
            raise _wrap(operation, errors[0]) from errors[0]

    async def get(self, key: str) -> Any:
        value = await self._one("get", key, lambda: protocol.get(key))
        return MISSING if value is None else value

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}

        async def fetch(node: Any, node_keys: list[str]) -> None:
            hits = await self._nodes.run(node, protocol.get_many(node_keys))
            found.update(hits)

        if keys:
            await self._each_server("get_many", keys, fetch)
        return found

    async def set(self, key: str, value: Any, ttl: float | None) -> None:
        expire = _expire(ttl)
        replies = await self._one("set", key, lambda: protocol.store(b"set", {key: value}, expire))
        if replies[key] != _STORED:
            raise BackendError(f"memcached did not store {key!r}")

    async def set_many(self, items: Mapping[str, Any], ttl: float | None) -> None:
        expire = _expire(ttl)
        failed: list[str] = []

        async def store(node: Any, keys: list[str]) -> None:
            batch = {key: items[key] for key in keys}
            replies = await self._nodes.run(node, protocol.store(b"set", batch, expire))
            failed.extend(key for key, reply in replies.items() if reply != _STORED)

        if items:
            await self._each_server("set_many", items, store)
        if failed:
            raise BackendError(f"memcached did not store {len(failed)} of {len(items)} keys")

    async def delete(self, key: str) -> None:
        await self._one("delete", key, lambda: protocol.delete_many([key]))

    async def delete_many(self, keys: Sequence[str]) -> None:
        async def delete(node: Any, node_keys: list[str]) -> None:
            await self._nodes.run(node, protocol.delete_many(node_keys))

        if keys:
            await self._each_server("delete_many", keys, delete)

    async def add(self, key: str, value: Any, ttl: float | None) -> bool:
        """One round trip; a small value's CAS unique is kept for the swap after."""
        expire = _add_expire(ttl)
        nodes = self._nodes
        try:
            node = nodes.node_for(key)
            if self._meta and type(value) is bytes and len(value) <= _MAX_TOKEN_VALUE:
                try:
                    token = await nodes.run(node, protocol.meta_add(key, value, expire))
                except ServerReplyError as exc:
                    if exc.kind == "SERVER_ERROR":
                        raise
                    # The server does not speak meta set (the connection was closed on
                    # the error reply, so nothing of the refused command lingers).
                    self._meta = False
                else:
                    if token:
                        self._tokens.remember(key, value, node, token)
                    return token is not None
            replies = await nodes.run(node, protocol.store(b"add", {key: value}, expire))
        except _DRIVER_ERRORS as exc:
            raise _wrap("add", exc) from exc
        return bool(replies[key] == _STORED)

    async def _swap(self, key: str, expected: Any, value: Any, expire: int) -> bool:
        """Write ``value`` (``expire``) if the key holds ``expected``; driver errors raise.

        As ``MemcachedBackend._swap``: one ``cas`` with the token of our own ``add`` of
        ``expected``; else (or on EXISTS: maybe rewritten with the same bytes) ``gets``,
        compare, and ``cas`` with the token ``gets`` answered.
        """
        nodes = self._nodes
        node = nodes.node_for(key)
        token = self._tokens.take(key, expected, node)
        if token is not None:
            replies = await nodes.run(node, protocol.cas_many({key: (value, token)}, expire))
            if replies[key] != b"EXISTS":  # stored, or NOT_FOUND: absent, so no match
                return bool(replies[key] == _STORED)
        current = (await nodes.run(node, protocol.gets_many([key]))).get(key)
        if current is None or current[0] != expected:
            return False
        replies = await nodes.run(node, protocol.cas_many({key: (value, current[1])}, expire))
        return bool(replies[key] == _STORED)

    async def compare_and_set(self, key: str, expected: Any, value: Any, ttl: float | None) -> bool:
        """Replace the value if it equals ``expected``: ``gets``, compare, then ``cas``
        (one ``cas`` alone for a value this backend added; see :meth:`_swap`)."""
        try:
            return await self._swap(key, expected, value, _expire(ttl))
        except _DRIVER_ERRORS as exc:
            raise _wrap("compare_and_set", exc) from exc

    async def add_many(self, items: Mapping[str, Any], ttl: float | None) -> AbstractSet[str]:
        """One pipelined write of ``add`` commands per server."""
        expire = _add_expire(ttl)
        stored: set[str] = set()

        async def add(node: Any, keys: list[str]) -> None:
            batch = {key: items[key] for key in keys}
            replies = await self._nodes.run(node, protocol.store(b"add", batch, expire))
            stored.update(key for key, reply in replies.items() if reply == _STORED)

        if items:
            await self._each_server("add_many", items, add)
        return stored

    async def compare_and_set_many(
        self, items: Mapping[str, tuple[Any, Any]], ttl: float | None
    ) -> AbstractSet[str]:
        """Per server: one ``gets`` of every key, then one pipelined write of a ``cas``
        per matching key, each with its own token (each atomic on its own)."""
        expire = _expire(ttl)
        stored: set[str] = set()

        async def swap(node: Any, keys: list[str]) -> None:
            current = await self._nodes.run(node, protocol.gets_many(keys))
            matching = {
                key: (items[key][1], token)
                for key, (value, token) in current.items()
                if value == items[key][0]
            }
            if matching:
                replies = await self._nodes.run(node, protocol.cas_many(matching, expire))
                stored.update(key for key, reply in replies.items() if reply == _STORED)

        if items:
            await self._each_server("compare_and_set_many", items, swap)
        return stored

    async def compare_and_delete(self, key: str, expected: Any) -> bool:
        """Delete the key if it equals ``expected``: a ``cas`` with a negative exptime,
        which memcached applies as "expired now" (see :meth:`_swap`)."""
        try:
            return await self._swap(key, expected, b"", _EXPIRED_NOW)
        except _DRIVER_ERRORS as exc:
            raise _wrap("compare_and_delete", exc) from exc

    async def add_server(self, server: str) -> None:
        """Add a server to the pool, flushed first with ``flush_on_join``: about
        ``1/(N+1)`` of the keys move to it (see ``MemcachedBackend.add_server``).

        Raises:
            ConfigurationError: a single-server backend, a bad address, or a server
                already in the pool.
            BackendError: the server could not be reached (or flushed); not added.
        """
        nodes = self._nodes
        if not isinstance(nodes, _AsyncRing):
            raise ConfigurationError("only a pool grows: build the backend with a list of servers")
        (spec,) = _server_specs(server)
        try:
            await nodes.add(spec)
        except _DRIVER_ERRORS as exc:
            raise _wrap("add_server", exc) from exc

    def node_health(self) -> dict[str, NodeHealth]:
        """Each pool server's state, by ``"host:port"``; empty for a single server,
        which the Cache's breaker covers."""
        nodes = self._nodes
        return nodes.health() if isinstance(nodes, _AsyncRing) else {}

    async def aclose(self) -> None:
        """Close the connections: the idle ones now, those in use as their calls end."""
        await self._nodes.aclose()
