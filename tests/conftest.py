"""Shared fixtures: every backend behind one `backend` fixture, on real servers where asked."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
import redis
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import AbstractConnection as AsyncConnection
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import AbstractConnection
from redis.retry import Retry

import cachekit.backends.memcached as memcached_module
from cachekit.async_cache import AsyncCache
from cachekit.backends.base import AsyncBackend, Backend, Capabilities
from cachekit.backends.counting import AsyncCountingBackend
from cachekit.backends.memcached import AsyncMemcachedBackend, MemcachedBackend
from cachekit.backends.memory import MemoryBackend
from cachekit.backends.proxy import InProcessAsync
from cachekit.backends.redis import AsyncRedisBackend, RedisBackend
from cachekit.keys import make_backend_key
from tests.servers import ServerError, Servers, binary, memcached_command, start_redis_cluster
from tests.support import FakeClock

REDIS_URL = "redis://127.0.0.1:6379/0"
MEMCACHED_ADDRESS = ("127.0.0.1", 11211)
# Generous: a loaded CI machine must not turn a slow reply into a failed test.
SERVER_TIMEOUT = 2.0


def require(what: str, available: bool, detail: str = "") -> None:
    """Skip a test whose dependency is missing, except under CI, where it fails."""
    if available:
        return
    message = f"{what} is not available{': ' + detail if detail else ''}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


def _reachable(address: tuple[str, int]) -> tuple[bool, str]:
    try:
        socket.create_connection(address, timeout=1.0).close()
    except OSError as exc:
        return False, f"cannot connect to {address[0]}:{address[1]} ({exc})"
    return True, ""


@pytest.fixture(scope="session")
def redis_server() -> str:
    """The Redis URL, once the server has answered; pytest caches a skip or failure."""
    require("Redis on 127.0.0.1:6379", *_reachable(("127.0.0.1", 6379)))
    return REDIS_URL


@pytest.fixture(scope="session")
def memcached_server() -> tuple[str, int]:
    """The memcached address, once the server has answered."""
    require("memcached on 127.0.0.1:11211", *_reachable(MEMCACHED_ADDRESS))
    return MEMCACHED_ADDRESS


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A 3-node Redis Cluster of our own on free loopback ports: (host, port) of one
    node. Started once per session, on first use; every node is stopped by PID."""
    for name in ("redis-server", "redis-cli"):
        require(f"the {name} binary", binary(name) is not None, "install redis-server")
    servers = Servers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        try:
            nodes = start_redis_cluster(servers)
        except ServerError as exc:
            require("a local Redis Cluster", False, str(exc))
            raise  # not reached: require() skipped or failed
        yield nodes[0].host, nodes[0].port
    finally:
        servers.stop_all()


def cluster_client(address: tuple[str, int]) -> RedisCluster:
    """A cluster client with the suite's generous timeouts."""
    host, port = address
    return RedisCluster(
        host=host,
        port=port,
        socket_timeout=SERVER_TIMEOUT,
        socket_connect_timeout=SERVER_TIMEOUT,
        decode_responses=False,
    )


