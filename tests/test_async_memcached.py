"""AsyncMemcachedBackend where asyncio differs: cancellation, bounded pools, event loops.

The servers are memcached processes of the tests' own (the session's pool of three, or
one started here to be paused by its PID); the shared server on 11211 is not used.
The cancellation storm is in tests/test_memcached_cancellation.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pymemcache.client.base import Client

from cachekit.backends import memcached_protocol as protocol
from cachekit.backends.base import MISSING
from cachekit.backends.memcached import AsyncMemcachedBackend
from cachekit.backends.memcached_async_connections import PoolTimeout
from cachekit.backends.memcached_protocol import Command, Reply
from cachekit.exceptions import BackendError, BackendTimeout, ConfigurationError
from tests.blocking import EventLoopThread
from tests.conftest import SERVER_TIMEOUT, require
from tests.servers import Server, ServerError, Servers, binary, memcached_command
from tests.test_memcached_cancellation import pools

pytestmark = pytest.mark.memcached

GENEROUS = 30.0  # seconds: a hang guard, never expected to run out
POOL_SIZE = 4


@pytest.fixture
async def backends() -> AsyncIterator[Callable[..., AsyncMemcachedBackend]]:
    """Builds backends with generous timeouts unless told otherwise, and closes every
    one at the end, even when the test failed."""
    built: list[AsyncMemcachedBackend] = []

    def build(servers: str | list[str], **options: Any) -> AsyncMemcachedBackend:
        settings = {"timeout": GENEROUS, "connect_timeout": GENEROUS} | options
        built.append(AsyncMemcachedBackend(servers, **settings))
        return built[-1]

    yield build
    for backend in built:
        await backend.aclose()


@pytest.fixture
async def own_server(tmp_path: Path) -> AsyncIterator[Server]:
    """A memcached of this test's own, which it may pause; stopped by PID."""
    require("the memcached binary", binary("memcached") is not None, "install memcached")
    with Servers(tmp_path) as group:
        try:
            server = group.start("memcached", memcached_command())
        except ServerError as exc:
            require("a memcached process of our own", False, str(exc))
            raise  # not reached
        yield server
        server.kill()


# -- one connection, a reply that comes late --------------------------------------------


async def test_a_reply_that_comes_after_its_caller_gave_up_is_never_read(
    own_server: Server, backends: Callable[..., AsyncMemcachedBackend], namespace: str
) -> None:
    """The server is paused with a ``get`` of ``a`` in flight; its caller times out.
    Once the server resumes it answers that ``get``, on a connection the backend has
    closed: the next call, on the pool's only connection, reads ``b``'s own value."""
    backend = backends(own_server.address, pool_size=1)
    a, b = f"{namespace}:a", f"{namespace}:b"
    await backend.set_many({a: b"reply for a", b: b"reply for b"}, 60)
    own_server.pause()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(backend.get(a), 0.2)
    own_server.resume()
    assert await backend.get(b) == b"reply for b"
    assert await backend.get_many([b]) == {b: b"reply for b"}
    (connections,) = pools(backend)
    assert connections.opened == 2 and connections.connections == 1
    await backend.aclose()


async def test_a_restarted_server_fails_one_call_not_one_per_idle_connection(
    own_server: Server, backends: Callable[..., AsyncMemcachedBackend], namespace: str
) -> None:
    """Killed and restarted under a pool of idle connections: the call that finds its
    connection closed fails, and the other idle ones are closed with it."""
    backend = backends(own_server.address, pool_size=POOL_SIZE)
    key = f"{namespace}:k"
    await backend.set(key, b"v", 60)
    await asyncio.gather(*(backend.get(key) for _ in range(3 * POOL_SIZE)))
    (connections,) = pools(backend)
    assert connections.connections == POOL_SIZE  # all idle now
    own_server.kill()
    own_server.start()  # same port, empty
    with pytest.raises(BackendError) as lost:
        await backend.get(key)
    assert isinstance(lost.value.__cause__, ConnectionError)
    for _ in range(POOL_SIZE):
        assert await backend.get(key) is MISSING
    assert connections.opened == POOL_SIZE + 1


async def test_a_timeout_is_a_backend_timeout_and_closes_the_connection(
    silent_port: int, backends: Callable[..., AsyncMemcachedBackend], namespace: str
) -> None:
    backend = backends(f"127.0.0.1:{silent_port}", timeout=0.1)
    with pytest.raises(BackendTimeout) as timed_out:
        await backend.get(f"{namespace}:k")
    assert isinstance(timed_out.value.__cause__, TimeoutError)
    await asyncio.sleep(0)  # the slot comes back once the socket is closed
    (connections,) = pools(backend)
    assert connections.connections == 0
    await backend.aclose()


# -- bounded pools ----------------------------------------------------------------------


async def test_a_burst_of_tasks_shares_pool_size_connections(
    memcached_pool: list[str], backends: Callable[..., AsyncMemcachedBackend], namespace: str
) -> None:
    backend = backends(memcached_pool[0], pool_size=POOL_SIZE)
    await backend.set(f"{namespace}:k", b"v", 60)
    results = await asyncio.gather(*(backend.get(f"{namespace}:k") for _ in range(300)))
    assert results == [b"v"] * 300
    (connections,) = pools(backend)
    assert connections.peak == connections.opened == connections.connections == POOL_SIZE
    await backend.aclose()
    assert connections.connections == 0


