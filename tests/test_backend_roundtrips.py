"""Server backends: batches are one round trip, TTLs reach the server right, errors are wrapped."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
import redis
from pymemcache.client.base import Client, PooledClient
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import MemcacheUnknownCommandError
from pymemcache.serde import pickle_serde

from cachekit.backends.base import MISSING
from cachekit.backends.memcached import MemcachedBackend
from cachekit.backends.redis import RedisBackend
from cachekit.exceptions import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConfigurationError,
)
from cachekit.keys import encode_key
from cachekit.markers import new_lease
from tests.conftest import MEMCACHED_ADDRESS, RedisCommands, counting_client_class

N = 100
DAY = 24 * 3600
SLOW = 30  # seconds a loaded machine may take between two steps of a test

# (operation name, call) pairs that every backend must wrap the same way.
OPERATIONS: list[tuple[str, Callable[[Any], object]]] = [
    ("get", lambda b: b.get("k")),
    ("get_many", lambda b: b.get_many(["k", "j"])),
    ("set", lambda b: b.set("k", b"v", 10)),
    ("set_many", lambda b: b.set_many({"k": b"v", "j": b"w"}, 10)),
    ("delete", lambda b: b.delete("k")),
    ("delete_many", lambda b: b.delete_many(["k", "j"])),
    ("add", lambda b: b.add("k", b"v", None)),
    ("compare_and_set", lambda b: b.compare_and_set("k", b"v", b"w", None)),
]
OPERATION_IDS = [name for name, _ in OPERATIONS]
OPERATION_CALLS = [call for _, call in OPERATIONS]


# -- Redis ---------------------------------------------------------------------------


@pytest.fixture
def redis_backend(redis_server: str, namespace: str) -> Iterator[RedisBackend]:
    backend = RedisBackend.from_url(redis_server, timeout=2.0)
    # The first write also asks the server about persistence, once (one round trip,
    # counted in test_redis_persistence); the counts below are the steady state.
    backend.delete(f"{namespace}:warm-up")
    yield backend
    stale = list(backend.client.scan_iter(match=namespace + "*", count=1000))
    if stale:
        backend.client.delete(*stale)
    backend.close()


def ns_keys(namespace: str) -> list[str]:
    return [f"{namespace}:k{i}" for i in range(N)]


@pytest.mark.redis
def test_redis_get_many_is_one_mget(
    redis_backend: RedisBackend, redis_commands: RedisCommands, namespace: str
) -> None:
    keys = ns_keys(namespace)
    redis_backend.set_many({key: b"v" for key in keys[::2]}, None)

    def get_many() -> None:
        assert len(redis_backend.get_many(keys)) == N // 2

    redis_commands.expect(get_many, {"mget": 1})


@pytest.mark.redis
def test_redis_set_many_is_one_round_trip(
    redis_backend: RedisBackend, redis_commands: RedisCommands, namespace: str
) -> None:
    keys = ns_keys(namespace)
    redis_backend.get(keys[0])  # connect first: the handshake is writes too
    items = {key: b"v" for key in keys}
    redis_commands.expect(lambda: redis_backend.set_many(items, 60), {"set": N})
    assert 60_000 - SLOW * 1000 < redis_commands.client.pttl(keys[-1]) <= 60_000
    redis_commands.expect(lambda: redis_backend.set_many(items, None), {"mset": 1})
    assert redis_commands.client.pttl(keys[-1]) == -1


@pytest.mark.redis
def test_redis_delete_many_is_one_del(
    redis_backend: RedisBackend, redis_commands: RedisCommands, namespace: str
) -> None:
    keys = ns_keys(namespace)
    redis_backend.set_many({key: b"v" for key in keys}, None)
    redis_commands.expect(lambda: redis_backend.delete_many(keys), {"del": 1})
    assert redis_backend.get_many(keys) == {}


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
    ],
    ids=["get", "set", "add", "delete", "compare_and_set"],
)
def test_redis_single_key_calls_are_one_command(
    redis_backend: RedisBackend,
    redis_commands: RedisCommands,
    namespace: str,
    call: Callable[[RedisBackend, str], object],
    expected: dict[str, int],
) -> None:
    key = f"{namespace}:k"
    redis_backend.compare_and_set(key, b"v", b"w", None)  # loads the script, connects
    redis_commands.expect(lambda: call(redis_backend, key), expected)


@pytest.mark.redis
def test_redis_ttls_become_milliseconds_rounded_up(
    redis_backend: RedisBackend, redis_client: redis.Redis, namespace: str
) -> None:
    key = f"{namespace}:k"
    # The upper bounds are exact; what is left shrinks by however long the machine
    # takes between the write and the read, so the lower ones allow SLOW seconds.
    redis_backend.set(key, b"v", 100.5)
    assert 100_500 - SLOW * 1000 < redis_client.pttl(key) <= 100_500
    redis_backend.set(key, b"v", 0.0001)  # rounds up to 1 ms, never to "no expiry"
    assert redis_client.pttl(key) in (-2, 0, 1)
    assert redis_backend.add(key + "a", b"v", 200.5) is True
    assert 200_500 - SLOW * 1000 < redis_client.pttl(key + "a") <= 200_500
    assert redis_backend.compare_and_set(key + "a", b"v", b"w", 40 * DAY) is True
    assert (40 * DAY - SLOW) * 1000 < redis_client.pttl(key + "a") <= 40 * DAY * 1000
    assert redis_backend.compare_and_set(key + "a", b"w", b"x", None) is True
    assert redis_client.pttl(key + "a") == -1


def test_redis_milliseconds_ignore_float_noise() -> None:
    from cachekit.backends.redis_common import px as _px

    assert 2.007 * 1000 > 2007  # the float noise this guards against
    assert _px(2.007) == 2007
    assert _px(0.0001) == 1
    assert _px(1.0) == 1000


@pytest.mark.redis
def test_redis_keys_are_utf8_with_surrogates(
    redis_backend: RedisBackend, redis_client: redis.Redis, namespace: str
) -> None:
    key = f"{namespace}:ключ \udc80"
    redis_backend.set(key, b"v", None)
    assert redis_client.get(encode_key(key)) == b"v"
    assert redis_client.get(encode_key(key)) == redis_backend.get(key)


def test_redis_refuses_a_decoding_client() -> None:
    client = redis.Redis(host="127.0.0.1", port=1, decode_responses=True)
    with pytest.raises(ConfigurationError, match="decode_responses=False"):
        RedisBackend(client)
    client.close()


def test_redis_from_url_sets_short_timeouts_and_no_retries() -> None:
    backend = RedisBackend.from_url("redis://127.0.0.1:1", timeout=0.25)
    options = backend.client.connection_pool.connection_kwargs
    assert options["socket_timeout"] == 0.25
    assert options["socket_connect_timeout"] == 0.25
    assert options["retry"].get_retries() == 0
    backend.close()


@pytest.mark.parametrize("call", OPERATION_CALLS, ids=OPERATION_IDS)
def test_redis_refused_connection_is_a_backend_error(call: Callable[[Any], object]) -> None:
    backend = RedisBackend.from_url("redis://127.0.0.1:1")
    with pytest.raises(BackendError) as raised:
        call(backend)
    assert isinstance(raised.value.__cause__, redis.exceptions.ConnectionError)
    backend.close()


def test_redis_silent_server_is_a_backend_timeout(silent_port: int) -> None:
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{silent_port}", timeout=0.05)
    with pytest.raises(BackendTimeout) as raised:
        backend.get("k")
    assert isinstance(raised.value.__cause__, redis.exceptions.TimeoutError)
    backend.close()


# -- memcached -----------------------------------------------------------------------


def _address(server: tuple[str, int]) -> str:
    return f"{server[0]}:{server[1]}"


@pytest.mark.memcached
def test_memcached_batches_are_one_round_trip(
    memcached_server: tuple[str, int], round_trips: Counter[tuple[Any, str]], namespace: str
) -> None:
    backend = MemcachedBackend(_address(memcached_server), timeout=2.0, connect_timeout=2.0)
    keys = ns_keys(namespace)
    backend.set_many({key: b"v" for key in keys}, 60)
    assert backend.get_many(keys) == {key: b"v" for key in keys}
    backend.delete_many(keys)
    assert backend.get_many(keys) == {}
    backend.close()
    assert round_trips == {
        (memcached_server, "set"): 1,
        (memcached_server, "get"): 2,
        (memcached_server, "delete"): 1,
    }


@pytest.mark.memcached
def test_memcached_pool_batches_are_one_round_trip_per_server(
    memcached_server: tuple[str, int],
    second_memcached: tuple[str, int],
    round_trips: Counter[tuple[Any, str]],
    namespace: str,
) -> None:
    servers = [memcached_server, second_memcached]
    backend = MemcachedBackend([_address(s) for s in servers], timeout=2.0, connect_timeout=2.0)
    keys = ns_keys(namespace)
    backend.set_many({key: b"v" for key in keys}, 60)
    assert backend.get_many(keys) == {key: b"v" for key in keys}
    backend.delete_many(keys)
    assert backend.get_many(keys) == {}
    backend.close()
    # HashClient.delete_many alone would make one round trip per key here.
    expected = {(s, c): n for s in servers for c, n in (("set", 1), ("get", 2), ("delete", 1))}
    assert round_trips == expected


@pytest.mark.memcached
def test_memcached_pool_spreads_keys_over_both_servers(
    memcached_server: tuple[str, int], second_memcached: tuple[str, int], namespace: str
) -> None:
    backend = MemcachedBackend([_address(memcached_server), _address(second_memcached)])
    keys = ns_keys(namespace)
    backend.set_many({key: b"v" for key in keys}, 60)
    counts = []
    for server in (memcached_server, second_memcached):
        raw = Client(server, timeout=2.0, connect_timeout=2.0)
        counts.append(len(raw.get_many(keys)))
        raw.close()
    backend.delete_many(keys)
    backend.close()
    assert sum(counts) == N
    assert min(counts) > 0


def _remaining(memcached_client: Client, key: str) -> int | None:
    """Seconds left per memcached's meta ``mg <key> t``; -1 for no expiry, None if absent."""
    reply = memcached_client.raw_command(f"mg {key} t")
    if reply == b"EN":
        return None
    assert reply.startswith(b"HD t"), reply
    return int(reply[4:])