@pytest.fixture(scope="session")
def memcached_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Three memcached of our own on free loopback ports ("host:port" each), for the
    pool backend. Started once per session, on first use; stopped by PID."""
    require("the memcached binary", binary("memcached") is not None, "install memcached")
    servers = Servers(tmp_path_factory.mktemp("memcached-pool"))
    try:
        try:
            nodes = [servers.start(f"memcached-{i}", memcached_command()) for i in range(3)]
        except ServerError as exc:
            require("a local memcached pool", False, str(exc))
            raise  # not reached: require() skipped or failed
        yield [node.address for node in nodes]
        for node in nodes:  # throwaway data: SIGKILL, not SIGTERM's ~1 s exit
            node.kill()
    finally:
        servers.stop_all()


@pytest.fixture
def namespace() -> str:
    """A prefix unique to this test, so tests never collide on a shared server."""
    return "t" + uuid.uuid4().hex[:12]


def _fake_redis() -> RedisBackend:
    try:
        import lupa  # noqa: F401 - fakeredis runs compare_and_set's Lua script with it
    except ImportError:
        require("lupa (fakeredis[lua])", False, "install 'fakeredis[lua]'")
    return RedisBackend(fakeredis.FakeRedis(server=fakeredis.FakeServer()))


def _forget_namespace(client: redis.Redis | RedisCluster, namespace: str) -> None:
    keys = list(client.scan_iter(match=namespace + "*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("memory-bytes", id="memory-bytes"),
        pytest.param("memory-sieve", id="memory-sieve"),
        pytest.param("memory-s3fifo", id="memory-s3fifo"),
        pytest.param("fakeredis", id="fakeredis"),
        pytest.param("redis", id="redis", marks=pytest.mark.redis),
        pytest.param("memcached", id="memcached", marks=pytest.mark.memcached),
        pytest.param("memcached-pool", id="memcached-pool", marks=pytest.mark.memcached),
        pytest.param("redis-cluster", id="redis-cluster", marks=pytest.mark.redis_cluster),
    ]
)
def backend(request: pytest.FixtureRequest, namespace: str) -> Iterator[Backend]:
    """Each backend in turn; memory (by reference, ``serialize=True``, or with SIEVE or
    S3-FIFO eviction) runs on a :class:`FakeClock`."""
    built: Any
    if request.param == "memory":
        built = MemoryBackend(timer=FakeClock())
    elif request.param == "memory-bytes":
        built = MemoryBackend(timer=FakeClock(), serialize=True)
    elif request.param in ("memory-sieve", "memory-s3fifo"):
        built = MemoryBackend(timer=FakeClock(), eviction=request.param.removeprefix("memory-"))
    elif request.param == "fakeredis":
        built = _fake_redis()
    elif request.param == "redis":
        built = RedisBackend.from_url(
            request.getfixturevalue("redis_server"), timeout=SERVER_TIMEOUT
        )
    elif request.param == "redis-cluster":
        built = RedisBackend(cluster_client(request.getfixturevalue("redis_cluster")))
    elif request.param == "memcached-pool":
        built = MemcachedBackend(
            request.getfixturevalue("memcached_pool"),
            timeout=SERVER_TIMEOUT,
            connect_timeout=SERVER_TIMEOUT,
        )
    else:
        host, port = request.getfixturevalue("memcached_server")
        built = MemcachedBackend(
            f"{host}:{port}", timeout=SERVER_TIMEOUT, connect_timeout=SERVER_TIMEOUT
        )
    yield built
    if request.param in ("redis", "redis-cluster"):
        _forget_namespace(built.client, namespace)  # a cluster scans every primary
    built.close()
    if request.param == "redis-cluster":
        built.client.close()  # injected, so close() left it open


def key_maker(namespace: str, capabilities: Capabilities) -> Callable[[str], str]:
    """Turn a test's key name into this test's backend key, as the facade would."""

    def make(name: str) -> str:
        return make_backend_key(f"{namespace}:", name, capabilities.key_policy)

    return make


@pytest.fixture
def key(backend: Backend, namespace: str) -> Callable[[str], str]:
    """Turn a test's key name into this test's backend key, as the facade would."""
    return key_maker(namespace, backend.capabilities)


@dataclass(frozen=True)
class Expiry:
    """A TTL the backend under test honours quickly, and a way to wait it out."""

    ttl: float
    wait: Callable[[], None]


def memory_expiry(backend: MemoryBackend) -> Expiry:
    """Advance the backend's fake clock past the TTL."""
    clock = backend.timer
    assert isinstance(clock, FakeClock)
    return Expiry(ttl=30.0, wait=lambda: clock.advance(31.0))


# Redis compares against its own clock on access: real time, which a sleep never
# undershoots. A whole second: the writes must still be there when a loaded machine
# gets round to checking them.
REDIS_EXPIRY = Expiry(ttl=1.0, wait=lambda: time.sleep(1.1))


@pytest.fixture
def expiry(backend: Backend, request: pytest.FixtureRequest) -> Expiry:
    """Memory advances its fake clock; servers sleep (memcached counts whole seconds)."""
    if isinstance(backend, MemoryBackend):
        return memory_expiry(backend)
    if isinstance(backend, RedisBackend):
        return REDIS_EXPIRY
    if request.node.callspec.params["backend"] == "memcached-pool":
        addresses = [_host_port(name) for name in request.getfixturevalue("memcached_pool")]
    else:
        addresses = [MEMCACHED_ADDRESS]
    # memcached expires an item once its own clock, which ticks once a second (later on
    # a starved server), passes the exptime: an item set with exptime 3 lives 2 to 3 s
    # (enough for a loaded machine to read it back first), an add one second more (a
    # lease, see _add_expire). So wait on that clock, not on ours.
    return Expiry(ttl=3.0, wait=lambda: wait_for_memcached_clock(addresses, 5))