async def test_waiting_for_a_connection_counts_against_the_timeout_not_the_server(
    memcached_pool: list[str], backends: Callable[..., AsyncMemcachedBackend], namespace: str
) -> None:
    """With every connection to a server busy, a call times out waiting for one: a
    BackendTimeout, and the server is not marked down for it (node_failures=1). The
    timeout is generous: the calls around the wait must not time out on a busy machine."""
    backend = backends(memcached_pool[:2], pool_size=1, timeout=SERVER_TIMEOUT, node_failures=1)
    key = f"{namespace}:k"
    node: Any = backend._nodes.node_for(key)
    assert await backend.get(key) is MISSING  # the pool is in use on this loop
    await node.source._slots.acquire()  # the only connection is taken
    with pytest.raises(BackendTimeout) as waited:
        await backend.get(key)
    assert isinstance(waited.value.__cause__, PoolTimeout)
    assert backend.node_health()[node.name].state == "up"
    node.source._slots.release()
    assert await backend.get(key) is MISSING
    await backend.aclose()


# -- one event loop at a time -----------------------------------------------------------


async def test_a_backend_moves_to_another_loop_only_once_closed(
    memcached_pool: list[str], backends: Callable[..., AsyncMemcachedBackend], namespace: str
) -> None:
    backend = backends(memcached_pool[0])
    key = f"{namespace}:k"
    await backend.set(key, b"v", 60)  # an idle connection now belongs to this loop
    other = EventLoopThread()
    try:
        with pytest.raises(RuntimeError, match="another event loop"):
            other.call(backend.get(key))
        await backend.aclose()
        assert other.call(backend.get(key)) == b"v"
        other.call(backend.aclose())
    finally:
        other.stop()


# -- what the sync backend does the same way --------------------------------------------


def server_stats(server: Server) -> dict[bytes, bytes]:
    client = Client((server.host, server.port), timeout=GENEROUS, connect_timeout=GENEROUS)
    try:
        stats: dict[bytes, bytes] = client.stats()
        return stats
    finally:
        client.close()


def counters(server: Server, *names: str) -> dict[str, int]:
    stats = server_stats(server)
    return {name: int(stats[name.encode()]) for name in names}


async def test_swapping_a_value_it_added_is_one_cas(
    own_server: Server, backends: Callable[..., AsyncMemcachedBackend], namespace: str
) -> None:
    """As the sync backend: ``add`` remembers the CAS unique, so releasing the lease
    is a ``cas`` alone, no ``gets``; a value it did not add takes ``gets`` + ``cas``."""
    backend = backends(own_server.address)
    key = f"{namespace}:lease"
    assert await backend.add(key, b"marker", 10) is True
    before = counters(own_server, "cmd_get", "cas_hits")
    assert await backend.compare_and_set(key, b"marker", b"value", 60) is True
    assert counters(own_server, "cmd_get", "cas_hits") == {
        "cmd_get": before["cmd_get"],
        "cas_hits": before["cas_hits"] + 1,
    }
    assert await backend.compare_and_set(key, b"value", b"newer", 60) is True  # gets + cas
    after = counters(own_server, "cmd_get", "cas_hits")
    assert after == {"cmd_get": before["cmd_get"] + 1, "cas_hits": before["cas_hits"] + 2}
    await backend.aclose()


async def test_add_falls_back_when_the_server_has_no_meta_set(
    memcached_pool: list[str],
    backends: Callable[..., AsyncMemcachedBackend],
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server before 1.6 answers ``ms`` with ERROR: the backend closes that
    connection, turns meta off, and adds with plain ``add`` from then on."""
    sent: list[str] = []

    def unknown_command(key: str, value: bytes, expire: int) -> Command[bytes | None]:
        sent.append(key)
        return Command(b"no_such_command\r\n", (Reply.LINE,), lambda replies: None)

    monkeypatch.setattr(protocol, "meta_add", unknown_command)
    backend = backends(memcached_pool[0])
    key = f"{namespace}:k"
    assert await backend.add(key, b"first", 60) is True
    assert await backend.add(key, b"second", 60) is False
    assert sent == [key]  # tried once
    assert await backend.get(key) == b"first"
    assert await backend.compare_and_delete(key, b"first") is True
    await backend.aclose()


async def test_errors_are_wrapped_at_the_edge(
    memcached_pool: list[str], backends: Callable[..., AsyncMemcachedBackend], namespace: str
) -> None:
    backend = backends(memcached_pool[0])
    with pytest.raises(BackendError, match="whitespace") as bad_key:
        await backend.get("a key")
    assert isinstance(bad_key.value.__cause__, protocol.IllegalKey)
    with pytest.raises(BackendError) as too_large:
        await backend.set(f"{namespace}:big", b"x" * (2 << 20), 60)
    assert isinstance(too_large.value.__cause__, protocol.ServerReplyError)
    with pytest.raises(TypeError, match="bytes"):
        await backend.set(f"{namespace}:str", "text", 60)
    await backend.set(f"{namespace}:k", b"still fine", 60)
    assert await backend.get(f"{namespace}:k") == b"still fine"
    await backend.aclose()


def test_settings_are_checked(memcached_pool: list[str]) -> None:
    for options in (
        {"pool_size": 0},
        {"pool_size": 1.5},
        {"pool_size": True},
        {"node_failures": 0},
        {"node_cooldown": 0},
        {"timeout": 0},
        {"connect_timeout": -1},
    ):
        with pytest.raises(ConfigurationError):
            AsyncMemcachedBackend(memcached_pool, **options)
    for servers in ([], ["127.0.0.1:notaport"]):
        with pytest.raises(ConfigurationError):
            AsyncMemcachedBackend(servers)
    assert not AsyncMemcachedBackend(memcached_pool[0]).capabilities.isolates_failures
    pool = AsyncMemcachedBackend(memcached_pool)
    assert pool.capabilities.isolates_failures
    assert pool.capabilities.key_policy is not None
    assert pool.capabilities.key_policy.max_bytes == 250
    assert pool.capabilities.ttl_slack == 1.0