@pytest.mark.memcached
def test_memcached_ttls_reach_the_server(
    memcached_server: tuple[str, int], memcached_client: Client, namespace: str
) -> None:
    backend = MemcachedBackend(_address(memcached_server), timeout=2.0, connect_timeout=2.0)
    key = f"{namespace}:k"
    backend.set(key, b"v", None)
    assert _remaining(memcached_client, key) == -1
    # What is left can only shrink as time passes, by as much as a loaded machine takes
    # between the set and the read (SLOW seconds are allowed for it): the upper bounds
    # are exact, the lower ones generous. The rounding itself is checked without a server
    # in test_memcached_expire_arithmetic.
    backend.set(key, b"v", 0.2)  # rounds up to 1 s, never to 0 ("no expiry")
    assert _remaining(memcached_client, key) in (None, 0, 1)
    backend.set(key, b"v", 100.5)
    assert 101 - SLOW <= (_remaining(memcached_client, key) or 0) <= 101
    backend.set(key, b"v", 30 * DAY)  # the largest relative expiry
    assert 30 * DAY - SLOW <= (_remaining(memcached_client, key) or 0) <= 30 * DAY
    backend.set_many({key: b"v"}, 40 * DAY)  # sent as a unix time: still 40 days away
    # A unix time, read against the server's own clock, which ticks once a second and
    # may drift from ours: a few seconds either way (read as a relative time, 40 days
    # would be a date in 1970, and the item would be gone).
    assert 40 * DAY - SLOW <= (_remaining(memcached_client, key) or 0) <= 40 * DAY + SLOW
    assert backend.compare_and_set(key, b"v", b"w", None) is True
    assert _remaining(memcached_client, key) == -1
    backend.delete(key)
    backend.close()