def _host_port(name: str) -> tuple[str, int]:
    host, port = name.rsplit(":", 1)
    return host, int(port)


def wait_for_memcached_clock(addresses: list[tuple[str, int]], seconds: int) -> None:
    """Return once every server's clock (``stats`` ``time``) is ``seconds`` past where it
    was when called."""

    def clocks() -> list[int]:
        found = []
        for address in addresses:
            client = Client(address, timeout=SERVER_TIMEOUT, connect_timeout=SERVER_TIMEOUT)
            try:
                found.append(int(client.stats()[b"time"]))
            finally:
                client.close()
        return found

    targets = [start + seconds for start in clocks()]
    time.sleep(seconds)  # usually enough; a starved server's clock lags
    deadline = time.monotonic() + 30.0
    while any(now < target for now, target in zip(clocks(), targets, strict=True)):
        assert time.monotonic() < deadline, "a memcached clock stopped"
        time.sleep(0.1)


@pytest.fixture
def redis_client(redis_server: str) -> Iterator[redis.Redis]:
    """A raw client on the real Redis, with short timeouts and no retries."""
    client = redis.Redis.from_url(
        redis_server,
        socket_timeout=SERVER_TIMEOUT,
        socket_connect_timeout=SERVER_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )
    yield client
    client.close()


@pytest.fixture
def memcached_client(memcached_server: tuple[str, int]) -> Iterator[Client]:
    """A raw pymemcache client on the real memcached."""
    client = Client(memcached_server, timeout=SERVER_TIMEOUT, connect_timeout=SERVER_TIMEOUT)
    yield client
    client.close()


