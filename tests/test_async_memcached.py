"""AsyncMemcachedBackend where asyncio differs: cancellation, bounded pools, event loops.

The servers are memcached processes of the tests' own (the session's pool of three, or
one started here to be paused by its PID); the shared server on 11211 is not used.
The storm's figures are printed: run with ``-s``.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pymemcache.client.base import Client

from cachekit.backends import memcached_protocol as protocol
from cachekit.backends.base import MISSING
from cachekit.backends.memcached import AsyncMemcachedBackend
from cachekit.backends.memcached_async_connections import PoolTimeout, ServerConnections
from cachekit.backends.memcached_protocol import Command, Reply
from cachekit.exceptions import BackendError, BackendTimeout, ConfigurationError
from tests.blocking import EventLoopThread
from tests.conftest import require
from tests.servers import Server, ServerError, Servers, binary, memcached_command

pytestmark = pytest.mark.memcached

GENEROUS = 30.0  # seconds: a hang guard, never expected to run out
STORM_TASKS = 2000
POOL_SIZE = 4
STORM_POOL_SIZE = 8


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


def pools(backend: AsyncMemcachedBackend) -> list[ServerConnections]:
    """Each server's connection pool."""
    nodes: Any = backend._nodes
    if hasattr(nodes, "members"):
        return [node.source for node in nodes.members.nodes.values()]
    return [nodes.connections]


def open_sockets() -> int:
    """Socket descriptors this process holds."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # closed meanwhile
            continue
    return count


def value_of(key: str, rng: random.Random) -> bytes:
    """A value only this key has, from a few bytes to 64 KiB (several reads' worth);
    3 KiB on average, so that 2000 of them fit in a 16 MiB server without eviction."""
    size = rng.choices([0, 10, 1000, 20_000, 64_000], weights=[30, 30, 33, 5, 2])[0]
    return f"{key}=".encode() + os.urandom(size)


# -- the cancellation storm -------------------------------------------------------------


class Storm:
    """Tasks that set then read keys of their own, half of them cut short at random.

    Tasks start as others end, ``window`` at a time: three for each connection, so
    calls are cut short both while waiting for a connection and in flight on one.
    """

    def __init__(
        self, backend: AsyncMemcachedBackend, namespace: str, seed: int, window: int
    ) -> None:
        self.backend = backend
        self.window = window
        self.rng = random.Random(seed)
        self.values = {
            f"{namespace}:{i}": value_of(f"{namespace}:{i}", self.rng) for i in range(STORM_TASKS)
        }
        self.wrong = 0
        self.completed = 0
        self.errors: list[BaseException] = []
        self.fates = {"cancel()": 0, "wait_for": 0, "cut short": 0}

    async def work(self, key: str) -> None:
        backend, value = self.backend, self.values[key]
        await backend.set(key, value, 60)
        if await backend.get(key) != value:
            self.wrong += 1
        if (await backend.get_many([key])).get(key) != value:
            self.wrong += 1
        self.completed += 1

    def start(self, key: str) -> asyncio.Future[None]:
        """A quarter under ``asyncio.wait_for`` with 0.1-3 ms, a quarter cancelled by
        ``task.cancel()`` after 0-30 turns of the event loop, half left alone."""
        fate = self.rng.random()
        if fate < 0.25:
            self.fates["wait_for"] += 1
            timeout = self.rng.uniform(0.0001, 0.003)
            return asyncio.ensure_future(asyncio.wait_for(self.work(key), timeout))
        task = asyncio.ensure_future(self.work(key))
        if fate < 0.5:
            self.fates["cancel()"] += 1
            cancel_after(task, self.rng.randrange(31))
        return task

    async def run(self) -> None:
        pending: set[asyncio.Future[None]] = set()
        finished: list[asyncio.Future[None]] = []
        for key in self.values:
            while len(pending) >= self.window:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                finished.extend(done)
            pending.add(self.start(key))
        if pending:
            done, _ = await asyncio.wait(pending, timeout=GENEROUS)
            finished.extend(done)
        assert len(finished) == STORM_TASKS, "the storm hung"
        for task in finished:
            if task.cancelled() or isinstance(task.exception(), TimeoutError):
                self.fates["cut short"] += 1
            elif task.exception() is not None:
                self.errors.append(task.exception())  # type: ignore[arg-type]


def cancel_after(task: asyncio.Future[None], turns: int) -> None:
    """Cancel ``task`` once the event loop has turned ``turns`` more times."""
    if turns == 0:
        task.cancel()
    else:
        asyncio.get_running_loop().call_soon(cancel_after, task, turns - 1)


async def sample_sockets(peak: list[int], done: asyncio.Event) -> None:
    """The most sockets the process held at once, sampled at every turn of the loop."""
    while not done.is_set():
        peak[0] = max(peak[0], open_sockets())
        await asyncio.sleep(0)


@pytest.mark.parametrize("servers", [1, 3], ids=["one-server", "pool"])
async def test_a_cancellation_storm_leaves_every_reply_with_its_caller(
    memcached_pool: list[str],
    backends: Callable[..., AsyncMemcachedBackend],
    namespace: str,
    servers: int,
) -> None:
    """2000 tasks set and read keys of their own (values up to 64 KiB), three per
    connection at a time, half of them cancelled or timed out at random points. Not
    one read returns another key's value, every key then reads its own value back,
    and no server ever had more than ``pool_size`` connections, counted by the pool
    and by the process's sockets."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("counts descriptors through /proc")
    backend = backends(memcached_pool[:servers], pool_size=STORM_POOL_SIZE)
    seed = random.randrange(2**32)
    storm = Storm(backend, namespace, seed, window=3 * STORM_POOL_SIZE * servers)
    before = open_sockets()
    peak, done = [before], asyncio.Event()
    sampler = asyncio.ensure_future(sample_sockets(peak, done))
    await storm.run()
    done.set()
    await sampler

    # Afterwards, every key is written and read back by tasks left to finish.
    await asyncio.gather(*(backend.set(k, v, 60) for k, v in storm.values.items()))
    found = await asyncio.gather(*(backend.get(k) for k in storm.values))
    wrong_after = sum(got != value for got, value in zip(found, storm.values.values(), strict=True))
    batch = await backend.get_many(list(storm.values))
    connections = pools(backend)
    fates = storm.fates
    print(
        f"\nstorm (seed {seed}, {servers} server(s), pool_size={STORM_POOL_SIZE}, "
        f"{storm.window} tasks at "
        f"once): {STORM_TASKS} tasks, {fates['cancel()']} cancel() + {fates['wait_for']} "
        f"wait_for, {fates['cut short']} cut short, {storm.completed} completed; wrong values "
        f"{storm.wrong} during, {wrong_after} after; connections opened "
        f"{sum(p.opened for p in connections)}, peak per server "
        f"{[p.peak for p in connections]}, process sockets peak +{peak[0] - before}"
    )
    assert storm.errors == []
    assert storm.wrong == 0 and wrong_after == 0
    assert batch == storm.values
    assert fates["cut short"] > 0  # the storm did cut calls short...
    assert sum(p.opened for p in connections) > servers * STORM_POOL_SIZE  # ...in flight too
    assert all(p.peak <= STORM_POOL_SIZE for p in connections)
    assert peak[0] - before <= servers * STORM_POOL_SIZE


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
    BackendTimeout, and the server is not marked down for it (node_failures=1)."""
    backend = backends(memcached_pool[:2], pool_size=1, timeout=0.05, node_failures=1)
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
