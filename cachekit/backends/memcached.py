"""Memcached storage through pymemcache, one round trip per call per server."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from functools import partial
from typing import Any, Final, Protocol, cast

from cachekit.backends.base import MISSING, KeyPolicy
from cachekit.exceptions import (
    BackendError,
    BackendTimeout,
    ConfigurationError,
    missing_dependency,
)

try:
    from pymemcache.client.base import Client, PooledClient, normalize_server_spec
    from pymemcache.client.hash import HashClient
    from pymemcache.exceptions import (
        MemcacheClientError,
        MemcacheError,
        MemcacheIllegalInputError,
        MemcacheUnknownError,
    )
    from pymemcache.serde import LegacyWrappingSerde
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_dependency("pymemcache", "memcached") from exc

__all__ = ["MemcachedBackend"]

# memcached reads an expiry above 30 days as a unix timestamp, not a duration.
_MAX_RELATIVE_EXPIRE: Final = 30 * 24 * 3600
_DRIVER_ERRORS: Final = (MemcacheError, OSError)
# A negative exptime stores the item already expired: a conditional delete via cas.
_EXPIRED_NOW: Final = -1
# Returned by HashClient in place of a result when it skipped a failing server.
_SKIPPED: Final = object()
# CAS uniques remembered from our own adds: at most this many, for values at most this
# long (lease markers are 18 bytes), so a caller that never swaps leaks nothing.
_MAX_TOKENS: Final = 10_000
_MAX_TOKEN_VALUE: Final = 256


def _expire(ttl: float | None) -> int:
    """The ``exptime`` memcached expects: whole seconds rounded up, 0 for no expiry."""
    if ttl is None:
        return 0
    seconds = max(1, math.ceil(ttl))
    if seconds > _MAX_RELATIVE_EXPIRE:
        return math.ceil(time.time() + ttl)
    return seconds


def _wrap(operation: str, exc: Exception) -> BackendError:
    """The cachekit exception for a driver error; the caller raises it ``from exc``."""
    message = f"memcached {operation} failed: {exc!r}"
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return BackendTimeout(message)
    return BackendError(message)


class _BytesSerde:
    """Passes bytes through untouched: serialization is the Cache facade's job."""

    def serialize(self, key: bytes, value: Any) -> tuple[bytes, int]:
        if not isinstance(value, bytes):
            # pymemcache would otherwise store str(value): silent corruption.
            raise TypeError(f"memcached values are bytes, not {type(value).__name__}")
        return value, 0

    def deserialize(self, key: bytes, value: bytes, flags: int) -> bytes:
        return value


_SERDE: Final = _BytesSerde()


def _meta_add(client: Any, key: str, value: bytes, expire: int) -> bytes | None:
    """memcached's ``add`` that also answers the new item's CAS unique, in one round trip.

    Meta set in add mode, ``ms <key> <len> c T<exptime> ME``: ``c`` asks for the CAS
    unique, ``T`` is the exptime (same meaning as the text protocol's: 0 is no expiry, over
    30 days a unix time), ``ME`` is mode add. Client flags default to 0, as plain
    ``add`` writes them through ``_BytesSerde``, so ``get`` reads the value unchanged. The
    reply is ``HD c<unique>`` when stored and ``NS ...`` when the key was present.
    ``raw_command`` could frame it too, but it names the command by its whole text,
    value bytes included; ``_misc_cmd`` (pymemcache's own framing for one-line replies)
    names it ``ms``. Returns the unique if stored (b"" if the server left it out), else
    None.
    """
    if isinstance(client, PooledClient):
        with client.client_pool.get_and_release(destroy_on_fail=True) as borrowed:
            return _meta_add(borrowed, key, value, expire)
    name = client.check_key(key, client.key_prefix)
    command = b"ms %b %d c T%d ME\r\n%b\r\n" % (name, len(value), expire, value)
    reply: bytes = client._misc_cmd([command], b"ms", False)[0]
    code, *tokens = reply.split()
    if code == b"NS":
        return None
    if code != b"HD":
        raise MemcacheUnknownError(f"unexpected reply to meta add: {reply!r}")
    return next((token[1:] for token in tokens if token.startswith(b"c")), b"")