def redis_command_calls(client: redis.Redis) -> dict[str, int]:
    """Server-wide call counts per command (lower-case name) from ``INFO commandstats``."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


def counting_client_class(round_trips: Counter[tuple[Any, str]]) -> type[Client]:
    """A pymemcache ``Client`` that counts round trips per (server, command).

    Each of the three methods below sends its whole request in one ``sendall`` and
    reads the replies, so one call is one round trip: a ``get_many`` that looped over
    keys would count one per key.
    """

    class CountingClient(Client):  # type: ignore[misc]
        def _fetch_cmd(self, name: bytes, *args: Any, **kwargs: Any) -> Any:
            round_trips[self.server, name.decode()] += 1
            return super()._fetch_cmd(name, *args, **kwargs)

        def _store_cmd(self, name: bytes, *args: Any, **kwargs: Any) -> Any:
            round_trips[self.server, name.decode()] += 1
            return super()._store_cmd(name, *args, **kwargs)

        def _misc_cmd(self, cmds: Any, cmd_name: bytes, *args: Any, **kwargs: Any) -> Any:
            round_trips[self.server, cmd_name.decode()] += 1
            return super()._misc_cmd(cmds, cmd_name, *args, **kwargs)

    return CountingClient


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (into the backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


@dataclass
class RedisCommands:
    """Checks what a call costs: socket writes by redis-py, command counts on the server."""

    client: redis.Redis
    writes: Counter[str]
    _last: Counter[str] = field(default_factory=Counter)

    def measure(self, action: Callable[[], object]) -> tuple[int, Counter[str]]:
        before = self._start()
        action()
        return self._finish(before)

    async def ameasure(self, action: Callable[[], Awaitable[object]]) -> tuple[int, Counter[str]]:
        """:meth:`measure` for a coroutine function."""
        before = self._start()
        await action()
        return self._finish(before)

    def expect(self, action: Callable[[], object], expected: dict[str, int]) -> None:
        """One socket write, and exactly ``expected`` commands (GET: 0 unless listed).

        ``INFO commandstats`` is server-wide, so another client of the shared server
        can only add calls: try a few times and accept the first clean reading.
        """
        expected = {"get": 0, **expected}
        for _ in range(3):
            if self._clean(self.measure(action), expected):
                return
        pytest.fail(f"expected {expected}; the server counted {dict(+self._last)}")

    async def aexpect(
        self, action: Callable[[], Awaitable[object]], expected: dict[str, int]
    ) -> None:
        """:meth:`expect` for a coroutine function."""
        expected = {"get": 0, **expected}
        for _ in range(3):
            if self._clean(await self.ameasure(action), expected):
                return
        pytest.fail(f"expected {expected}; the server counted {dict(+self._last)}")

    def _start(self) -> dict[str, int]:
        before = redis_command_calls(self.client)
        self.writes.clear()
        return before

    def _finish(self, before: dict[str, int]) -> tuple[int, Counter[str]]:
        trips = self.writes["writes"]
        after = redis_command_calls(self.client)
        return trips, Counter({name: after[name] - before.get(name, 0) for name in after})

    def _clean(self, reading: tuple[int, Counter[str]], expected: dict[str, int]) -> bool:
        trips, self._last = reading
        assert trips == 1
        return {name: self._last[name] for name in expected} == expected


@pytest.fixture
def redis_commands(redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> RedisCommands:
    """Counts redis-py socket writes: one command, or a whole pipeline, is one write."""
    writes: Counter[str] = Counter()
    original = AbstractConnection.send_packed_command

    def counting(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        writes["writes"] += 1
        original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    return RedisCommands(redis_client, writes)


@pytest.fixture
def aredis_commands(redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> RedisCommands:
    """:func:`redis_commands` for redis.asyncio; ``writes`` also counts per server
    (``"host:port"``), so a cluster test sees one write per node."""
    writes: Counter[str] = Counter()
    original = AsyncConnection.send_packed_command

    async def counting(self: AsyncConnection, command: Any, check_health: bool = True) -> None:
        writes["writes"] += 1
        writes[f"{self.host}:{self.port}"] += 1
        await original(self, command, check_health)

    monkeypatch.setattr(AsyncConnection, "send_packed_command", counting)
    return RedisCommands(redis_client, writes)


def _free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _wait_until_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 5.0
    while _free(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the second memcached on port {port} did not start")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def second_memcached() -> Iterator[tuple[str, int]]:
    """A memcached of our own on 127.0.0.1:11212 (or a free port), stopped by PID."""
    binary = shutil.which("memcached") or "/usr/bin/memcached"
    require("the memcached binary", os.access(binary, os.X_OK), binary)
    port = 11212
    if not _free(port):
        with socket.socket() as spare:
            spare.bind(("127.0.0.1", 0))
            port = spare.getsockname()[1]
    user = ["-u", "root"] if os.geteuid() == 0 else []
    command = [binary, *user, "-l", "127.0.0.1", "-p", str(port), "-m", "16", "-U", "0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_until_listening(port, process)
    yield ("127.0.0.1", port)
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[Any, str]]:
    """Makes the backend build counting Clients, for one server or inside a HashClient."""
    counter: Counter[tuple[Any, str]] = Counter()
    counting = counting_client_class(counter)

    class CountingHashClient(HashClient):  # type: ignore[misc]
        client_class = counting

    monkeypatch.setattr(memcached_module, "Client", counting)
    monkeypatch.setattr(memcached_module, "HashClient", CountingHashClient)
    return counter


@pytest.fixture(params=["sync", "async"])
def both_drivers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the module's tests with ``Cache``, then with ``AsyncCache`` behind
    ``Cache``'s API (see tests/drivers.py)."""
    if request.param == "sync":
        yield "sync"
        return
    from tests import drivers

    monkeypatch.setattr(request.module, "Cache", drivers.AsyncAsSync)
    yield "async"
    drivers.call(drivers.close_opened())


# -- async backends --------------------------------------------------------------------


def async_cluster_client(address: tuple[str, int]) -> AsyncRedisCluster:
    """An asyncio cluster client with the suite's generous timeouts."""
    host, port = address
    return AsyncRedisCluster(
        host=host,
        port=port,
        socket_timeout=SERVER_TIMEOUT,
        socket_connect_timeout=SERVER_TIMEOUT,
        decode_responses=False,
    )


