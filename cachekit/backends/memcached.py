"""Memcached storage through pymemcache, one round trip per call per server."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from functools import partial
from typing import Any, Final, cast

from cachekit.backends.base import MISSING
from cachekit.backends.memcached_async import AsyncMemcachedBackend
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
from cachekit.backends.memcached_nodes import (
    _check_injected,
    _check_seconds,
    _client_options,
    _Connections,
    _Lent,
    _Nodes,
    _server_specs,
    _Single,
)
from cachekit.backends.memcached_pool import _Ring
from cachekit.backends.memcached_protocol import ProtocolError, encode_meta_add, parse_meta_add
from cachekit.backends.memcached_ring import MAX_ROUTES, NodeHealth
from cachekit.exceptions import BackendError, ConfigurationError, missing_dependency

try:
    from pymemcache.client.base import Client, PooledClient
    from pymemcache.client.hash import HashClient
    from pymemcache.exceptions import (
        MemcacheClientError,
        MemcacheError,
        MemcacheIllegalInputError,
        MemcacheUnknownError,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_dependency("pymemcache", "memcached") from exc

__all__ = ["AsyncMemcachedBackend", "MemcachedBackend", "NodeHealth"]

_DRIVER_ERRORS: Final = (MemcacheError, OSError)
# Key-to-server routes a pool remembers (see _Members in memcached_ring).
_MAX_ROUTES: Final = MAX_ROUTES


def _meta_add(client: Any, key: str, value: bytes, expire: int) -> bytes | None:
    """memcached's ``add`` that also answers the new item's CAS unique, in one round trip.

    The request and its reply are :mod:`~cachekit.backends.memcached_protocol`'s
    (``encode_meta_add``, ``parse_meta_add``); pymemcache frames them. ``raw_command``
    could too, but it names the command by its whole text, value bytes included;
    ``_misc_cmd`` (pymemcache's own framing for one-line replies) names it ``ms``.
    Returns the unique if stored (b"" if the server left it out), else None.
    """
    if isinstance(client, PooledClient):
        with client.client_pool.get_and_release(destroy_on_fail=True) as borrowed:
            return _meta_add(borrowed, key, value, expire)
    name = client.check_key(key, client.key_prefix)
    reply: bytes = client._misc_cmd([encode_meta_add(name, value, expire)], b"ms", False)[0]
    try:
        return parse_meta_add(reply)
    except ProtocolError as exc:
        raise MemcacheUnknownError(str(exc)) from exc


def _add_many(client: Any, values: dict[str, bytes], expire: int) -> dict[str, bool]:
    """``add`` of every item in one pipelined write, by pymemcache's internal
    ``_store_cmd`` (which its own ``set_many`` uses); a PooledClient lends a Client."""
    if isinstance(client, PooledClient):
        with client.client_pool.get_and_release(destroy_on_fail=True) as borrowed:
            return _add_many(borrowed, values, expire)
    return cast(dict[str, bool], client._store_cmd(b"add", values, expire, False))


class MemcachedBackend:
    """Stores bytes in memcached: one server, or a client-side hashed pool of them.

    ``get_many``, ``set_many`` and ``delete_many`` are one round trip per server
    (pymemcache pipelines a batch into one write, and memcached's text protocol has no
    multi-key delete, so deletes are pipelined). ``compare_and_set`` is two round
    trips, ``gets`` then ``cas``: memcached cannot compare a value in one command, so
    the value is compared here and the ``cas`` token makes the write conditional on
    nothing having changed in between, which keeps it atomic. ``add`` is a meta set
    in add mode that also answers the new item's ``cas`` token; the backend keeps it
    (see :class:`_CasTokens`), so swapping or deleting the value this backend added
    (a lease marker) is one ``cas``: a lease miss costs 3 round trips, not 4.

    A pool (two or more servers, or a ``HashClient``) hashes each key to one server
    with the HashClient's hasher (rendezvous hashing by default), over a membership
    that only :meth:`add_server` changes. A server is never dropped from the hash, so
    a live server's keys never move behind the caller's back. Instead each server has
    a circuit breaker of its own: after ``node_failures`` consecutive calls it did
    not answer, calls for its keys fail at once with ``BackendUnavailable`` (reads
    are misses, failed deletes are journaled by the Cache) while the other servers
    carry on. Every ``node_cooldown`` seconds one caller probes it; with
    ``flush_on_join`` the probe is ``flush_all``, so a server that was down, and may
    hold entries whose deletes it missed, is emptied before anything reads it. A
    server added with :meth:`add_server` is flushed before it joins, too. Because the
    pool isolates failures per server, a Cache over a pool gets no cache-wide breaker
    by default: one would turn one dead server into misses on all of them.

    Args:
        servers: ``"host:port"`` (or a list of them; ``unix:/path`` works too), or a
            pymemcache ``Client``, ``PooledClient`` or ``HashClient`` to use as given
            and never close. A plain ``Client`` has one socket and is not
            thread-safe; a server list gives a thread-safe backend. Two or more
            servers make a pool (hashed as a ``HashClient`` hashes), each server with
            its own connections (see ``pool_size``). A
            ``HashClient``'s own retry and dead-server settings are not used.
        timeout: seconds allowed for each command, when the backend builds the client.
        connect_timeout: seconds allowed for connecting, likewise.
        node_failures: consecutive unanswered calls that mark a pool server down.
        node_cooldown: seconds between probes of a pool server that is down.
        flush_on_join: flush a pool server before it is used again after being down,
            and before an added server joins (``False``: rely on the Cache's journal
            alone, e.g. where ``flush_all`` is disabled or the servers are shared).
        pool_size: connections kept open per server between calls, when the backend
            builds the clients. A caller never waits for one: more concurrent callers
            open more, and each surplus connection is closed when its call ends (like
            SQLAlchemy's ``pool_size`` with unlimited overflow). Set it to the number
            of threads that use the cache at once, so that busy periods reuse
            connections instead of opening and closing one per call.

    After ``os.fork()`` the child uses connections of its own: it closes its copies of
    the inherited sockets (the parent's stay open, and nothing is sent on them), an
    injected client's included, and reconnects on first use (see :mod:`cachekit.forks`).

    Raises:
        ConfigurationError: no servers, a malformed address, or an injected client
            that would hide errors (``ignore_exc=True``), prefix keys or
            deserialize values.
    """

    #: Keys within memcached's policy, its item size limit, its whole-second clock
    #: (see :data:`~cachekit.backends.memcached_core.CAPABILITIES`).
    capabilities = CAPABILITIES

    def __init__(
        self,
        servers: str | Sequence[str] | Client | PooledClient | HashClient,
        *,
        timeout: float = 0.1,
        connect_timeout: float = 0.1,
        node_failures: int = 3,
        node_cooldown: float = 1.0,
        flush_on_join: bool = True,
        pool_size: int = 16,
    ) -> None:
        _check_counts(node_failures=node_failures, pool_size=pool_size)
        _check_seconds("node_cooldown", node_cooldown)
        ring = partial(
            _Ring,
            failures=node_failures,
            cooldown=node_cooldown,
            flush=bool(flush_on_join),
            routes=_MAX_ROUTES,
            pool_size=pool_size,
        )
        self._nodes = _nodes_for(servers, timeout, connect_timeout, ring, pool_size)
        if isinstance(self._nodes, _Ring):
            # Failures are isolated per server, so the Cache needs no breaker of its own.
            self.capabilities = dataclasses.replace(self.capabilities, isolates_failures=True)
        self._tokens = _CasTokens()
        # Off once a server refused the meta command (memcached before 1.6).
        self._meta = True

    def get(self, key: str) -> Any:
        nodes = self._nodes
        try:
            value = nodes.run(nodes.node_for(key), "get", key)
        except _DRIVER_ERRORS as exc:
            raise _wrap("get", exc) from exc
        return MISSING if value is None else value

    def _each_server(
        self, operation: str, keys: Iterable[str], call: Callable[[Any, list[str]], object]
    ) -> None:
        """``call(node, its_keys)`` for each server the keys live on. A server that
        fails does not stop the others: its error is raised once they are done."""
        error: Exception | None = None
        for node, node_keys in self._nodes.group(keys).items():
            try:
                call(node, node_keys)
            except (*_DRIVER_ERRORS, BackendError) as exc:
                error = error or exc
        if isinstance(error, BackendError):
            raise error
        if error is not None:
            raise _wrap(operation, error) from error

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        if keys:
            run = self._nodes.run
            self._each_server(
                "get_many", keys, lambda node, ks: found.update(run(node, "get_many", ks))
            )
        return found

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        nodes = self._nodes
        try:
            stored = nodes.run(nodes.node_for(key), "set", key, value, _expire(ttl), noreply=False)
        except _DRIVER_ERRORS as exc:
            raise _wrap("set", exc) from exc
        if not stored:
            raise BackendError(f"memcached did not store {key!r}")

    def set_many(self, items: Mapping[str, Any], ttl: float | None) -> None:
        if not items:
            return
        expire = _expire(ttl)
        failed: list[str] = []

        def store(node: Any, keys: list[str]) -> None:
            batch = {key: items[key] for key in keys}
            failed.extend(self._nodes.run(node, "set_many", batch, expire, noreply=False))

        self._each_server("set_many", items, store)
        if failed:
            raise BackendError(f"memcached did not store {len(failed)} of {len(items)} keys")

    def delete(self, key: str) -> None:
        nodes = self._nodes
        try:
            nodes.run(nodes.node_for(key), "delete", key, noreply=False)
        except _DRIVER_ERRORS as exc:
            raise _wrap("delete", exc) from exc

    def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            run = self._nodes.run
            self._each_server(
                "delete_many", keys, lambda node, ks: run(node, "delete_many", ks, noreply=False)
            )

    def add(self, key: str, value: Any, ttl: float | None) -> bool:
        """One round trip; a small value's ``cas`` token is kept for the swap after."""
        nodes = self._nodes
        try:
            node = nodes.node_for(key)
            if self._meta and type(value) is bytes and len(value) <= _MAX_TOKEN_VALUE:
                try:
                    token = nodes.run(node, _meta_add, key, value, _add_expire(ttl))
                except MemcacheClientError as exc:
                    if isinstance(exc, MemcacheIllegalInputError):
                        raise  # a bad key, refused before sending: plain add would too
                    # The server does not speak meta set (the connection is closed
                    # on any error, so nothing of the refused command lingers).
                    self._meta = False
                else:
                    if token:
                        self._tokens.remember(key, value, node, token)
                    return token is not None
            stored = nodes.run(node, "add", key, value, _add_expire(ttl), noreply=False)
        except _DRIVER_ERRORS as exc:
            raise _wrap("add", exc) from exc
        return bool(stored)

    def _swap(self, key: str, expected: Any, value: Any, expire: int) -> bool:
        """Write ``value`` (``expire``) if the key holds ``expected``; driver errors raise.

        With the token of our own ``add`` of ``expected`` it is one ``cas``: stored, or
        NOT_FOUND (absent, so it cannot hold ``expected``) settles it. EXISTS means the
        item was rewritten since, almost surely with another value, but a rewrite with
        the same bytes still holds ``expected``, so that rare case takes the long way:
        ``gets``, compare, then ``cas`` with the token ``gets`` answered (the ``cas``
        fails if anyone wrote in between, which keeps it atomic).
        """
        nodes = self._nodes
        node = nodes.node_for(key)
        token = self._tokens.take(key, expected, node)
        if token is not None:
            stored = nodes.run(node, "cas", key, value, token, expire, noreply=False)
            if stored is not False:  # True: stored; None: NOT_FOUND
                return bool(stored)
        current, token = nodes.run(node, "gets", key)
        if current is None or current != expected:
            return False
        return bool(nodes.run(node, "cas", key, value, token, expire, noreply=False))

    def compare_and_set(self, key: str, expected: Any, value: Any, ttl: float | None) -> bool:
        """Replace the value if it equals ``expected``: ``gets``, compare, then ``cas``.

        Two round trips, since memcached has no command that compares a value; the
        ``cas`` token from ``gets`` fails the write if anyone wrote in between. One
        round trip, the ``cas`` alone, when ``expected`` is what this backend's ``add``
        stored there (see :meth:`_swap`).
        """
        try:
            return self._swap(key, expected, value, _expire(ttl))
        except _DRIVER_ERRORS as exc:
            raise _wrap("compare_and_set", exc) from exc

    def add_many(self, items: Mapping[str, Any], ttl: float | None) -> AbstractSet[str]:
        """One pipelined write of ``add`` commands per server (pymemcache's internal
        ``_store_cmd``, which its own ``set_many`` uses)."""
        expire = _add_expire(ttl)
        stored: set[str] = set()

        def add(node: Any, keys: list[str]) -> None:
            batch = {key: items[key] for key in keys}
            result = self._nodes.run(node, _add_many, batch, expire)
            stored.update(key for key, ok in result.items() if ok)

        self._each_server("add_many", items, add)
        return stored

    def compare_and_set_many(
        self, items: Mapping[str, tuple[Any, Any]], ttl: float | None
    ) -> AbstractSet[str]:
        """One ``gets`` of every key per server, then one ``cas`` per matching key
        (each ``cas`` carries its own token, so they cannot share a command)."""
        expire = _expire(ttl)
        stored: set[str] = set()

        def swap(node: Any, keys: list[str]) -> None:
            current = self._nodes.run(node, "gets_many", keys)
            for key, (value, token) in current.items():
                expected, new = items[key]
                if value == expected and self._nodes.run(
                    node, "cas", key, new, token, expire, noreply=False
                ):
                    stored.add(key)

        self._each_server("compare_and_set_many", items, swap)
        return stored

    def compare_and_delete(self, key: str, expected: Any) -> bool:
        """Delete the key if it equals ``expected``: ``gets``, compare, then ``cas``.

        memcached's ``delete`` takes no cas token, so the delete is a ``cas`` with a
        negative exptime, which memcached applies as "expired now": the item is gone
        for every reader, and the token keeps the delete conditional. Like
        :meth:`compare_and_set`, one round trip for a value this backend added.
        """
        try:
            return self._swap(key, expected, b"", _EXPIRED_NOW)
        except _DRIVER_ERRORS as exc:
            raise _wrap("compare_and_delete", exc) from exc

    def add_server(self, server: str) -> None:
        """Add a server to the pool: about ``1/(N+1)`` of the keys move to it.

        With ``flush_on_join`` it is flushed before it joins, so entries it holds from
        an earlier time in a pool are never read. Moved keys start as misses; their
        old entries stay, unread, on the servers they left until they expire. Add it
        in every process that shares the pool: a process still hashing over the old
        membership reads and deletes moved keys on the servers they left.

        Raises:
            ConfigurationError: a single-server backend, a bad address, or a server
                already in the pool.
            BackendError: the server could not be reached (or flushed); not added.
        """
        nodes = self._nodes
        if not isinstance(nodes, _Ring):
            raise ConfigurationError(
                "only a pool grows: build the backend with a list of servers or a HashClient"
            )
        (spec,) = _server_specs(server)
        try:
            nodes.add(spec)
        except _DRIVER_ERRORS as exc:
            raise _wrap("add_server", exc) from exc

    def node_health(self) -> dict[str, NodeHealth]:
        """Each pool server's state, by ``"host:port"``; empty for a single server,
        which the Cache's breaker covers."""
        nodes = self._nodes
        return nodes.health() if isinstance(nodes, _Ring) else {}

    def close(self) -> None:
        """Close the connections the backend opened; an injected client stays open."""
        self._nodes.close()


def _nodes_for(
    servers: str | Sequence[str] | Client | PooledClient | HashClient,
    timeout: float,
    connect_timeout: float,
    ring: Callable[..., _Ring],
    pool_size: int,
) -> _Nodes:
    """The clients behind a MemcachedBackend: an injected client as given, else built.

    Kept here, not in ``memcached_nodes``, so ``Client`` and ``HashClient`` are this
    module's names, which the tests replace to count round trips.
    """
    if isinstance(servers, HashClient):
        _check_injected(servers, list(servers.clients.values()))
        if not servers.clients:
            raise ConfigurationError("the HashClient has no servers")
        return ring(servers, owned=False)
    if isinstance(servers, Client | PooledClient):
        _check_injected(servers, [servers])
        return _Single(_Lent(servers))
    specs = _server_specs(servers)
    _check_seconds("timeout", timeout)
    _check_seconds("connect_timeout", connect_timeout)
    options = _client_options(timeout, connect_timeout)
    if len(specs) == 1:  # plain Clients: HashClient costs ~60% more a call
        return _Single(_Connections(partial(Client, specs[0], **options), pool_size))
    # Only the HashClient's hasher and client settings are used: each server gets a
    # pool of plain Clients of its own (see _Ring).
    return ring(HashClient(specs, **options), owned=True)