def test_memcached_expire_arithmetic() -> None:
    from cachekit.backends.memcached import _expire

    assert _expire(None) == 0
    assert _expire(0.001) == 1
    assert _expire(1.5) == 2
    assert _expire(30 * DAY) == 30 * DAY
    now = time.time()
    assert now + 40 * DAY <= _expire(40 * DAY) <= time.time() + 40 * DAY + 1


@pytest.mark.parametrize("call", OPERATION_CALLS, ids=OPERATION_IDS)
def test_memcached_refused_connection_is_a_backend_error(call: Callable[[Any], object]) -> None:
    backend = MemcachedBackend(["127.0.0.1:1"])
    with pytest.raises(BackendError) as raised:
        call(backend)
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    backend.close()


def test_memcached_silent_server_is_a_backend_timeout(silent_port: int) -> None:
    backend = MemcachedBackend(f"127.0.0.1:{silent_port}", timeout=0.05, connect_timeout=0.05)
    with pytest.raises(BackendTimeout) as raised:
        backend.get("k")
    assert isinstance(raised.value.__cause__, TimeoutError)
    backend.close()


@pytest.mark.memcached
def test_memcached_pool_reports_a_dead_server_instead_of_missing(
    memcached_server: tuple[str, int], namespace: str
) -> None:
    """A dead server's keys fail (never read as absent, never rehashed elsewhere); after
    ``node_failures`` unanswered calls they fail fast; the live server carries on."""
    dead = "127.0.0.1:1"
    ring = HashClient([memcached_server, dead], timeout=2.0, connect_timeout=2.0, retry_timeout=60)
    backend = MemcachedBackend(ring, node_failures=2, node_cooldown=60)
    on_dead = next(k for i in range(1000) if ring.hasher.get_node(k := f"{namespace}:{i}") == dead)
    on_live = next(k for i in range(1000) if ring.hasher.get_node(k := f"{namespace}:{i}") != dead)

    for _ in range(2):
        with pytest.raises(BackendError) as refused:
            backend.get(on_dead)
        assert isinstance(refused.value.__cause__, ConnectionRefusedError)
    # Marked down: no call reaches it, and none reads as a miss (get) or as "present"
    # (add), which is what HashClient's own back-off answers.
    failing_fast: list[Callable[[MemcachedBackend], object]] = [
        lambda b: b.get(on_dead),
        lambda b: b.get_many([on_live, on_dead]),
        lambda b: b.add(on_dead, b"v", None),
        lambda b: b.set_many({on_live: b"v", on_dead: b"v"}, 10),
        lambda b: b.compare_and_set(on_dead, b"v", b"w", None),
        lambda b: b.delete(on_dead),
    ]
    for call in failing_fast:
        with pytest.raises(BackendUnavailable, match="marked down"):
            call(backend)
    assert backend._nodes.node_for(on_dead).name == dead  # its keys stay where they were
    assert backend.get(on_live) == b"v"  # set_many still stored the live server's share
    backend.set(on_live, b"w", 10)
    assert backend.get(on_live) == b"w"
    backend.delete(on_live)
    health = backend.node_health()
    assert health[dead].state == "down" and health[dead].short_circuited == len(failing_fast)
    ring.close()