async def aforget_namespace(backend: AsyncRedisBackend, namespace: str) -> None:
    """Delete this test's keys (on every primary of a cluster)."""
    keys = [k async for k in backend.client.scan_iter(match=namespace + "*", count=1000)]
    if keys:
        await backend.client.delete(*keys)


ASYNC_MEMCACHED_PARAMS = [
    pytest.param("amemcached", id="amemcached", marks=pytest.mark.memcached),
    pytest.param("amemcached-pool", id="amemcached-pool", marks=pytest.mark.memcached),
]


def async_memcached_addresses(request: pytest.FixtureRequest, which: str) -> list[str]:
    """The servers of ``amemcached`` (the shared one) or ``amemcached-pool`` (ours)."""
    if which == "amemcached-pool":
        addresses: list[str] = request.getfixturevalue("memcached_pool")
        return addresses
    host, port = request.getfixturevalue("memcached_server")
    return [f"{host}:{port}"]


def build_async_memcached(request: pytest.FixtureRequest, which: str) -> AsyncMemcachedBackend:
    return AsyncMemcachedBackend(
        async_memcached_addresses(request, which),
        timeout=SERVER_TIMEOUT,
        connect_timeout=SERVER_TIMEOUT,
    )


def async_memcached_expiry(request: pytest.FixtureRequest, which: str) -> Expiry:
    """As :func:`expiry` for memcached: wait on the servers' own clocks."""
    addresses = [_host_port(name) for name in async_memcached_addresses(request, which)]
    return Expiry(ttl=3.0, wait=lambda: wait_for_memcached_clock(addresses, 5))


@pytest.fixture(
    params=[
        pytest.param("inprocess", id="inprocess"),
        pytest.param("aredis", id="aredis", marks=pytest.mark.redis),
        pytest.param("aredis-cluster", id="aredis-cluster", marks=pytest.mark.redis_cluster),
        *ASYNC_MEMCACHED_PARAMS,
    ]
)
async def async_backend(
    request: pytest.FixtureRequest, namespace: str
) -> AsyncIterator[AsyncBackend]:
    """Each async backend in turn; in-process memory runs on a :class:`FakeClock`."""
    built: Any
    if request.param == "inprocess":
        built = InProcessAsync(MemoryBackend(timer=FakeClock()))
    elif request.param == "aredis":
        url = request.getfixturevalue("redis_server")
        built = AsyncRedisBackend.from_url(url, timeout=SERVER_TIMEOUT)
    elif request.param == "aredis-cluster":
        address = request.getfixturevalue("redis_cluster")
        built = AsyncRedisBackend(async_cluster_client(address))
    else:
        built = build_async_memcached(request, request.param)
    yield built
    if isinstance(built, AsyncRedisBackend):
        await aforget_namespace(built, namespace)
    await built.aclose()
    if request.param == "aredis-cluster":
        await built.client.aclose()  # injected, so aclose() left it open


@pytest.fixture
def async_key(async_backend: AsyncBackend, namespace: str) -> Callable[[str], str]:
    """:func:`key` for the async backends."""
    return key_maker(namespace, async_backend.capabilities)


@pytest.fixture
def async_expiry(async_backend: AsyncBackend, request: pytest.FixtureRequest) -> Expiry:
    """:func:`expiry` for the async backends; ``wait`` blocks, so call it off the loop."""
    if isinstance(async_backend, InProcessAsync):
        assert isinstance(async_backend.inner, MemoryBackend)
        return memory_expiry(async_backend.inner)
    if isinstance(async_backend, AsyncRedisBackend):
        return REDIS_EXPIRY
    if isinstance(async_backend, AsyncMemcachedBackend):
        return async_memcached_expiry(request, request.node.callspec.params["async_backend"])
    raise NotImplementedError(f"no expiry for {async_backend!r}")


@pytest.fixture
def async_counted(async_backend: AsyncBackend) -> AsyncCountingBackend:
    """The async backend under test, counting each contract call."""
    return AsyncCountingBackend(async_backend)


@pytest.fixture
def acache(async_counted: AsyncCountingBackend, namespace: str) -> AsyncCache:
    """An AsyncCache on the counted async backend, with leases no test outlives (30 s)."""
    return AsyncCache(async_counted, namespace=namespace, lease_ttl=30.0, lease_poll=0.02)