class _CasTokens:
    """The CAS unique of each item our ``add`` stored, by ``(key, value)``, used once.

    Why a remembered unique stands in for comparing the value: memcached gives an item
    a new CAS unique on every modification (set, cas, append, incr...) and a fresh
    one to every item it stores, from a per-server counter that only grows. So while
    the item we added still carries the unique our ``add`` answered, it is that same
    item, unmodified, holding the value we wrote; a ``cas`` with that unique succeeds
    only then, atomically. Once anyone wrote the key, or it expired, was deleted or
    evicted, the ``cas`` fails (EXISTS or NOT_FOUND) and nothing is written.

    Keying by ``(key, value)`` means a token only ever answers for the very value it
    was issued for, and the node it came from is kept so that a key the ring has since
    moved to another server (whose uniques are unrelated) is not swapped with it.
    Bounded: beyond ``limit`` entries the oldest is dropped (its swap then costs the
    ``gets`` again). A memcached restart within a lease resets the counter, so in
    principle a new item under the same key could reach the same unique; that needs
    the same key rewritten and the counter landing on that exact number inside one
    lease, a risk the plain ``gets``-then-``cas`` shares on a smaller window.
    """

    def __init__(self, limit: int = _MAX_TOKENS) -> None:
        self._limit = limit
        self._tokens: dict[tuple[str, bytes], tuple[Any, bytes]] = {}
        self._lock = threading.Lock()

    def remember(self, key: str, value: bytes, node: Any, token: bytes) -> None:
        with self._lock:
            tokens = self._tokens
            tokens.pop((key, value), None)  # re-added: newest again
            tokens[key, value] = (node, token)
            if len(tokens) > self._limit:
                del tokens[next(iter(tokens))]

    def take(self, key: str, value: Any, node: Any) -> bytes | None:
        """The token for ``(key, value)`` on ``node``, forgotten; None if there is none."""
        if type(value) is not bytes or not self._tokens:
            return None
        with self._lock:
            entry = self._tokens.pop((key, value), None)
        if entry is None or entry[0] is not node:
            return None
        return entry[1]

    def __len__(self) -> int:
        return len(self._tokens)


# A client method's name, or a function called with the client as first argument.
_Operation = str | Callable[..., Any]


def _bind(client: Any, operation: _Operation) -> Callable[..., Any]:
    if isinstance(operation, str):
        return cast(Callable[..., Any], getattr(client, operation))
    return partial(operation, client)


def _name(operation: _Operation) -> str:
    return operation if isinstance(operation, str) else operation.__name__.lstrip("_")


class _Nodes(Protocol):
    """Routes keys to the pymemcache client of their server and runs commands there."""

    def node_for(self, key: str) -> Any: ...
    def group(self, keys: Iterable[str]) -> dict[Any, list[str]]: ...
    def run(self, node: Any, operation: _Operation, *args: Any, **kwargs: Any) -> Any: ...
    def close(self) -> None: ...


class _Pool:
    """Plain Clients for one server, one per concurrent caller.

    A pymemcache ``Client`` owns one socket and is not thread-safe: threads sharing
    one interleave their replies. ``PooledClient`` is safe but costs ~2 us a call in
    its lock and context manager; ``list.pop`` and ``list.append`` are atomic under
    the GIL, so a free list costs ~0.1 us. The pool grows to peak concurrency.
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._idle: list[Any] = []
        self._created: list[Any] = []

    def node_for(self, key: str) -> Any:
        return None

    def group(self, keys: Iterable[str]) -> dict[Any, list[str]]:
        return {None: list(keys)}

    def run(self, node: Any, operation: _Operation, *args: Any, **kwargs: Any) -> Any:
        try:
            client = self._idle.pop()
        except IndexError:
            client = self._factory()
            self._created.append(client)
        try:
            return _bind(client, operation)(*args, **kwargs)
        finally:
            # pymemcache closes the socket on any error, so the client reconnects
            # on its next use and is safe to reuse.
            self._idle.append(client)

    def close(self) -> None:
        for client in self._created:
            client.close()


class _Injected:
    """A caller's ``Client`` or ``PooledClient``, used as given and never closed."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def node_for(self, key: str) -> Any:
        return self._client

    def group(self, keys: Iterable[str]) -> dict[Any, list[str]]:
        return {self._client: list(keys)}

    def run(self, node: Any, operation: _Operation, *args: Any, **kwargs: Any) -> Any:
        return _bind(node, operation)(*args, **kwargs)

    def close(self) -> None:
        """The caller owns the client."""


