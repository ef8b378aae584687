"""Memcached connections are bounded: ``pool_size`` stay open per server after a burst,
and none leak when a server dies.

Counted twice: from the server's side (``stats`` ``curr_connections`` of a memcached of
the test's own, which nobody else connects to) and from the process's side (its open
socket descriptors).
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymemcache.client.base import Client

from cachekit import Cache
from cachekit.backends.memcached import MemcachedBackend
from cachekit.exceptions import ConfigurationError
from tests.conftest import require
from tests.servers import Server, ServerError, Servers, binary, memcached_command

pytestmark = pytest.mark.memcached

BURST = 64
POOL_SIZE = 4
EVENTUALLY = 20.0  # seconds for the server to notice closed sockets: generous


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    require("the memcached binary", binary("memcached") is not None, "install memcached")
    with Servers(tmp_path) as group:
        yield group
        for member in group.members:
            if member.running():
                member.kill()


@pytest.fixture
def backends() -> Iterator[Callable[..., MemcachedBackend]]:
    """Builds backends and closes them all at the end, even if the test failed."""
    built: list[MemcachedBackend] = []

    def build(servers: str | list[str], **options: Any) -> MemcachedBackend:
        backend = MemcachedBackend(servers, timeout=2.0, connect_timeout=2.0, **options)
        built.append(backend)
        return backend

    yield build
    for backend in built:
        backend.close()


class Counted:
    """A memcached of the test's own, and a probe that keeps one connection to it, so
    that ``stats conns`` can count everyone else's: every connection it lists, less its
    listening sockets, those it is closing, and the probe. (``curr_connections`` can
    lag a closed socket for a while on a loaded machine, so a baseline taken from it
    may count a connection that is already gone.)"""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.address = server.address
        self.probe = Client((server.host, server.port), timeout=2.0, connect_timeout=2.0)

    def clients(self) -> int:
        """Connections the server has open to clients other than the probe."""
        states = [
            state for name, state in self.probe.stats("conns").items() if name.endswith(b":state")
        ]
        return sum(state not in (b"conn_listening", b"conn_closing") for state in states) - 1


@pytest.fixture
def counted(servers: Servers) -> Iterator[Callable[[int], list[Counted]]]:
    started: list[Counted] = []

    def start(count: int) -> list[Counted]:
        try:
            members = [servers.start(f"memcached-{i}", memcached_command()) for i in range(count)]
        except ServerError as exc:
            require("memcached processes of our own", False, str(exc))
            raise  # not reached: require() skipped or failed
        started.extend(Counted(member) for member in members)
        return started[-count:]

    yield start
    for member in started:
        member.probe.close()


def eventually(condition: Callable[[], bool]) -> bool:
    """Whether ``condition()`` holds within EVENTUALLY seconds (the server closes its
    side of a socket asynchronously)."""
    deadline = time.monotonic() + EVENTUALLY
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def burst(backend: MemcachedBackend, server: Counted, key: str) -> int:
    """BURST callers hold a connection each at once, each getting its reply on it;
    returns how many distinct connections they held at that moment. The server's
    ``curr_connections`` is not used here: it may lag a socket for as long as a loaded
    machine likes (the tests' ``eventually`` checks count on it once the surplus is
    closed)."""
    connected = threading.Barrier(BURST + 1, timeout=60)
    release = threading.Barrier(BURST + 1, timeout=60)
    held: set[int] = set()

    def hold(client: Any) -> None:  # runs with a client the pool lent this caller
        assert client.get(key) is None  # connects, and the server answers on it
        held.add(id(client))
        connected.wait()
        release.wait()

    node = backend._nodes.node_for(key)
    callers = [threading.Thread(target=backend._nodes.run, args=(node, hold)) for _ in range(BURST)]
    for caller in callers:
        caller.start()
    connected.wait()
    during = len(held)
    release.wait()
    for caller in callers:
        caller.join()
    return during


def test_a_burst_of_callers_leaves_at_most_pool_size_connections_open(
    counted: Callable[[int], list[Counted]],
    backends: Callable[..., MemcachedBackend],
    namespace: str,
) -> None:
    (server,) = counted(1)
    backend = backends(server.address, pool_size=POOL_SIZE)
    assert burst(backend, server, f"{namespace}:k") == BURST  # nobody waited for a socket
    assert backend._nodes.source.connections == POOL_SIZE  # the surplus was closed...
    assert eventually(lambda: server.clients() == POOL_SIZE)  # ...on both ends
    backend.set(f"{namespace}:k", b"v", 60)  # the kept ones still work
    assert backend.get(f"{namespace}:k") == b"v"


def test_many_threads_through_the_cache_leave_at_most_pool_size_open(
    counted: Callable[[int], list[Counted]],
    backends: Callable[..., MemcachedBackend],
    namespace: str,
) -> None:
    """The reported case: 300 threads, then 193 sockets stayed open."""
    (server,) = counted(1)
    cache = Cache(backends(server.address, pool_size=POOL_SIZE), namespace=namespace)
    cache.set("k", "v")
    start_together = threading.Barrier(300, timeout=60)
    results: list[object] = []

    def read() -> None:
        start_together.wait()
        results.append(cache.get("k"))

    threads = [threading.Thread(target=read) for _ in range(300)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["v"] * 300
    assert eventually(lambda: server.clients() <= POOL_SIZE)


def test_a_pool_bounds_each_server(
    counted: Callable[[int], list[Counted]],
    backends: Callable[..., MemcachedBackend],
    namespace: str,
) -> None:
    members = counted(2)
    backend = backends([m.address for m in members], pool_size=2)
    for member in members:
        key = next(
            k
            for i in range(1000)
            if backend._nodes.node_for(k := f"{namespace}:{i}").name == member.address
        )
        assert burst(backend, member, key) == BURST
        assert backend._nodes.node_for(key).source.connections == 2
    assert all(eventually(lambda m=m: m.clients() == 2) for m in members)


def open_sockets(ports: Iterable[int] | None = None) -> int:
    """Sockets this process holds: all of them, or only those connected to ``ports`` on
    loopback (the suite's other threads, such as a background replay, open and close
    sockets of their own meanwhile)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    if ports is None:
        return len(inodes)
    return len(inodes & _connected_to(set(ports)))


