"""A pool of memcached servers on a fixed hash ring, each behind a circuit breaker of its own.

The breakers and the ring are :mod:`cachekit.backends.memcached_ring`'s; this module
drives them with pymemcache clients.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Final

from cachekit.backends.memcached_nodes import _Connections, _Lent, _Operation, _Source
from cachekit.backends.memcached_ring import NodeHealth, _Members, _Node
from cachekit.exceptions import missing_dependency
from cachekit.forks import renew_locks_in_child

try:
    from pymemcache.client.base import PooledClient
    from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_dependency("pymemcache", "memcached") from exc

# What a pool server that did not answer raises (as opposed to answering with an error).
_UNANSWERED: Final = (OSError, MemcacheUnexpectedCloseError)


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
        node.settle_probe(answered=answered, flush=self._flush, refusal=refusal)

    def add(self, spec: Any) -> None:
        """Add a server, flushed first when ``flush`` is on; its keys move to it.

        The client is built as ``HashClient.add_server`` builds one, and registered
        with the HashClient only once the server answered.
        """
        ring = self._client
        with self._lock:
            name = ring._make_client_key(spec)
            self.members.check_new(name)
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
            self.members = self.members.joined(name, node)

    def health(self) -> dict[str, NodeHealth]:
        return self.members.health()

    def close(self) -> None:
        """Close the owned pools; a caller's clients stay open."""
        for node in self.members.nodes.values():
            node.source.close()
