"""Memcached storage through pymemcache, one round trip per call per server."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Literal, Protocol, cast

from cachekit.backends.base import MISSING, KeyPolicy
from cachekit.exceptions import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
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
        MemcacheUnexpectedCloseError,
        MemcacheUnknownError,
    )
    from pymemcache.serde import LegacyWrappingSerde
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_dependency("pymemcache", "memcached") from exc

__all__ = ["MemcachedBackend", "NodeHealth"]

logger = logging.getLogger("cachekit")

# memcached reads an expiry above 30 days as a unix timestamp, not a duration.
_MAX_RELATIVE_EXPIRE: Final = 30 * 24 * 3600
_DRIVER_ERRORS: Final = (MemcacheError, OSError)
# What a pool server that did not answer raises (as opposed to answering with an error).
_UNANSWERED: Final = (OSError, MemcacheUnexpectedCloseError)
# A negative exptime stores the item already expired: a conditional delete via cas.
_EXPIRED_NOW: Final = -1
# CAS uniques remembered from our own adds: at most this many, for values at most this
# long (lease markers are 18 bytes), so a caller that never swaps leaks nothing.
_MAX_TOKENS: Final = 10_000
_MAX_TOKEN_VALUE: Final = 256
# Key-to-server routes a pool remembers (see _Members).
_MAX_ROUTES: Final = 16_384


def _expire(ttl: float | None) -> int:
    """The ``exptime`` memcached expects: whole seconds rounded up, 0 for no expiry."""
    if ttl is None:
        return 0
    seconds = max(1, math.ceil(ttl))
    if seconds > _MAX_RELATIVE_EXPIRE:
        return math.ceil(time.time() + ttl)
    return seconds


def _add_expire(ttl: float | None) -> int:
    """``exptime`` for ``add``, which takes leases: at least ``ttl``, never less.

    memcached's clock ticks in whole seconds, so an item stored just before a tick
    with exptime ``n`` lives between ``n - 1`` and ``n`` seconds; a lease that expired
    early would let a second caller load while the first still holds it. One more
    second makes ``lease_ttl`` a floor.
    """
    expire = _expire(ttl)
    return expire + 1 if 0 < expire <= _MAX_RELATIVE_EXPIRE else expire


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


def _add_many(client: Any, values: dict[str, bytes], expire: int) -> dict[str, bool]:
    """``add`` of every item in one pipelined write, by pymemcache's internal
    ``_store_cmd`` (which its own ``set_many`` uses); a PooledClient lends a Client."""
    if isinstance(client, PooledClient):
        with client.client_pool.get_and_release(destroy_on_fail=True) as borrowed:
            return _add_many(borrowed, values, expire)
    return cast(dict[str, bool], client._store_cmd(b"add", values, expire, False))


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


_State = Literal["up", "down", "probing"]


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """One pool server as the backend last saw it (see :meth:`MemcachedBackend.node_health`).

    Attributes:
        state: ``"up"``; ``"down"``: calls for its keys fail at once; ``"probing"``:
            one caller is checking (and flushing) it before it is used again.
        marked_down: how many times it was marked down.
        flushes: how many times it was flushed before rejoining the pool.
        short_circuited: calls refused while it was down.
    """

    state: _State
    marked_down: int
    flushes: int
    short_circuited: int


class _Node:
    """One pool server: its client, and a circuit breaker of its own.

    Up, calls go through. ``failures`` consecutive calls that got no answer (refused,
    timed out, connection closed) mark it down: calls for its keys then fail at once
    with :class:`BackendUnavailable`. After ``cooldown`` seconds the next caller probes
    it, alone (see :meth:`_Ring.probe`); until the probe succeeds nobody else reaches
    the server, so nothing is read from it before it is flushed.
    """

    def __init__(
        self, name: str, client: Any, failures: int, cooldown: float, timer: Callable[[], float]
    ) -> None:
        self.name = name
        self.client = client
        self.server = client.server
        self.state: _State = "up"
        self.consecutive = 0
        self.marked_down = 0
        self.flushes = 0
        self.short_circuited = 0
        self._failures = failures
        self._cooldown = cooldown
        self._timer = timer
        self._down_at = 0.0
        self._lock = threading.Lock()

    def admit(self) -> bool:
        """True: call the server. False: this caller is the probe and must check it first.

        Raises:
            BackendUnavailable: the server is down, or another caller is probing it.
        """
        with self._lock:
            if self.state == "up":
                return True
            if self.state == "down" and self._timer() >= self._down_at + self._cooldown:
                self.state = "probing"
                return False
            self.short_circuited += 1
        raise BackendUnavailable(
            f"memcached server {self.name} is marked down after {self._failures} unanswered "
            f"calls; its keys fail fast (retry back-off of {self._cooldown} s)"
        )

    def answered(self) -> None:
        if self.consecutive:  # rare: skip the lock on the hot path
            with self._lock:
                self.consecutive = 0

    def unanswered(self) -> None:
        with self._lock:
            self.consecutive += 1
            if self.state == "up" and self.consecutive >= self._failures:
                self._mark_down()

    def probe_failed(self) -> None:
        with self._lock:
            self._mark_down()

    def rejoined(self, *, flushed: bool) -> None:
        with self._lock:
            self.state = "up"
            self.consecutive = 0
            self.flushes += flushed

    def _mark_down(self) -> None:
        if self.state == "up":
            self.marked_down += 1
        self.state = "down"
        self._down_at = self._timer()

    def health(self) -> NodeHealth:
        return NodeHealth(self.state, self.marked_down, self.flushes, self.short_circuited)


class _Members:
    """A fixed set of servers and the hasher over their names; replaced whole on change.

    pymemcache's rendezvous hasher runs murmur3 in pure Python, once per server per
    key (~8 us each): a quarter to a third of a hit's latency on three servers. So routes
    are remembered, at most ``_MAX_ROUTES`` of them (then forgotten all at once, which
    costs only the hashing again); a membership change builds a new ``_Members``.
    """

    __slots__ = ("hasher", "nodes", "routes")

    def __init__(self, hasher_type: type[Any], nodes: dict[str, _Node]) -> None:
        self.hasher = hasher_type()
        for name in nodes:
            self.hasher.add_node(name)
        self.nodes = nodes
        self.routes: dict[str, _Node] = {}

    def node_for(self, key: str) -> _Node:
        node = self.routes.get(key)
        if node is None:
            node = self.nodes[self.hasher.get_node(key)]
            if len(self.routes) >= _MAX_ROUTES:
                self.routes.clear()  # dict operations are atomic under the GIL
            self.routes[key] = node
        return node


class _Ring:
    """A HashClient's servers and hasher (rendezvous by default), over fixed membership.

    HashClient's own dead-server handling is bypassed: after ``retry_attempts``
    failures it drops a server from the hasher, so that server's keys rehash onto the
    others. Deletes during the outage land there, and when the server comes back its
    keys route home to the entries those deletes never reached: stale reads. Here a
    server never leaves the hash and joins it only by :meth:`add`; a server that is
    down fails fast (see :class:`_Node`), and with ``flush`` a server that was marked
    down, or is being added, is flushed before anything else reaches it.

    Batches are grouped by server and sent to that server's client
    (``HashClient.delete_many`` would make one round trip per key).
    """

    def __init__(
        self,
        client: Any,
        *,
        owned: bool,
        failures: int,
        cooldown: float,
        flush: bool,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._owned = owned
        self._flush = flush
        self._node = partial(_Node, failures=failures, cooldown=cooldown, timer=timer)
        nodes = {name: self._node(name, node) for name, node in client.clients.items()}
        self.members = _Members(type(client.hasher), nodes)
        self._lock = threading.Lock()

    def node_for(self, key: str) -> _Node:
        return self.members.node_for(key)

    def group(self, keys: Iterable[str]) -> dict[Any, list[str]]:
        node_for = self.members.node_for  # one membership for the whole batch
        groups: dict[Any, list[str]] = {}
        for key in keys:
            groups.setdefault(node_for(key), []).append(key)
        return groups

    def run(self, node: _Node, operation: _Operation, *args: Any, **kwargs: Any) -> Any:
        if node.state != "up" and not node.admit():
            self.probe(node)
        try:
            result = _bind(node.client, operation)(*args, **kwargs)
        except _UNANSWERED:
            node.unanswered()
            raise
        node.answered()
        return result

    def probe(self, node: _Node) -> None:
        """Check a server that was down, flushing it when ``flush`` is on; this caller
        is the only one to reach it until this returns.

        Raises:
            BackendUnavailable: it answered but refused ``flush_all`` (memcached -F);
                it stays down rather than serve entries that may be stale.
            OSError, MemcacheError: it did not answer; it stays down.
        """
        refusal: MemcacheError | None = None
        try:
            if self._flush:
                answered = bool(node.client.flush_all(noreply=False))
            else:
                answered = bool(node.client.version())
        except _UNANSWERED:
            node.probe_failed()
            raise
        except MemcacheError as exc:  # it answered, with an error
            answered, refusal = False, exc
        except BaseException:
            node.probe_failed()
            raise
        if not answered:
            node.probe_failed()
            message = (
                f"memcached server {node.name} answered but refused flush_all ({refusal!r}), "
                "so it stays down: it may hold entries whose deletes it missed. Allow "
                "flush_all, or build the backend with flush_on_join=False to rely on the "
                "Cache's invalidation journal alone"
            )
            logger.warning(message)
            raise BackendUnavailable(message) from refusal
        node.rejoined(flushed=self._flush)

    def add(self, spec: Any) -> None:
        """Add a server, flushed first when ``flush`` is on; its keys move to it.

        The client is built as ``HashClient.add_server`` builds one, and registered
        with the HashClient only once the server answered.
        """
        ring = self._client
        with self._lock:
            name = ring._make_client_key(spec)
            if name in self.members.nodes:
                raise ConfigurationError(f"memcached server {name} is already in the pool")
            client = (PooledClient if ring.use_pooling else ring.client_class)(
                spec, **ring.default_kwargs
            )
            if ring.use_pooling:
                client.client_class = ring.client_class
            node = self._node(name, client)
            node.state = "probing"  # nobody can reach it before it has joined
            try:
                self.probe(node)
            except BaseException:
                client.close()
                raise
            ring.clients[name] = client
            ring.hasher.add_node(name)
            self.members = _Members(type(self.members.hasher), {**self.members.nodes, name: node})

    def health(self) -> dict[str, NodeHealth]:
        return {name: node.health() for name, node in self.members.nodes.items()}

    def close(self) -> None:
        if self._owned:
            for node in self.members.nodes.values():
                node.client.close()


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
    pool isolates failures per server, give its Cache ``breaker=None``: a cache-wide
    breaker would turn one dead server into misses on all of them.

    Args:
        servers: ``"host:port"`` (or a list of them; ``unix:/path`` works too), or a
            pymemcache ``Client``, ``PooledClient`` or ``HashClient`` to use as given
            and never close. A plain ``Client`` has one socket and is not
            thread-safe; a server list gives a thread-safe backend. Two or more
            servers make a pool over a ``HashClient`` of pooled clients. A
            ``HashClient``'s own retry and dead-server settings are not used.
        timeout: seconds allowed for each command, when the backend builds the client.
        connect_timeout: seconds allowed for connecting, likewise.
        node_failures: consecutive unanswered calls that mark a pool server down.
        node_cooldown: seconds between probes of a pool server that is down.
        flush_on_join: flush a pool server before it is used again after being down,
            and before an added server joins (``False``: rely on the Cache's journal
            alone, e.g. where ``flush_all`` is disabled or the servers are shared).

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
        node_failures: int = 3,
        node_cooldown: float = 1.0,
        flush_on_join: bool = True,
    ) -> None:
        if not (isinstance(node_failures, int) and node_failures >= 1):
            raise ConfigurationError(f"node_failures must be >= 1, got {node_failures!r}")
        _check_seconds("node_cooldown", node_cooldown)
        ring = partial(
            _Ring, failures=node_failures, cooldown=node_cooldown, flush=bool(flush_on_join)
        )
        if isinstance(servers, HashClient):
            _check_injected(servers, list(servers.clients.values()))
            if not servers.clients:
                raise ConfigurationError("the HashClient has no servers")
            self._nodes: _Nodes = ring(servers, owned=False)
        elif isinstance(servers, Client | PooledClient):
            _check_injected(servers, [servers])
            self._nodes = _Injected(servers)
        else:
            specs = _server_specs(servers)
            _check_seconds("timeout", timeout)
            _check_seconds("connect_timeout", connect_timeout)
            options = _client_options(timeout, connect_timeout)
            if len(specs) == 1:  # plain Clients: HashClient costs ~60% more a call
                self._nodes = _Pool(lambda: Client(specs[0], **options))
            else:  # use_pooling: each server gets a thread-safe PooledClient
                self._nodes = ring(HashClient(specs, use_pooling=True, **options), owned=True)
        #: Whether failures are isolated per server (a pool), so that the Cache needs
        #: no breaker of its own.
        self.per_node_breakers = isinstance(self._nodes, _Ring)
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
