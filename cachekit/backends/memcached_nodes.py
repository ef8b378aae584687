"""The clients MemcachedBackend talks through: built, checked, and picked for a key."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Final, Protocol, cast

from cachekit.exceptions import ConfigurationError, missing_dependency
from cachekit.forks import reset_in_child

try:
    from pymemcache.client.base import PooledClient, normalize_server_spec
    from pymemcache.pool import ObjectPool
    from pymemcache.serde import LegacyWrappingSerde
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_dependency("pymemcache", "memcached") from exc


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


# A client method's name, or a function called with the client as first argument.
_Operation = str | Callable[..., Any]


def _bind(client: Any, operation: _Operation) -> Callable[..., Any]:
    if isinstance(operation, str):
        return cast(Callable[..., Any], getattr(client, operation))
    return partial(operation, client)


class _Nodes(Protocol):
    """Routes keys to the pymemcache client of their server and runs commands there."""

    def node_for(self, key: str) -> Any: ...
    def group(self, keys: Iterable[str]) -> dict[Any, list[str]]: ...
    def run(self, node: Any, operation: _Operation, *args: Any, **kwargs: Any) -> Any: ...
    def close(self) -> None: ...


class _Source(Protocol):
    """Where one server's commands run: a pool of our own, or a caller's client.

    ``run`` takes the ``_Nodes.run`` arguments, node included (a source serves one
    server, so it ignores it): a single server's ``_Nodes.run`` is then the source's
    own, one call frame less on every hit.
    """

    def run(self, node: Any, operation: _Operation, *args: Any, **kwargs: Any) -> Any: ...
    def close(self) -> None: ...


class _Connections:
    """Plain Clients for one server, one per concurrent caller; ``keep`` stay open.

    A pymemcache ``Client`` owns one socket and is not thread-safe: threads sharing
    one interleave their replies. ``PooledClient`` is safe but costs ~2 us a call in
    its lock and context manager; ``list.pop`` and ``list.append`` are atomic under
    the GIL, so a free list costs ~0.1 us. More concurrent callers than ``keep`` open
    more sockets, and each surplus one is closed as its call ends (SQLAlchemy's
    ``pool_size`` with unbounded overflow): callers never wait for a connection, and
    between bursts at most ``keep`` sockets stay open. In a child process after
    ``fork()`` every inherited client is forgotten (see :mod:`cachekit.forks`).
    """

    def __init__(self, factory: Callable[[], Any], keep: int) -> None:
        self._factory = factory
        self._keep = keep
        self._idle: list[Any] = []
        # Every client that may hold a socket, in use or idle: what close() closes.
        self._open: set[Any] = set()
        reset_in_child(self, _Connections._forget)

    def run(self, node: Any, operation: _Operation, *args: Any, **kwargs: Any) -> Any:
        idle = self._idle
        try:
            client = idle.pop()
        except IndexError:
            client = self._factory()
            self._open.add(client)
        try:
            return _bind(client, operation)(*args, **kwargs)
        except BaseException as exc:
            # pymemcache closes the socket on an Exception; an interrupt (KeyboardInterrupt,
            # a signal handler's exception) may leave a reply unread on it, which the next
            # caller would take for its own: close it here, so the client reconnects.
            if not isinstance(exc, Exception):
                client.close()
            raise
        finally:
            idle.append(client)
            if len(idle) > self._keep:
                self._trim(idle)

    def _trim(self, idle: list[Any]) -> None:
        # Not "append if short": two callers could both see room. Each caller trims
        # after appending, so once the callers are done at most ``keep`` are idle.
        while len(idle) > self._keep:
            try:
                surplus = idle.pop()
            except IndexError:  # another caller took the last one meanwhile
                break
            self._open.discard(surplus)
            surplus.close()

    @property
    def connections(self) -> int:
        """Clients that may hold an open socket (idle or in use)."""
        return len(self._open)

    def close(self) -> None:
        for client in list(self._open):
            client.close()

    def _forget(self) -> None:
        """In a fork child: the parent's clients are not ours to use. ``Client.close``
        only closes this process's file descriptor: nothing is sent to the server."""
        clients = list(self._open)
        self._idle = []
        self._open = set()
        for client in clients:
            client.close()


class _Lent:
    """A caller's ``Client`` or ``PooledClient``, used as given and never closed; in a
    child process after ``fork()`` it drops its inherited connections."""

    def __init__(self, client: Any) -> None:
        self.client = client
        reset_in_child(self, _Lent._forget)

    def run(self, node: Any, operation: _Operation, *args: Any, **kwargs: Any) -> Any:
        return _bind(self.client, operation)(*args, **kwargs)

    def close(self) -> None:
        """The caller owns the client."""

    def _forget(self) -> None:
        client = self.client
        if not isinstance(client, PooledClient):
            client.close()  # closes this process's descriptor; reconnects on next use
            return
        # The pool's lock may be held by a thread that does not exist here, so neither
        # it nor ``clear()`` may be used: read the members, and swap in a new pool.
        inherited = client.client_pool
        for member in (*inherited.used, *inherited.free):
            member.close()
        client.client_pool = ObjectPool(
            client._create_client,
            after_remove=lambda member: member.close(),
            max_size=inherited.max_size,
            idle_timeout=inherited.idle_timeout,
        )


class _Single:
    """One server: every key goes to it."""

    def __init__(self, source: _Source) -> None:
        self.source = source
        self.run = source.run

    def node_for(self, key: str) -> Any:
        return None

    def group(self, keys: Iterable[str]) -> dict[Any, list[str]]:
        return {None: list(keys)}

    def close(self) -> None:
        self.source.close()


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


def _node_name(spec: Any) -> str:
    """A server's name in the hash ring, as ``HashClient`` names it: ``"host:port"``, or
    a unix socket's path. Every client that agrees on the names agrees on the routes."""
    if isinstance(spec, tuple):
        return "%s:%s" % spec  # noqa: UP031 - HashClient's exact formatting
    return str(spec)


def _check_seconds(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and value > 0):
        raise ConfigurationError(f"{name} must be positive seconds, got {value!r}")


def _client_options(timeout: float, connect_timeout: float) -> dict[str, Any]:
    return {
        "serde": _SERDE,
        "timeout": timeout,
        "connect_timeout": connect_timeout,
        "no_delay": True,  # a large batch must not wait on Nagle's algorithm
        "default_noreply": False,
    }


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