def _connected_to(ports: set[int]) -> set[str]:
    """The inodes of TCP sockets whose remote port is one of ``ports``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as rows:
            next(rows)  # the header
            for row in rows:
                fields = row.split()
                if int(fields[2].rsplit(":", 1)[1], 16) in ports:
                    found.add(fields[9])
    return found


def test_a_dead_server_leaks_no_socket(
    counted: Callable[[int], list[Counted]],
    backends: Callable[..., MemcachedBackend],
    namespace: str,
) -> None:
    """Killed under traffic from many threads, restarted, rejoined: once the backend is
    closed the process holds exactly the sockets it held before, and nothing is left
    for the garbage collector to find unclosed (a ResourceWarning, an error here)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("counts descriptors through /proc")
    members = counted(3)
    ports = [int(m.address.rsplit(":", 1)[1]) for m in members]
    gc.collect()
    before = open_sockets(ports)  # the probes' own connections
    backend = backends([m.address for m in members], node_cooldown=0.2)
    cache = Cache(backend, namespace=namespace, breaker=None)
    keys = [f"k{i}" for i in range(200)]

    def traffic() -> None:
        for key in keys:
            assert cache.get_or_load(key, lambda key=key: key) == key
        cache.delete_many(keys[:20])

    def in_threads(count: int) -> None:
        threads = [threading.Thread(target=traffic) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    in_threads(8)
    assert open_sockets(ports) > before  # the count sees the backend's connections
    members[0].server.kill()
    in_threads(8)
    assert backend.node_health()[members[0].address].state == "down"
    members[0].server.start()

    def rejoined() -> bool:
        traffic()  # the first call after the cool-down probes the restarted server
        return backend.node_health()[members[0].address].state == "up"

    assert eventually(rejoined)
    in_threads(8)
    backend.close()
    gc.collect()
    assert open_sockets(ports) == before


def test_pool_size_is_checked(memcached_server: tuple[str, int]) -> None:
    address = f"{memcached_server[0]}:{memcached_server[1]}"
    for bad in (0, -1, 1.5, True, "4"):
        with pytest.raises(ConfigurationError, match="pool_size"):
            MemcachedBackend(address, pool_size=bad)  # type: ignore[arg-type]


def test_a_call_interrupted_before_its_reply_leaves_no_reply_for_the_next(
    memcached_server: tuple[str, int], backends: Callable[..., MemcachedBackend], namespace: str
) -> None:
    """A KeyboardInterrupt between a request and its reply: the next caller on that
    connection must not read the old reply as its own."""
    host, port = memcached_server
    backend = backends(f"{host}:{port}", pool_size=1)
    backend.set(f"{namespace}:a", b"reply for a", 60)
    backend.set(f"{namespace}:b", b"reply for b", 60)

    def interrupted(client: Any) -> None:
        client.get(f"{namespace}:b")  # connect first
        client.sock.sendall(f"get {namespace}:a\r\n".encode())  # the request went out...
        raise KeyboardInterrupt  # ...and the caller was interrupted before the reply

    node = backend._nodes.node_for(f"{namespace}:a")
    with pytest.raises(KeyboardInterrupt):
        backend._nodes.run(node, interrupted)
    assert backend.get(f"{namespace}:b") == b"reply for b"
    assert backend.get_many([f"{namespace}:b"]) == {f"{namespace}:b": b"reply for b"}
