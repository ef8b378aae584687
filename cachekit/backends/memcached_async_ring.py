"""Where AsyncMemcachedBackend's commands run: one server, or a pool on the hash ring.

The pool's breakers and ring are :mod:`cachekit.backends.memcached_ring`'s, the same
the sync backend drives: keys land on the same servers as there (and as a pymemcache
``HashClient``'s), a server that stops answering fails fast, and one that was down is
flushed before it is read again. Here they are driven with awaits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

from cachekit.backends import memcached_protocol as protocol
from cachekit.backends.memcached_async_connections import PoolTimeout, ServerConnections
from cachekit.backends.memcached_nodes import _node_name
from cachekit.backends.memcached_protocol import Command, ProtocolError, ServerReplyError
from cachekit.backends.memcached_ring import MAX_ROUTES, NodeHealth, _Members, _Node
from cachekit.exceptions import missing_dependency

try:
    from pymemcache.client.rendezvous import RendezvousHash
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_dependency("pymemcache", "memcached") from exc

T = TypeVar("T")

#: Builds the connections to one server, from its spec.
Connect = Callable[[Any], ServerConnections]


class _AsyncNodes(Protocol):
    """Routes keys to their server and runs commands there."""

    def node_for(self, key: str) -> Any: ...
    def group(self, keys: Iterable[str]) -> dict[Any, list[str]]: ...
    async def run(self, node: Any, command: Command[T]) -> T: ...
    async def aclose(self) -> None: ...


class _OneServer:
    """One server: every key goes to it, and the Cache's breaker covers it."""

    def __init__(self, connections: ServerConnections) -> None:
        self.connections = connections

    def node_for(self, key: str) -> Any:
        return None

    def group(self, keys: Iterable[str]) -> dict[Any, list[str]]:
        return {None: list(keys)}

    async def run(self, node: Any, command: Command[T]) -> T:
        return await self.connections.run(command)

    async def aclose(self) -> None:
        await self.connections.aclose()


class _AsyncRing:
    """Servers on a fixed rendezvous hash, each behind a breaker (see ``_Node``).

    A server never leaves the hash; one that does not answer ``failures`` calls in a
    row fails fast, and after ``cooldown`` seconds one caller probes it alone (with
    ``flush``, by emptying it) before anyone else reaches it. A busy pool (no
    connection free in time) is not the server's fault and does not count.
    """

    def __init__(
        self,
        specs: Sequence[Any],
        *,
        connect: Connect,
        failures: int,
        cooldown: float,
        flush: bool,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self._flush = flush
        self._node = partial(_Node, failures=failures, cooldown=cooldown, timer=timer)
        nodes = {_node_name(spec): self._new_node(spec) for spec in specs}
        self.members = _Members(RendezvousHash, nodes, MAX_ROUTES)
        self._adding = asyncio.Lock()

    def _new_node(self, spec: Any) -> _Node:
        return self._node(_node_name(spec), self._connect(spec), spec)

    def node_for(self, key: str) -> _Node:
        return self.members.node_for(key)

    def group(self, keys: Iterable[str]) -> dict[Any, list[str]]:
        node_for = self.members.node_for  # one membership for the whole batch
        groups: dict[Any, list[str]] = {}
        for key in keys:
            groups.setdefault(node_for(key), []).append(key)
        return groups

    async def run(self, node: _Node, command: Command[T]) -> T:
        if node.state != "up" and not node.admit():
            await self.probe(node)
        try:
            result: T = await node.source.run(command)
        except PoolTimeout:
            raise  # busy here, not down there
        except OSError:  # refused, timed out, connection lost: unanswered
            node.unanswered()
            raise
        node.answered()
        return result

    async def probe(self, node: _Node) -> None:
        """Check a server that was down, flushing it when ``flush`` is on; this caller
        is the only one to reach it until this returns.

        Raises:
            BackendUnavailable: it answered but refused ``flush_all``; it stays down.
            OSError: it did not answer; it stays down.
        """
        refusal: Exception | None = None
        command = protocol.flush_all() if self._flush else protocol.version()
        try:
            answered = await node.source.run(command)
        except (ServerReplyError, ProtocolError) as exc:  # it answered, with an error
            answered, refusal = False, exc
        except BaseException:  # unanswered, or this caller was cancelled: still down
            node.probe_failed()
            raise
        node.settle_probe(answered=answered, flush=self._flush, refusal=refusal)

    async def add(self, spec: Any) -> None:
        """Add a server, flushed first when ``flush`` is on; its keys move to it.

        Raises:
            ConfigurationError: it is already in the pool.
            BackendUnavailable, OSError: see :meth:`probe`; it is not added.
        """
        async with self._adding:
            self.members.check_new(_node_name(spec))
            node = self._new_node(spec)
            node.state = "probing"  # nobody can reach it before it has joined
            try:
                await self.probe(node)
            except BaseException:
                await node.source.aclose()
                raise
            self.members = self.members.joined(node.name, node)

    def health(self) -> dict[str, NodeHealth]:
        return self.members.health()

    async def aclose(self) -> None:
        for node in self.members.nodes.values():
            await node.source.aclose()


def nodes_for(specs: Sequence[Any], connect: Connect, **ring: Any) -> _OneServer | _AsyncRing:
    """One server's connections, or a ring of two or more servers (``ring``: its options)."""
    if len(specs) == 1:
        return _OneServer(connect(specs[0]))
    return _AsyncRing(specs, connect=connect, **ring)
