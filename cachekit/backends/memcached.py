"""Memcached storage through pymemcache, one round trip per call per server."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Final, Protocol

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
    from pymemcache.exceptions import MemcacheError
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


class _Nodes(Protocol):
    """Routes keys to the pymemcache client of their server and runs commands there."""

    def node_for(self, key: str) -> Any: ...
    def group(self, keys: Iterable[str]) -> dict[Any, list[str]]: ...
    def run(self, node: Any, operation: str, *args: Any, **kwargs: Any) -> Any: ...
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

    def run(self, node: Any, operation: str, *args: Any, **kwargs: Any) -> Any:
        try:
            client = self._idle.pop()
        except IndexError:
            client = self._factory()
            self._created.append(client)
        try:
            return getattr(client, operation)(*args, **kwargs)
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

    def run(self, node: Any, operation: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(node, operation)(*args, **kwargs)

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

    def run(self, node: Any, operation: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(node, operation)
        result = self._client._safely_run_func(node, method, _SKIPPED, *args, **kwargs)
        if result is _SKIPPED:
            raise BackendError(
                f"memcached {operation} skipped: server {node.server!r} failed recently "
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
    nothing having changed in between, which keeps it atomic.

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
        nodes = self._nodes
        try:
            stored = nodes.run(nodes.node_for(key), "add", key, value, _expire(ttl), noreply=False)
        except _DRIVER_ERRORS as exc:
            raise _wrap("add", exc) from exc
        return bool(stored)

    def compare_and_set(self, key: str, expected: Any, value: Any, ttl: float | None) -> bool:
        """Replace the value if it equals ``expected``: ``gets``, compare, then ``cas``.

        Two round trips, since memcached has no command that compares a value; the
        ``cas`` token from ``gets`` fails the write if anyone wrote in between.
        """
        nodes = self._nodes
        try:
            node = nodes.node_for(key)
            current, token = nodes.run(node, "gets", key)
            if current is None or current != expected:
                return False
            stored = nodes.run(node, "cas", key, value, token, _expire(ttl), noreply=False)
        except _DRIVER_ERRORS as exc:
            raise _wrap("compare_and_set", exc) from exc
        return bool(stored)

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
        for every reader, and the token keeps the delete conditional.
        """
        nodes = self._nodes
        try:
            node = nodes.node_for(key)
            current, token = nodes.run(node, "gets", key)
            if current is None or current != expected:
                return False
            stored = nodes.run(node, "cas", key, b"", token, _EXPIRED_NOW, noreply=False)
        except _DRIVER_ERRORS as exc:
            raise _wrap("compare_and_delete", exc) from exc
        return bool(stored)

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
