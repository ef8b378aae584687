"""A pool of memcached servers on a fixed hash ring, each behind a circuit breaker of its own."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Literal

from cachekit.backends.memcached_nodes import _Connections, _Lent, _Operation, _Source
from cachekit.exceptions import BackendUnavailable, ConfigurationError, missing_dependency
from cachekit.forks import renew_locks_in_child, reset_in_child

try:
    from pymemcache.client.base import PooledClient
    from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_dependency("pymemcache", "memcached") from exc

logger = logging.getLogger("cachekit")

# What a pool server that did not answer raises (as opposed to answering with an error).
_UNANSWERED: Final = (OSError, MemcacheUnexpectedCloseError)


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
    """One pool server: where its commands run, and a circuit breaker of its own.

    Up, calls go through. ``failures`` consecutive calls that got no answer (refused,
    timed out, connection closed) mark it down: calls for its keys then fail at once
    with :class:`BackendUnavailable`. After ``cooldown`` seconds the next caller probes
    it, alone (see :meth:`_Ring.probe`); until the probe succeeds nobody else reaches
    the server, so nothing is read from it before it is flushed.
    """

    def __init__(
        self,
        name: str,
        source: _Source,
        server: Any,
        *,
        failures: int,
        cooldown: float,
        timer: Callable[[], float],
    ) -> None:
        self.name = name
        self.source = source
        self.server = server
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
        renew_locks_in_child(self, "_lock")
        reset_in_child(self, _Node._probe_lost_in_fork)

    def _probe_lost_in_fork(self) -> None:
        # A probe (or a join) in flight in another thread does not exist in a child:
        # without this, the child would treat this server as being probed forever.
        if self.state == "probing":
            self.state = "down"
            self._down_at = float("-inf")  # the child's next call probes it

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
    are remembered, at most ``limit`` of them (then forgotten all at once, which
    costs only the hashing again); a membership change builds a new ``_Members``.
    """

    __slots__ = ("hasher", "limit", "nodes", "routes")

    def __init__(self, hasher_type: type[Any], nodes: dict[str, _Node], limit: int) -> None:
        self.hasher = hasher_type()
        for name in nodes:
            self.hasher.add_node(name)
        self.nodes = nodes
        self.limit = limit
        self.routes: dict[str, _Node] = {}

    def node_for(self, key: str) -> _Node:
        node = self.routes.get(key)
        if node is None:
            node = self.nodes[self.hasher.get_node(key)]
            if len(self.routes) >= self.limit:
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
    (``HashClient.delete_many`` would make one round trip per key). At most ``routes``
    key-to-server routes are remembered (see :class:`_Members`). An ``owned`` ring
    runs each server's commands on plain Clients of its own, at most ``pool_size``
    kept open per server (see :class:`_Connections`); a caller's HashClient's clients
    are used as given.
    """

    def __init__(
        self,
        client: Any,
        *,
        owned: bool,
        failures: int,
        cooldown: float,
        flush: bool,
        routes: int,
        pool_size: int,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._owned = owned
        self._flush = flush
        self._pool_size = pool_size
        self._node = partial(_Node, failures=failures, cooldown=cooldown, timer=timer)
        nodes = {name: self._node_for(name, node) for name, node in client.clients.items()}
        self.members = _Members(type(client.hasher), nodes, routes)
        self._lock = threading.Lock()
        renew_locks_in_child(self, "_lock")

    def _node_for(self, name: str, client: Any) -> _Node:
        """The node for one of the HashClient's clients: used as given if the caller's,
        else only a template for the plain Clients of the node's own pool."""
        source: _Source
        if self._owned:
            factory = partial(
                self._client.client_class, client.server, **self._client.default_kwargs
            )
            source = _Connections(factory, self._pool_size)
        else:
            source = _Lent(client)
        return self._node(name, source, client.server)

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
            result = node.source.run(node, operation, *args, **kwargs)
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
                answered = bool(node.source.run(node, "flush_all", noreply=False))
            else:
                answered = bool(node.source.run(node, "version"))
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
            node = self._node_for(name, client)
            node.state = "probing"  # nobody can reach it before it has joined
            try:
                self.probe(node)
            except BaseException:
                node.source.close()
                client.close()
                raise
            ring.clients[name] = client
            ring.hasher.add_node(name)
            members = self.members
            self.members = _Members(
                type(members.hasher), {**members.nodes, name: node}, members.limit
            )

    def health(self) -> dict[str, NodeHealth]:
        return {name: node.health() for name, node in self.members.nodes.items()}

    def close(self) -> None:
        """Close the owned pools; a caller's clients stay open."""
        for node in self.members.nodes.values():
            node.source.close()
