"""AsyncRedisBackend: round trips per call and per node, cancellation mid-reply, clients, errors.

The contract itself runs in ``test_async_backend_contract.py`` (ids ``aredis`` and
``aredis-cluster``); these tests check what is particular to redis.asyncio.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection as AsyncConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel

from cachekit.backends.base import MISSING
from cachekit.backends.redis import AsyncRedisBackend, RedisBackend
from cachekit.exceptions import BackendError, BackendTimeout, ConfigurationError
from tests.conftest import (
    RedisCommands,
    aforget_namespace,
    async_cluster_client,
    redis_command_calls,
    require,
)
from tests.servers import Server, ServerError, Servers, binary, redis_sentinel_command
from tests.test_backend_roundtrips import OPERATION_CALLS, OPERATION_IDS
from tests.test_redis_persistence import config_gets, start, warnings_logged

N = 60  # keys: enough to land on every node of the 3-node cluster
SLOW = 30  # seconds a loaded machine may take between two steps of a test
Call = Callable[[AsyncRedisBackend], Awaitable[object]]


@pytest.fixture
async def aredis(redis_server: str, namespace: str) -> AsyncIterator[AsyncRedisBackend]:
    """A standalone backend whose first write (and persistence check) is done."""
    backend = AsyncRedisBackend.from_url(redis_server, timeout=2.0)
    await backend.delete(f"{namespace}:warm-up")
    yield backend
    await aforget_namespace(backend, namespace)
    await backend.aclose()


@pytest.fixture
async def acluster(
    redis_cluster: tuple[str, int], namespace: str
) -> AsyncIterator[AsyncRedisBackend]:
    backend = AsyncRedisBackend(async_cluster_client(redis_cluster))
    yield backend
    await aforget_namespace(backend, namespace)
    await backend.client.aclose()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    require("the redis-server binary", binary("redis-server") is not None, "install redis-server")
    with Servers(tmp_path) as group:
        yield group


def ns_keys(namespace: str, n: int = N) -> list[str]:
    return [f"{namespace}:k{i}" for i in range(n)]


# -- one round trip per call ---------------------------------------------------------


@pytest.mark.redis
async def test_batches_are_one_round_trip(
    aredis: AsyncRedisBackend, aredis_commands: RedisCommands, namespace: str
) -> None:
    keys = ns_keys(namespace)
    items = {key: b"v" for key in keys}
    await aredis_commands.aexpect(lambda: aredis.set_many(items, 60), {"set": N})
    assert 60_000 - SLOW * 1000 < aredis_commands.client.pttl(keys[-1]) <= 60_000
    await aredis_commands.aexpect(lambda: aredis.set_many(items, None), {"mset": 1})
    assert aredis_commands.client.pttl(keys[-1]) == -1
    await aredis_commands.aexpect(lambda: aredis.get_many(keys), {"mget": 1})
    await aredis_commands.aexpect(lambda: aredis.add_many(items, 60), {"set": N})
    swaps = {key: (b"v", b"w") for key in keys}
    await aredis.compare_and_set_many(swaps, None)  # loads the script
    await aredis_commands.aexpect(
        lambda: aredis.compare_and_set_many(swaps, None), {"evalsha": N, "get": N}
    )
    await aredis_commands.aexpect(lambda: aredis.delete_many(keys), {"del": 1})
    assert await aredis.get_many(keys) == {}


@pytest.mark.redis
@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda b, k: b.get(k), {"get": 1}),
        (lambda b, k: b.set(k, b"v", 5), {"set": 1}),
        (lambda b, k: b.add(k, b"v", 5), {"set": 1}),
        (lambda b, k: b.delete(k), {"del": 1}),
        # The script's GET runs inside Redis and counts as a command, not a round trip.
        (lambda b, k: b.compare_and_set(k, b"v", b"w", 5), {"evalsha": 1, "get": 1}),
        (lambda b, k: b.compare_and_delete(k, b"v"), {"evalsha": 1, "get": 1}),
    ],
    ids=["get", "set", "add", "delete", "compare_and_set", "compare_and_delete"],
)
async def test_single_key_calls_are_one_command(
    aredis: AsyncRedisBackend,
    aredis_commands: RedisCommands,
    namespace: str,
    call: Callable[[AsyncRedisBackend, str], Awaitable[object]],
    expected: dict[str, int],
) -> None:
    key = f"{namespace}:k"
    await aredis.compare_and_set(key, b"v", b"w", None)  # loads the script
    await aredis.compare_and_delete(key, b"v")
    await aredis_commands.aexpect(lambda: call(aredis, key), expected)


@pytest.mark.redis
async def test_ttls_become_milliseconds_rounded_up(
    aredis: AsyncRedisBackend, redis_client: redis.Redis, namespace: str
) -> None:
    key = f"{namespace}:k"
    await aredis.set(key, b"v", 100.5)
    assert 100_500 - SLOW * 1000 < redis_client.pttl(key) <= 100_500
    await aredis.set(key, b"v", 0.0001)  # rounds up to 1 ms, never to "no expiry"
    assert redis_client.pttl(key) in (-2, 0, 1)
    assert await aredis.add(key + "a", b"v", 200.5) is True
    assert 200_500 - SLOW * 1000 < redis_client.pttl(key + "a") <= 200_500
    assert await aredis.compare_and_set(key + "a", b"v", b"w", None) is True
    assert redis_client.pttl(key + "a") == -1


@pytest.mark.redis_cluster
async def test_cluster_batches_are_one_round_trip_per_node(
    acluster: AsyncRedisBackend, aredis_commands: RedisCommands, namespace: str
) -> None:
    """Every batch splits by slot and sends one pipeline to each node, all at once."""
    keys = ns_keys(namespace)
    items = {key: b"v" for key in keys}
    await acluster.set_many(items, None)  # connects to every node, checks persistence
    await acluster.compare_and_set_many({key: (b"v", b"v") for key in keys}, None)
    nodes = {node.name for node in acluster.client.get_primaries()}
    batches: list[Call] = [
        lambda b: b.get_many(keys),
        lambda b: b.set_many(items, None),
        lambda b: b.set_many(items, 60),
        lambda b: b.add_many(items, 60),
        lambda b: b.compare_and_set_many({key: (b"v", b"w") for key in keys}, None),
        lambda b: b.delete_many(keys),
    ]
    for batch in batches:
        aredis_commands.writes.clear()
        await batch(acluster)
        per_node = {name: aredis_commands.writes[name] for name in nodes}
        assert per_node == dict.fromkeys(nodes, 1)
    assert await acluster.get_many(keys) == {}


@pytest.mark.redis_cluster
async def test_cluster_scripts_load_on_nodes_that_lack_them(
    acluster: AsyncRedisBackend, namespace: str
) -> None:
    keys = ns_keys(namespace)
    await acluster.set_many({key: b"old" for key in keys}, None)
    for node in acluster.client.get_primaries():
        direct = redis.Redis(node.host, node.port, socket_timeout=2.0)
        direct.script_flush()
        direct.close()
    swaps = {key: (b"old", b"new") for key in keys[1:]}
    assert await acluster.compare_and_set_many(swaps, None) == set(swaps)
    assert await acluster.compare_and_set(keys[0], b"old", b"new", 60) is True
    assert await acluster.get_many(keys) == dict.fromkeys(keys, b"new")


@pytest.mark.redis_cluster
async def test_cluster_first_calls_may_come_all_at_once(
    redis_cluster: tuple[str, int], namespace: str
) -> None:
    """A burst of concurrent first calls on a new cluster client all succeed (redis-py
    8.1 alone misroutes them; see AsyncRedisBackend._discover)."""
    for _ in range(5):
        backend = AsyncRedisBackend(async_cluster_client(redis_cluster))
        calls = [backend.add(f"{namespace}:k{i % 4}", b"v", 60) for i in range(16)]
        calls += [backend.get(f"{namespace}:k{i}") for i in range(16)]
        results = await asyncio.gather(*calls)
        assert results[:16].count(True) == 4
        await aforget_namespace(backend, namespace)
        await backend.client.aclose()


# -- cancellation ----------------------------------------------------------------------


CANCELLED_CALLS: list[tuple[str, Callable[[AsyncRedisBackend, list[str]], Awaitable[object]]]] = [
    ("get", lambda b, keys: b.get(keys[0])),
    ("get_many", lambda b, keys: b.get_many(keys)),
    ("set", lambda b, keys: b.set(keys[0], f"v{keys[0]}".encode(), None)),
    ("set_many", lambda b, keys: b.set_many({key: f"v{key}".encode() for key in keys}, 60)),
    ("add_many", lambda b, keys: b.add_many({key: b"never stored" for key in keys}, 60)),
    ("compare_and_set", lambda b, keys: b.compare_and_set(keys[0], b"no", b"never", None)),
    ("compare_and_set_many", lambda b, keys: b.compare_and_set_many({keys[1]: (b"x", b"y")}, None)),
    ("delete_many", lambda b, keys: b.delete_many([key + "-absent" for key in keys])),
]


@pytest.mark.redis
@pytest.mark.parametrize(
    "call", [call for _, call in CANCELLED_CALLS], ids=[n for n, _ in CANCELLED_CALLS]
)
async def test_cancelled_while_awaiting_the_reply_leaves_nothing_behind(
    servers: Servers,
    monkeypatch: pytest.MonkeyPatch,
    call: Callable[[AsyncRedisBackend, list[str]], Awaitable[object]],
) -> None:
    """A call cancelled once it has sent its request and waits for the reply, which
    the (paused) server has not sent yet: redis-py drops that connection, so the reply
    that arrives once the server resumes is never read by a later call."""
    server = start(servers)
    backend = AsyncRedisBackend.from_url(f"redis://{server.address}", timeout=SLOW)
    keys = [f"k{i}" for i in range(20)]
    values = {key: f"v{key}".encode() for key in keys}
    await backend.set_many(values, None)
    await backend.compare_and_set_many({keys[0]: (b"x", b"y")}, None)  # loads the script
    reading = asyncio.Event()
    original = AsyncConnection.read_response

    async def read_response(self: AsyncConnection, *args: Any, **kwargs: Any) -> Any:
        reading.set()  # no await in between: the caller is inside the read when told
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(AsyncConnection, "read_response", read_response)
    for _ in range(3):
        server.pause()
        try:
            reading.clear()
            task = asyncio.ensure_future(call(backend, keys))
            await reading.wait()
            assert not task.done()  # the server cannot have answered
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            server.resume()
        assert [await backend.get(key) for key in keys] == list(values.values())
        assert await backend.get_many(keys[::-1]) == values
    await backend.aclose()


# -- clients, options and errors -------------------------------------------------------


def test_refuses_decoding_clients() -> None:
    clients: list[Any] = [
        Redis(host="127.0.0.1", port=1, decode_responses=True),
        RedisCluster(host="127.0.0.1", port=1, decode_responses=True),
        Sentinel([("127.0.0.1", 1)]).master_for("x", decode_responses=True),
    ]
    for client in clients:
        with pytest.raises(ConfigurationError, match="decode_responses=False"):
            AsyncRedisBackend(client)


async def test_from_url_sets_short_timeouts_and_no_retries() -> None:
    backend = AsyncRedisBackend.from_url("redis://127.0.0.1:1/3", timeout=0.25)
    assert isinstance(backend.client, Redis)
    options = backend.client.connection_pool.connection_kwargs
    assert options["socket_timeout"] == 0.25
    assert options["socket_connect_timeout"] == 0.25
    assert options["db"] == 3
    assert isinstance(options["retry"], Retry)
    assert options["retry"].get_retries() == 0
    await backend.aclose()
    with pytest.raises(ConfigurationError, match="positive"):
        AsyncRedisBackend.from_url("redis://127.0.0.1", timeout=0)


@pytest.mark.redis
async def test_aclose_closes_only_a_client_it_created(
    redis_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[Redis] = []
    original = Redis.aclose

    async def aclose(self: Redis, *args: Any) -> None:
        closed.append(self)
        await original(self, *args)

    monkeypatch.setattr(Redis, "aclose", aclose)
    owned = AsyncRedisBackend.from_url(redis_server, timeout=2.0)
    injected = AsyncRedisBackend(Redis.from_url(redis_server, socket_timeout=2.0))
    for backend in (owned, injected):
        assert await backend.get("cachekit-test:absent") is MISSING  # opens a connection
        await backend.aclose()
    assert closed == [owned.client]
    assert await injected.get("cachekit-test:absent") is MISSING  # still open
    await injected.client.aclose()


@pytest.mark.parametrize("call", OPERATION_CALLS, ids=OPERATION_IDS)
async def test_refused_connection_is_a_backend_error(call: Callable[[Any], Any]) -> None:
    backend = AsyncRedisBackend.from_url("redis://127.0.0.1:1")
    with pytest.raises(BackendError) as raised:
        await call(backend)
    assert isinstance(raised.value.__cause__, redis.exceptions.ConnectionError)
    await backend.aclose()


async def test_silent_server_is_a_backend_timeout(silent_port: int) -> None:
    backend = AsyncRedisBackend.from_url(f"redis://127.0.0.1:{silent_port}", timeout=0.05)
    with pytest.raises(BackendTimeout) as raised:
        await backend.get("k")
    assert isinstance(raised.value.__cause__, redis.exceptions.TimeoutError)
    await backend.aclose()


# -- persistence check and Sentinel ----------------------------------------------------


@pytest.mark.redis
async def test_persistence_is_checked_once_on_the_first_write(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    server = start(servers, "--save", "60 1")
    backend = AsyncRedisBackend.from_url(f"redis://{server.address}", timeout=2.0)
    caplog.set_level(logging.DEBUG, logger="cachekit")
    assert await backend.get("k") is MISSING
    assert config_gets(server) == 0  # reads never pay for the check
    await backend.set("k", b"v", None)
    assert config_gets(server) == 3  # one pipeline: save, appendonly, appendfsync
    [warning] = warnings_logged(caplog)
    assert f'{server.address} (RDB snapshots (save "60 1"))' in warning
    await asyncio.gather(*(backend.set(f"k{i}", b"v", 10) for i in range(10)))
    await backend.delete_many(["k"])
    assert config_gets(server) == 3  # never again
    assert len(warnings_logged(caplog)) == 1
    await backend.aclose()


@pytest.mark.redis_cluster
async def test_cluster_persistence_check_asks_every_primary_once(
    acluster: AsyncRedisBackend, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    await acluster.get(f"{namespace}:k")  # discovers the nodes

    def calls() -> dict[str, int]:
        found = {}
        for node in acluster.client.get_primaries():
            direct = redis.Redis(node.host, node.port, socket_timeout=2.0)
            found[node.name] = redis_command_calls(direct).get("config|get", 0)
            direct.close()
        return found

    before = calls()
    await acluster.set(f"{namespace}:k", b"v", 60)
    await acluster.set(f"{namespace}:k", b"v", 60)
    assert {name: n - before[name] for name, n in calls().items()} == dict.fromkeys(before, 3)
    assert warnings_logged(caplog) == []  # the test cluster runs with --save ""


def _sentinel_pair(servers: Servers) -> tuple[Server, Server]:
    primary = start(servers, "--save", "60 1")
    try:
        watcher = servers.start(
            "sentinel", redis_sentinel_command(servers.workdir, "cache", primary)
        )
    except ServerError as exc:
        require("a Redis Sentinel of our own", False, str(exc))
        raise  # not reached: require() skipped or failed
    return primary, watcher


@pytest.mark.redis
async def test_a_sentinel_managed_client_works_and_is_named(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    primary, watcher = _sentinel_pair(servers)
    sentinel = Sentinel([(watcher.host, watcher.port)], socket_timeout=2.0)
    client = sentinel.master_for("cache", socket_timeout=2.0)
    backend = AsyncRedisBackend(client)
    await backend.set_many({"a": b"1", "b": b"2"}, 60)
    assert await backend.get_many(["a", "b", "c"]) == {"a": b"1", "b": b"2"}
    assert await backend.compare_and_set_many({"a": (b"1", b"A")}, None) == {"a"}
    assert await backend.compare_and_delete("b", b"2") is True
    direct = redis.Redis(primary.host, primary.port, socket_timeout=2.0)
    assert direct.get("a") == b"A"  # really the primary
    direct.close()
    [warning] = warnings_logged(caplog)
    assert "Sentinel service 'cache' (RDB snapshots" in warning
    await backend.aclose()
    await client.aclose()
    for watcher_client in sentinel.sentinels:
        await watcher_client.aclose()


@pytest.mark.parametrize("backend_class", [RedisBackend, AsyncRedisBackend])
@pytest.mark.parametrize("query", ["bogus=1", "socket_timeout=abc"])
def test_from_url_refuses_a_malformed_option_at_once(backend_class: Any, query: str) -> None:
    """Not at the first command, with a driver TypeError that no cache would catch."""
    with pytest.raises(ConfigurationError, match="malformed Redis URL"):
        backend_class.from_url(f"redis://127.0.0.1:6379/0?{query}")