class _Ring:
    """A ``HashClient``, driven one server at a time so batches stay one round trip.

    ``HashClient.delete_many`` sends one ``delete`` per key, each its own round trip,
    so batches are grouped here by server and sent to that server's client, where
    ``delete_many`` pipelines every delete in one write. Commands go through
    ``HashClient._safely_run_func`` to keep its failed/dead server bookkeeping; when
    it skips a server in retry back-off it returns a default that would read as a
    miss (``add`` as "already present"), so a sentinel turns that into an error.
    """

    def __init__(self, client: Any, *, owned: bool) -> None:
        self._client = client
        self._owned = owned

    def node_for(self, key: str) -> Any:
        # Raises MemcacheError once every server is marked dead (ignore_exc is off).
        return self._client._get_client(key)

    def group(self, keys: Iterable[str]) -> dict[Any, list[str]]:
        groups: dict[Any, list[str]] = {}
        for key in keys:
            groups.setdefault(self.node_for(key), []).append(key)
        return groups

    def run(self, node: Any, operation: _Operation, *args: Any, **kwargs: Any) -> Any:
        method = _bind(node, operation)
        result = self._client._safely_run_func(node, method, _SKIPPED, *args, **kwargs)
        if result is _SKIPPED:
            raise BackendError(
                f"memcached {_name(operation)} skipped: server {node.server!r} failed recently "
                "and is in HashClient's retry back-off"
            )
        return result

    def close(self) -> None:
        if self._owned:
            for node in self._client.clients.values():
                node.close()


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

    Args:
        servers: ``"host:port"`` (or a list of them; ``unix:/path`` works too), or a
            pymemcache ``Client``, ``PooledClient`` or ``HashClient`` to use as given
            and never close. A plain ``Client`` has one socket and is not
            thread-safe; a server list gives a thread-safe backend. Two or more
            servers make a ``HashClient`` with its default retry and dead-server
            handling; a server that keeps failing is dropped from the ring for 60 s.
        timeout: seconds allowed for each command, when the backend builds the client.
        connect_timeout: seconds allowed for connecting, likewise.

    Raises:
        ConfigurationError: no servers, a malformed address, or an injected client
            that would hide errors (``ignore_exc=True``), prefix keys or
            deserialize values.
    """

    stores_objects = False
    # The facade hashes keys that break this policy, so keys arrive ASCII-safe.
    key_policy: KeyPolicy | None = KeyPolicy(max_bytes=250)
    #: memcached's default item limit is 1 MiB including key and item header; a larger
    #: value is refused by the server (and pymemcache reports it as "stored").
    max_value_size: int | None = 1024 * 1024 - 512

    def __init__(
        self,
        servers: str | Sequence[str] | Client | PooledClient | HashClient,
        *,
        timeout: float = 0.1,
        connect_timeout: float = 0.1,
    ) -> None:
        if isinstance(servers, HashClient):
            _check_injected(servers, list(servers.clients.values()))
            self._nodes: _Nodes = _Ring(servers, owned=False)
        elif isinstance(servers, Client | PooledClient):
            _check_injected(servers, [servers])
            self._nodes = _Injected(servers)
        else:
            self._nodes = _build(_server_specs(servers), timeout, connect_timeout)
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

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        if not keys:
            return found
        try:
            for node, node_keys in self._nodes.group(keys).items():
                found.update(self._nodes.run(node, "get_many", node_keys))
        except _DRIVER_ERRORS as exc:
            raise _wrap("get_many", exc) from exc
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
        try:
            for node, keys in self._nodes.group(items).items():
                batch = {key: items[key] for key in keys}
                failed += self._nodes.run(node, "set_many", batch, expire, noreply=False)
        except _DRIVER_ERRORS as exc:
            raise _wrap("set_many", exc) from exc
        if failed:
            raise BackendError(f"memcached did not store {len(failed)} of {len(items)} keys")

    def delete(self, key: str) -> None:
        nodes = self._nodes
        try:
            nodes.run(nodes.node_for(key), "delete", key, noreply=False)
        except _DRIVER_ERRORS as exc:
            raise _wrap("delete", exc) from exc

    def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        try:
            for node, node_keys in self._nodes.group(keys).items():
                self._nodes.run(node, "delete_many", node_keys, noreply=False)
        except _DRIVER_ERRORS as exc:
            raise _wrap("delete_many", exc) from exc

    def add(self, key: str, value: Any, ttl: float | None) -> bool:
        """One round trip; a small value's ``cas`` token is kept for the swap after."""
        nodes = self._nodes
        try:
            node = nodes.node_for(key)
            if (
                self._meta
                and type(value) is bytes
                and len(value) <= _MAX_TOKEN_VALUE
                and (node is None or isinstance(node, Client | PooledClient))
            ):
                try:
                    token = nodes.run(node, _meta_add, key, value, _expire(ttl))
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
            stored = nodes.run(node, "add", key, value, _expire(ttl), noreply=False)
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
        ``_store_cmd``, which its own ``set_many`` uses); per key on an injected
        ``PooledClient``, which does not expose it."""
        expire = _expire(ttl)
        stored: set[str] = set()
        try:
            for node, keys in self._nodes.group(items).items():
                batch = {key: items[key] for key in keys}
                if node is None or isinstance(node, Client):  # None: our own pool of Clients
                    result = self._nodes.run(node, "_store_cmd", b"add", batch, expire, False)
                    stored.update(key for key, ok in result.items() if ok)
                else:
                    for key, value in batch.items():
                        if self._nodes.run(node, "add", key, value, expire, noreply=False):
                            stored.add(key)
        except _DRIVER_ERRORS as exc:
            raise _wrap("add_many", exc) from exc
        return stored

    def compare_and_set_many(
        self, items: Mapping[str, tuple[Any, Any]], ttl: float | None
    ) -> AbstractSet[str]:
        """One ``gets`` of every key per server, then one ``cas`` per matching key
        (each ``cas`` carries its own token, so they cannot share a command)."""
        expire = _expire(ttl)
        stored: set[str] = set()
        try:
            for node, keys in self._nodes.group(items).items():
                current = self._nodes.run(node, "gets_many", keys)
                for key, (value, token) in current.items():
                    expected, new = items[key]
                    if value == expected and self._nodes.run(
                        node, "cas", key, new, token, expire, noreply=False
                    ):
                        stored.add(key)
        except _DRIVER_ERRORS as exc:
            raise _wrap("compare_and_set_many", exc) from exc
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

    def close(self) -> None:
        """Close the connections the backend opened; an injected client stays open."""
        self._nodes.close()


def _server_specs(servers: str | Sequence[str]) -> list[Any]:
    """Parse ``host:port`` strings into pymemcache's server specs."""
    names = [servers] if isinstance(servers, str) else list(servers)
    if not names:
        raise ConfigurationError("MemcachedBackend needs at least one server")
    specs = []
    for name in names:
        if not isinstance(name, str):
            raise ConfigurationError(f"servers are 'host:port' strings, got {name!r}")
        try:
            specs.append(normalize_server_spec(name))
        except ValueError as exc:
            raise ConfigurationError(f"bad memcached address {name!r}: {exc}") from exc
    return specs