def test_memcached_refuses_clients_that_hide_errors_or_change_data() -> None:
    server = ("127.0.0.1", 1)
    refused = [
        Client(server, ignore_exc=True),
        Client(server, key_prefix=b"app:"),
        Client(server, serde=pickle_serde),
        HashClient([server], ignore_exc=True),
        HashClient([server], serde=pickle_serde),
    ]
    for client in refused:
        with pytest.raises(ConfigurationError):
            MemcachedBackend(client)
    MemcachedBackend(Client(server))  # the plain defaults are fine
    MemcachedBackend(HashClient([server], use_pooling=True))


@pytest.mark.parametrize(
    ("servers", "options"),
    [([], {}), (["127.0.0.1:port"], {}), ("127.0.0.1:11211", {"timeout": 0})],
    ids=["no servers", "bad port", "zero timeout"],
)
def test_memcached_rejects_bad_configuration(servers: Any, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        MemcachedBackend(servers, **options)


@pytest.mark.memcached
def test_memcached_injected_client_is_used_and_left_open(
    memcached_client: Client, namespace: str
) -> None:
    backend = MemcachedBackend(memcached_client)
    backend.set(f"{namespace}:k", b"v", 10)
    backend.close()
    assert memcached_client.get(f"{namespace}:k") == b"v"
    assert backend.get(f"{namespace}:absent") is MISSING


def test_memcached_values_must_be_bytes() -> None:
    backend = MemcachedBackend("127.0.0.1:1")
    with pytest.raises(TypeError, match="bytes"):
        backend.set("k", "text", None)
    backend.close()


# -- memcached: add keeps its cas token, so a lease swap is one round trip -----------


@dataclass
class Counted:
    """A memcached backend whose round trips land in ``trips`` as (server, command)."""

    backend: MemcachedBackend
    trips: Counter[tuple[Any, str]]
    raws: list[Client] = field(default_factory=list)

    def commands(self) -> dict[str, int]:
        """Round trips per command, over every server."""
        commands: Counter[str] = Counter()
        for (_, command), n in self.trips.items():
            commands[command] += n
        return dict(commands)

    def raw(self, key: str) -> Client:
        """A plain client on the server that holds ``key``: another writer."""
        node = self.backend._nodes.node_for(key)
        server = MEMCACHED_ADDRESS if node is None else node.server
        client = Client(server, timeout=2.0, connect_timeout=2.0, default_noreply=False)
        self.raws.append(client)
        return client


LEASE_SETUPS = ["server list", "ring", "injected Client", "injected PooledClient", "ring given"]


@pytest.fixture(params=LEASE_SETUPS)
def counted(request: pytest.FixtureRequest, memcached_server: tuple[str, int]) -> Iterator[Counted]:
    """Each way of building the backend, on the real memcached (and a second one)."""
    options: dict[str, Any] = {"timeout": 2.0, "connect_timeout": 2.0}
    owned: list[Any] = []
    if request.param in ("server list", "ring"):
        # The fixture patches the module's Client, which the backend builds its own with.
        trips = request.getfixturevalue("round_trips")
        servers = [memcached_server]
        if request.param == "ring":
            servers.append(request.getfixturevalue("second_memcached"))
        backend = MemcachedBackend([_address(s) for s in servers], **options)
    else:
        trips = Counter()
        counting = counting_client_class(trips)
        client: Any
        if request.param == "injected Client":
            client = counting(memcached_server, **options)
        elif request.param == "injected PooledClient":
            client = PooledClient(memcached_server, **options)
            client.client_class = counting
        else:

            class CountingHashClient(HashClient):  # type: ignore[misc]
                client_class = counting

            client = CountingHashClient([memcached_server], **options)
        owned.append(client)
        backend = MemcachedBackend(client)
    counted = Counted(backend, trips)
    yield counted
    backend.close()
    for client in counted.raws:
        client.close()
    for client in owned:
        client.close()


def _marker() -> bytes:
    marker: bytes = new_lease(objects=False)
    return marker


@pytest.mark.memcached
def test_memcached_add_then_swap_is_two_round_trips(counted: Counted, namespace: str) -> None:
    backend, key, marker = counted.backend, f"{namespace}:k", _marker()
    assert backend.add(key, marker, 10) is True
    assert backend.compare_and_set(key, marker, b"value", 60) is True
    assert counted.commands() == {"ms": 1, "cas": 1}
    assert len({server for server, _ in counted.trips}) == 1  # both on the key's server
    assert backend.get(key) == b"value"

    counted.trips.clear()
    marker = _marker()
    assert backend.add(key + "d", marker, 10) is True
    assert backend.compare_and_delete(key + "d", marker) is True
    assert counted.commands() == {"ms": 1, "cas": 1}
    assert backend.get(key + "d") is MISSING

    counted.trips.clear()
    assert backend.add(key, marker, 10) is False  # present: NS, nothing remembered
    assert counted.commands() == {"ms": 1}
    backend.delete(key)


@pytest.mark.memcached
def test_memcached_meta_add_writes_what_plain_add_writes(
    memcached_server: tuple[str, int], memcached_client: Client, namespace: str
) -> None:
    backend = MemcachedBackend(_address(memcached_server), timeout=2.0, connect_timeout=2.0)
    key, value = f"{namespace}:k", b"\x00L\r\n raw \xff bytes"
    assert backend.add(key, value, None) is True
    assert memcached_client.raw_command(f"mg {key} f t s") == b"HD f0 t-1 s%d" % len(value)
    assert memcached_client.get(key) == value
    assert backend.get_many([key]) == {key: value}
    assert backend.add(key + "t", value, 100.5) is True
    # add takes leases: one extra second, so memcached's whole-second clock never ends
    # one before its TTL (see _add_expire). Exact above; below, what a slow machine
    # takes between the add and the read (see test_memcached_ttls_reach_the_server).
    assert 102 - SLOW <= (_remaining(memcached_client, key + "t") or 0) <= 102
    assert backend.add(key + "u", value, 40 * DAY) is True  # sent as a unix time
    assert 40 * DAY - SLOW <= (_remaining(memcached_client, key + "u") or 0) <= 40 * DAY + SLOW
    backend.delete_many([key, key + "t", key + "u"])
    backend.close()


@pytest.mark.memcached
@pytest.mark.parametrize("swap", ["compare_and_set", "compare_and_delete"])
def test_memcached_remembered_token_loses_to_any_write_in_between(
    counted: Counted, namespace: str, swap: str
) -> None:
    backend, key = counted.backend, f"{namespace}:k"
    other = counted.raw(key)  # replies awaited: the write lands before our swap

    def attempt(expected: bytes) -> bool:
        if swap == "compare_and_set":
            return backend.compare_and_set(key, expected, b"mine", 60)
        return backend.compare_and_delete(key, expected)

    marker = _marker()
    assert backend.add(key, marker, 10) is True
    other.set(key, b"theirs", 60)  # another client rewrites the key
    assert attempt(marker) is False
    assert other.get(key) == b"theirs"
    other.delete(key)

    marker = _marker()
    assert backend.add(key, marker, 10) is True
    other.delete(key)  # or deletes it: no value comes back to life
    counted.trips.clear()
    assert attempt(marker) is False
    assert counted.commands() == {"cas": 1}  # NOT_FOUND settles it: absent never matches
    assert other.get(key) is None

    # A rewrite with the very same bytes still holds ``expected``: EXISTS takes the
    # gets-and-compare path, as a backend that never saw the add would.
    marker = _marker()
    assert backend.add(key, marker, 10) is True
    other.set(key, marker, 60)
    counted.trips.clear()
    assert attempt(marker) is True
    assert counted.commands() == {"cas": 2, "gets": 1}
    assert other.get(key) == (b"mine" if swap == "compare_and_set" else None)
    other.delete(key)


@pytest.mark.memcached
def test_memcached_token_answers_only_for_its_own_value(counted: Counted, namespace: str) -> None:
    backend, key = counted.backend, f"{namespace}:k"
    mine, other = _marker(), _marker()
    assert backend.add(key, mine, 10) is True
    counted.trips.clear()
    # Another expected value never gets this add's token: it compares, and fails.
    assert backend.compare_and_set(key, other, b"x", 60) is False
    assert backend.compare_and_delete(key, other) is False
    assert backend.compare_and_set(key + "2", mine, b"x", 60) is False  # nor another key
    assert counted.commands() == {"gets": 3}
    assert backend.get(key) == mine
    # The token is still there for its own value, and is spent by its first use.
    counted.trips.clear()
    assert backend.compare_and_set(key, mine, b"v", 60) is True
    assert backend.compare_and_set(key, mine, b"w", 60) is False
    assert counted.commands() == {"cas": 1, "gets": 1}
    assert backend.get(key) == b"v"
    backend.delete(key)


def test_memcached_cas_tokens_are_bounded_and_per_server() -> None:
    from cachekit.backends.memcached import _CasTokens

    tokens = _CasTokens(limit=3)
    for i in range(5):
        tokens.remember(f"k{i}", b"m", None, b"%d" % i)
    assert len(tokens) == 3
    assert tokens.take("k0", b"m", None) is None  # the oldest went first
    tokens.remember("k2", b"m", None, b"22")  # re-added: newest, with the newer token
    tokens.remember("k5", b"m", None, b"5")
    assert tokens.take("k3", b"m", None) is None
    assert tokens.take("k2", b"m", None) == b"22"
    assert tokens.take("k2", b"m", None) is None  # used once
    node = object()
    tokens.remember("k", b"m", node, b"7")
    assert tokens.take("k", b"m", object()) is None  # moved to another server: unusable
    assert tokens.take("k", b"m", node) is None  # and forgotten
    assert tokens.take("k", "not bytes", None) is None


@pytest.mark.memcached
def test_memcached_add_falls_back_when_the_server_has_no_meta_set(
    memcached_server: tuple[str, int], namespace: str
) -> None:
    class OldServerClient(Client):  # type: ignore[misc]
        """Answers ``ms`` as memcached before 1.6 does: ERROR, connection closed."""

        def _misc_cmd(self, cmds: Any, cmd_name: bytes, *args: Any, **kwargs: Any) -> Any:
            if cmd_name == b"ms":
                self.close()
                raise MemcacheUnknownCommandError(cmd_name)
            return super()._misc_cmd(cmds, cmd_name, *args, **kwargs)

    client = OldServerClient(memcached_server, timeout=2.0, connect_timeout=2.0)
    backend = MemcachedBackend(client)
    key, marker = f"{namespace}:k", _marker()
    assert backend.add(key, marker, 10) is True
    assert backend.add(key, marker, 10) is False
    assert backend.compare_and_set(key, marker, b"v", 10) is True  # by gets and cas
    assert backend.get(key) == b"v"
    backend.delete(key)
    client.close()


def test_batch_compare_and_set_survives_a_script_flush() -> None:
    """Raw EVALSHA in a pipeline (no SCRIPT EXISTS first): NOSCRIPT is answered by
    loading the script and re-running only the calls that were refused."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    backend = RedisBackend(client)
    backend.set_many({"a": b"x", "b": b"y"}, None)
    client.script_flush()
    assert backend.compare_and_set_many({"a": (b"x", b"X"), "b": (b"no", b"Y")}, None) == {"a"}
    assert backend.get_many(["a", "b"]) == {"a": b"X", "b": b"y"}
