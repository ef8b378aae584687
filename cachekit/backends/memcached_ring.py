"""The I/O-free half of a memcached pool: each server's circuit breaker, and the hash ring."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from cachekit.exceptions import BackendUnavailable, ConfigurationError
from cachekit.forks import renew_locks_in_child, reset_in_child

logger = logging.getLogger("cachekit")

#: Key-to-server routes a pool remembers (see :class:`_Members`).
MAX_ROUTES: Final = 16_384


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

    ``source`` runs the server's commands: pymemcache clients for the sync backend,
    asyncio connections for the async one; the breaker never touches it. Up, calls go
    through. ``failures`` consecutive calls that got no answer (refused,
    timed out, connection closed) mark it down: calls for its keys then fail at once
    with :class:`BackendUnavailable`. After ``cooldown`` seconds the next caller probes
    it, alone (see :meth:`settle_probe`); until the probe succeeds nobody else reaches
    the server, so nothing is read from it before it is flushed.
    """

    def __init__(
        self,
        name: str,
        source: Any,
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

    def settle_probe(self, *, answered: bool, flush: bool, refusal: Exception | None) -> None:
        """The probe got a reply: up again, or, if it refused ``flush_all``, down.

        Raises:
            BackendUnavailable: it answered but refused ``flush_all`` (memcached -F);
                it stays down rather than serve entries that may be stale.
        """
        if answered:
            self.rejoined(flushed=flush)
            return
        self.probe_failed()
        message = (
            f"memcached server {self.name} answered but refused flush_all ({refusal!r}), "
            "so it stays down: it may hold entries whose deletes it missed. Allow "
            "flush_all, or build the backend with flush_on_join=False to rely on the "
            "Cache's invalidation journal alone"
        )
        logger.warning(message)
        raise BackendUnavailable(message) from refusal

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

    def check_new(self, name: str) -> None:
        """Refuse a server already in the pool.

        Raises:
            ConfigurationError: it is.
        """
        if name in self.nodes:
            raise ConfigurationError(f"memcached server {name} is already in the pool")

    def joined(self, name: str, node: _Node) -> _Members:
        """These members plus ``node``, with routes computed afresh."""
        return _Members(type(self.hasher), {**self.nodes, name: node}, self.limit)

    def health(self) -> dict[str, NodeHealth]:
        return {name: node.health() for name, node in self.nodes.items()}