def _build(specs: list[Any], timeout: float, connect_timeout: float) -> _Nodes:
    """Plain Clients for one server (HashClient costs ~60% more a call); else a ring."""
    for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
        if not (isinstance(value, int | float) and value > 0):
            raise ConfigurationError(f"{name} must be positive seconds, got {value!r}")
    options: dict[str, Any] = {
        "serde": _SERDE,
        "timeout": timeout,
        "connect_timeout": connect_timeout,
        "no_delay": True,  # a large batch must not wait on Nagle's algorithm
        "default_noreply": False,
    }
    if len(specs) == 1:
        return _Pool(lambda: Client(specs[0], **options))
    # use_pooling: each server gets a thread-safe PooledClient.
    return _Ring(HashClient(specs, use_pooling=True, **options), owned=True)


def _check_injected(client: Any, nodes: list[Any]) -> None:
    """Refuse a client that would hide errors or alter keys or values."""
    if client.ignore_exc:
        raise ConfigurationError(
            "the memcached client has ignore_exc=True, which turns server errors into "
            "misses; build it with ignore_exc=False so cache failures are reported"
        )
    for node in nodes:
        if node.key_prefix:
            raise ConfigurationError(
                "the memcached client has a key_prefix; use the Cache namespace instead, "
                "so the 250-byte key limit is checked against the full key"
            )
        if not _passes_bytes_through(node.serde):
            raise ConfigurationError(
                "the memcached client has a serializer; leave it out: values reach the "
                "backend as bytes, already serialized by the Cache"
            )


def _passes_bytes_through(serde: Any) -> bool:
    if isinstance(serde, _BytesSerde):
        return True
    return (
        isinstance(serde, LegacyWrappingSerde)
        and serde.serialize == serde._default_serialize
        and serde.deserialize == serde._default_deserialize
    )
