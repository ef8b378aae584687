"""A memcached pool under failure: hung, killed and added servers, on real processes.

Every server here is a memcached of the test's own on a free loopback port, paused
(SIGSTOP), resumed, killed (SIGKILL) and restarted by its PID through
:mod:`tests.servers`. The shared server on 11211 is never touched. Figures the review
asks for (stale reads, key movement, hit ratios) are printed: run with ``-s``.

Every case runs twice: on MemcachedBackend, and on AsyncMemcachedBackend driven
through :class:`tests.blocking.Blocking` (its coroutines on an event loop in a thread
of its own), so the sync Cache and these very scenarios check both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient

import cachekit.backends.memcached as memcached_module
import cachekit.backends.memcached_async_ring as async_ring_module
from cachekit import MISSING, BackendError, Cache
from cachekit.backends.memcached import AsyncMemcachedBackend, MemcachedBackend
from cachekit.exceptions import BackendUnavailable, ConfigurationError
from tests.blocking import Blocking, EventLoopThread
from tests.conftest import require
from tests.servers import Server, ServerError, Servers, binary, memcached_command

pytestmark = pytest.mark.memcached

ROWS = 300
# Short, so that marking a hung server down costs NODE_FAILURES * TIMEOUT seconds. On a
# loaded machine a live server can miss it too: the hung-server tests assert only what
# holds either way (a live server's timeout is a miss, or a journaled delete).
TIMEOUT = 0.2
NODE_FAILURES = 3
COOLDOWN = 0.4
# For killed servers (refused at once, whatever the timeout) and raw clients: generous,
# so that a live server's slow reply under load is never mistaken for a failure.
RAW_TIMEOUT = 2.0
PASSES = 5
EVENTUALLY = 30.0  # seconds for a resumed server to rejoin and the journal to drain


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    """A group of memcached processes of this test's own, stopped by PID at the end."""
    require("the memcached binary", binary("memcached") is not None, "install memcached")
    with Servers(tmp_path) as group:
        yield group
        for member in group.members:  # throwaway data: SIGKILL, not SIGTERM's ~1 s exit
            member.kill()


def start(servers: Servers, count: int, *extra: str) -> list[Server]:
    started = len(servers.members)
    try:
        return [
            servers.start(f"memcached-{started + i}", memcached_command(*extra))
            for i in range(count)
        ]
    except ServerError as exc:
        require("memcached processes of our own", False, str(exc))
        raise  # not reached: require() skipped or failed


# MemcachedBackend, or an AsyncMemcachedBackend seen through Blocking.
Backend = Any
Pool = Callable[..., Backend]


@pytest.fixture(params=["sync", "async"])
def make_backend(request: pytest.FixtureRequest) -> Iterator[Callable[..., Backend]]:
    """Builds backends of one flavour (``servers``, options), and closes every one at
    the end, even when the test failed (an unclosed one would raise its
    ResourceWarning in a later test)."""
    built: list[Backend] = []
    loop = EventLoopThread() if request.param == "async" else None

    def build(servers: str | list[str], **options: Any) -> Backend:
        backend: Backend
        if loop is None:
            backend = MemcachedBackend(servers, **options)
        else:
            backend = Blocking(AsyncMemcachedBackend(servers, **options), loop.call)
        built.append(backend)
        return backend

    yield build
    for backend in built:
        backend.close()
    if loop is not None:
        loop.stop()


@pytest.fixture
def pool(make_backend: Callable[..., Backend]) -> Pool:
    """Builds pool backends over servers, with this module's short timeouts."""

    def build(members: list[Server], **options: Any) -> Backend:
        settings: dict[str, Any] = {
            "timeout": TIMEOUT,
            "connect_timeout": TIMEOUT,
            "node_failures": NODE_FAILURES,
            "node_cooldown": COOLDOWN,
        }
        return make_backend([m.address for m in members], **(settings | options))

    return build


def killable(pool: Pool, members: list[Server]) -> Backend:
    """A pool with generous timeouts, for tests where no server hangs: a killed one
    refuses at once whatever the timeout, and a live one's slow reply under load must
    not count as a failure."""
    return pool(members, timeout=RAW_TIMEOUT, connect_timeout=RAW_TIMEOUT)


def server_of(backend: Backend, bkey: str) -> str:
    """The "host:port" the pool hashes a backend key to."""
    name: str = backend._nodes.node_for(bkey).name
    return name


def raw_client(server: Server) -> Client:
    return Client((server.host, server.port), timeout=RAW_TIMEOUT, connect_timeout=RAW_TIMEOUT)


class Rows:
    """The system of record: a version number per row, and the loader calls it served."""

    def __init__(self, count: int = ROWS) -> None:
        self.versions = dict.fromkeys(range(count), 0)
        self.loads = 0

    def load(self, row: int) -> dict[str, int]:
        self.loads += 1
        return {"id": row, "version": self.versions[row]}

    def update(self, row: int) -> None:
        self.versions[row] += 1


def stale_reads(cache: Cache, rows: Rows) -> list[int]:
    """Rows whose cached entry is older than the record (a miss is not stale)."""
    found = [(row, cache.get(f"row:{row}")) for row in rows.versions]
    return [
        row
        for row, value in found
        if value is not MISSING and value["version"] != rows.versions[row]
    ]


def warm(cache: Cache, rows: Rows) -> None:
    for row in rows.versions:
        cache.get_or_load(f"row:{row}", lambda row=row: rows.load(row))


def wait_for_cooldown() -> None:
    time.sleep(COOLDOWN + 0.05)


def read_until_settled(cache: Cache, backend: Backend, server: Server, rows: Rows) -> int:
    """Read every row (plain and through get_or_load), pass after pass, asserting each
    pass, until ``server`` is back in the pool and the journal is empty; the passes
    it took. How soon that happens depends on the machine (the probe after the
    cool-down must get its answer in time), so it is waited for, not assumed."""
    deadline = time.monotonic() + EVENTUALLY
    passes = 0
    while True:
        passes += 1
        assert stale_reads(cache, rows) == []
        for row in rows.versions:
            value = cache.get_or_load(f"row:{row}", lambda row=row: rows.load(row))
            assert value == rows.load(row)
        settled = backend.node_health()[server.address].state == "up"
        if settled and cache.stats().pending_invalidations == 0:
            return passes
        assert time.monotonic() < deadline, "the resumed server never rejoined"
        time.sleep(0.05)


# -- a hung server ----------------------------------------------------------------------


def test_a_hung_server_leaves_no_stale_reads_after_it_resumes(
    servers: Servers, pool: Pool, namespace: str
) -> None:
    """300 rows are updated and invalidated while one of 3 servers hangs past its
    dead-marking; once it resumes, not one read returns an old row."""
    members = start(servers, 3)
    backend = pool(members)
    cache = Cache(backend, namespace=namespace, breaker=None)
    rows = Rows()
    warm(cache, rows)
    hung = members[1]
    on_hung = [
        r
        for r in rows.versions
        if server_of(backend, cache.backend_key(f"row:{r}")) == hung.address
    ]

    hung.pause()
    for row in rows.versions:
        rows.update(row)  # commit, then invalidate
        cache.delete(f"row:{row}")  # never raises: a failed delete is journaled
    for row in rows.versions:  # reads during the outage: fail-open, never old
        assert cache.get_or_load(f"row:{row}", lambda row=row: rows.load(row)) == rows.load(row)
    during = backend.node_health()[hung.address]
    deferred = cache.stats().invalidations_deferred
    hung.resume()

    wait_for_cooldown()
    passes = read_until_settled(cache, backend, hung, rows)
    health = backend.node_health()[hung.address]
    stats = cache.stats()
    print(
        f"\nhung server: {len(on_hung)} of {ROWS} rows on it, deletes journaled={deferred}, "
        f"read passes until it rejoined={passes} (none stale), marked_down={health.marked_down}, "
        f"flushes={health.flushes}, short_circuited={health.short_circuited}"
    )
    assert during.state == "down" and during.short_circuited > 0  # its keys failed fast
    # Every delete it missed was kept (a live server's timeout under load adds more)...
    assert deferred >= len(on_hung)
    assert stats.pending_invalidations == 0  # ...and replayed once it answered
    # It was flushed before anything read it again (how many times it went down and
    # came back depends on the machine: each probe must be answered within TIMEOUT).
    assert health.state == "up" and health.marked_down >= 1 and health.flushes >= 1


@pytest.mark.parametrize("flush_on_join", [True, False], ids=["flush", "no-flush"])
def test_a_server_that_was_down_is_flushed_before_anyone_reads_it(
    servers: Servers, pool: Pool, namespace: str, flush_on_join: bool
) -> None:
    """The writer that journaled the deletes exits before the server resumes; another
    process that saw the outage reads next. Only the flush keeps that read fresh; the
    run without it is the control that shows the scenario goes stale otherwise."""
    members = start(servers, 3)
    writer_backend = pool(members, flush_on_join=flush_on_join)
    reader_backend = pool(members, flush_on_join=flush_on_join)
    writer = Cache(writer_backend, namespace=namespace, breaker=None)
    reader = Cache(reader_backend, namespace=namespace, breaker=None)
    rows = Rows()
    warm(reader, rows)

    hung = members[2]
    hung.pause()
    for row in rows.versions:
        rows.update(row)
        writer.delete(f"row:{row}")
    # The writer process exits: its journal is gone. On a loaded machine it may hold
    # deletes for live servers too (timed out): those are lost whatever the flush does.
    lost_elsewhere = {
        row
        for row in rows.versions
        if (bkey := writer.backend_key(f"row:{row}")) in writer.journal.keys
        and server_of(writer_backend, bkey) != hung.address
    }
    writer_backend.close()
    with writer.journal._replaying:  # ... and its replays stop (after any one in flight)
        writer.journal.keys.clear()
    for row in rows.versions:  # the reader sees the outage too
        reader.get_or_load(f"row:{row}", lambda row=row: rows.load(row))
    hung.resume()

    wait_for_cooldown()
    deadline = time.monotonic() + EVENTUALLY
    while reader_backend.node_health()[hung.address].state != "up":  # a probe per cool-down
        reader.get_many([f"row:{row}" for row in rows.versions])
        assert time.monotonic() < deadline, "the resumed server never rejoined"
        time.sleep(0.05)
    stale = set(stale_reads(reader, rows)) - lost_elsewhere
    print(
        f"\nflush_on_join={flush_on_join}: stale reads by another process={len(stale)} "
        f"(+{len(lost_elsewhere)} whose deletes timed out on a live server)"
    )
    if flush_on_join:
        assert stale == set()
        assert reader_backend.node_health()[hung.address].flushes >= 1
    else:
        assert len(stale) > 0.1 * ROWS  # the lost deletes are visible: the guard matters


# -- a killed server --------------------------------------------------------------------


def test_a_killed_server_never_fails_a_caller_and_rejoins_empty(
    servers: Servers, pool: Pool, namespace: str
) -> None:
    members = start(servers, 3)
    backend = killable(pool, members)
    cache = Cache(backend, namespace=namespace, breaker=None)
    rows = Rows()
    view = cache.read_through(
        "row",
        load=rows.load,
        load_many=lambda ids: {row: rows.load(row) for row in ids},
    )

    @cache.cached(key="fn:{row}")
    def decorated(row: int) -> dict[str, int]:
        return rows.load(row)

    ids = list(rows.versions)
    assert view.get_many(ids) == {row: rows.load(row) for row in ids}
    for row in ids:
        decorated(row)
    dead = members[0]
    on_live = [r for r in ids if server_of(backend, cache.backend_key(f"row:{r}")) != dead.address]
    dead.kill()

    started = time.monotonic()
    for _ in range(3):  # every call succeeds and is right; nothing raises
        assert view.get_many(ids) == {row: rows.load(row) for row in ids}
        for row in ids:
            assert view.get(row) == rows.load(row)
            assert decorated(row) == rows.load(row)
            assert cache.get_or_load(f"x:{row}", lambda row=row: row) == row
        cache.get_many([f"row:{row}" for row in ids])
        cache.delete_many([f"x:{row}" for row in ids[:10]])
        decorated.invalidate(ids[0])
    elapsed = time.monotonic() - started
    cache.reset_stats()
    live_hits = sum(cache.get(f"row:{row}") is not MISSING for row in on_live)
    health = backend.node_health()[dead.address]
    print(
        f"\nkilled server: 3 passes of {ROWS} rows x 4 calls in {elapsed:.2f} s, "
        f"live-server hits {live_hits}/{len(on_live)}, short_circuited={health.short_circuited}"
    )
    assert live_hits == len(on_live)  # the other servers carried on
    assert health.state == "down" and health.short_circuited > 0

    dead.start()  # same port, empty
    wait_for_cooldown()
    assert view.get_many(ids) == {row: rows.load(row) for row in ids}
    assert backend.node_health()[dead.address].state == "up"
    cache.reset_stats()
    assert view.get_many(ids) == {row: rows.load(row) for row in ids}
    assert cache.stats().hits == ROWS  # refilled, every server serving again
    backend.close()


def test_a_cache_wide_breaker_would_turn_one_dead_server_into_misses_everywhere(
    servers: Servers, pool: Pool, namespace: str
) -> None:
    """Why a pool's Cache wants ``breaker=None``: the per-server breakers already fail
    the dead server's keys fast, and a cache-wide one opens on them and drops the live
    servers' hits too. Measured on the same pool, with and without it."""
    members = start(servers, 3)
    backend = killable(pool, members)
    rows = Rows()
    caches = {
        "per-server only": Cache(backend, namespace=namespace + "a", breaker=None),
        "plus cache-wide": Cache(backend, namespace=namespace + "b"),  # the default breaker
    }
    for cache in caches.values():
        warm(cache, rows)
    dead = members[0]
    dead.kill()
    ratios = {}
    for label, cache in caches.items():
        on_live = {
            row
            for row in rows.versions
            if server_of(backend, cache.backend_key(f"row:{row}")) != dead.address
        }
        hits = 0
        for _ in range(PASSES):
            for row in rows.versions:  # interleaved, as real traffic is
                value = cache.get(f"row:{row}")
                hits += row in on_live and value is not MISSING
        ratios[label] = round(hits / (PASSES * len(on_live)), 3)
    print(f"\nlive-server hit ratio with one of 3 servers dead: {ratios}")
    assert ratios["per-server only"] == 1.0
    backend.close()


# -- growing the pool -------------------------------------------------------------------


def test_adding_a_fourth_server_moves_a_quarter_of_the_keys_and_none_read_stale(
    servers: Servers, pool: Pool, namespace: str
) -> None:
    members = start(servers, 4)
    first, fourth = members[:3], members[3]
    backend = killable(pool, first)  # no server fails here: generous timeouts
    cache = Cache(backend, namespace=namespace, breaker=None)
    keys = [f"k{i}" for i in range(10_000)]
    bkeys = [cache.backend_key(key) for key in keys]
    cache.set_many({key: key for key in keys}, ttl=60)
    before = {bkey: server_of(backend, bkey) for bkey in bkeys}
    # The fourth server still holds entries under those keys from an earlier life in
    # the pool: without the flush, every moved key would read one of them.
    leftovers = raw_client(fourth)
    leftovers.set_many({bkey: b'"stale"' for bkey in bkeys}, expire=60, noreply=False)

    backend.add_server(fourth.address)
    after = {bkey: server_of(backend, bkey) for bkey in bkeys}
    moved = [bkey for bkey in bkeys if before[bkey] != after[bkey]]
    fraction = len(moved) / len(bkeys)
    found = cache.get_many(keys)
    print(f"\nadding a 4th server moved {len(moved)}/{len(bkeys)} keys = {fraction:.3f}")
    assert 0.15 <= fraction <= 0.35
    assert {after[bkey] for bkey in moved} == {fourth.address}  # only to the new server
    assert all(value == key for key, value in found.items())  # nothing stale, nothing foreign
    assert len(found) == len(keys) - len(moved)  # moved keys are misses, the rest hit
    assert backend.node_health()[fourth.address].flushes == 1
    leftovers.close()
    backend.close()


def test_a_server_that_refuses_flush_all_does_not_join(servers: Servers, pool: Pool) -> None:
    first = start(servers, 2)
    no_flush = start(servers, 1, "-F")[0]  # memcached -F: flush_all disabled
    backend = killable(pool, first)
    with pytest.raises(BackendUnavailable, match="refused flush_all"):
        backend.add_server(no_flush.address)
    assert no_flush.address not in backend.node_health()
    backend.close()
    trusting = pool(first, flush_on_join=False, timeout=RAW_TIMEOUT, connect_timeout=RAW_TIMEOUT)
    trusting.add_server(no_flush.address)  # the journal alone then guards it
    assert trusting.node_health()[no_flush.address].state == "up"
    trusting.close()


def test_adding_servers_is_checked(
    memcached_pool: list[str], make_backend: Callable[..., Backend]
) -> None:
    single = make_backend(memcached_pool[0])
    with pytest.raises(ConfigurationError, match="only a pool grows"):
        single.add_server(memcached_pool[1])
    assert single.node_health() == {}
    single.close()
    backend = make_backend(memcached_pool[:2], timeout=TIMEOUT, connect_timeout=TIMEOUT)
    with pytest.raises(ConfigurationError, match="already in the pool"):
        backend.add_server(memcached_pool[1])
    with pytest.raises(BackendError) as refused:
        backend.add_server("127.0.0.1:1")
    assert isinstance(refused.value.__cause__, ConnectionRefusedError)
    assert set(backend.node_health()) == set(memcached_pool[:2])
    backend.close()
    for options in ({"node_failures": 0}, {"node_cooldown": 0}):
        with pytest.raises(ConfigurationError):
            make_backend(memcached_pool, **options)


# -- one dead server in a batch ---------------------------------------------------------


@pytest.fixture
def with_dead_server(
    memcached_pool: list[str], make_backend: Callable[..., Backend]
) -> tuple[Backend, str]:
    """The session's pool plus an address that refuses connections."""
    dead = "127.0.0.1:1"
    backend = make_backend(
        [*memcached_pool, dead], timeout=RAW_TIMEOUT, connect_timeout=RAW_TIMEOUT
    )
    return backend, dead


def test_a_batch_reaches_every_live_server_before_reporting_the_dead_one(
    with_dead_server: tuple[Backend, str], namespace: str
) -> None:
    backend, dead = with_dead_server
    keys = [f"{namespace}:{i}" for i in range(200)]
    added = [key + "a" for key in keys]
    live = [key for key in keys + added if server_of(backend, key) != dead]
    assert 0 < len(live) < 2 * len(keys)
    calls: list[Callable[[], object]] = [
        lambda: backend.set_many(dict.fromkeys(keys, b"v"), 60),
        lambda: backend.add_many(dict.fromkeys(added, b"v"), 60),
    ]
    for call in calls:
        with pytest.raises(BackendError):
            call()
    assert backend.get_many(live) == dict.fromkeys(live, b"v")
    with pytest.raises(BackendError):
        backend.delete_many(keys + added)
    assert backend.get_many(live) == {}  # deleted on every server that answered
    health = backend.node_health()
    assert health[dead].state == "down"
    assert all(h.state == "up" for name, h in health.items() if name != dead)


def test_a_down_server_is_probed_once_per_cooldown(
    with_dead_server: tuple[Backend, str], namespace: str
) -> None:
    backend, dead = with_dead_server
    key = next(k for i in range(1000) if server_of(backend, k := f"{namespace}:{i}") == dead)
    for _ in range(3):  # node_failures defaults to 3
        with pytest.raises(BackendError) as refused:
            backend.get(key)
        assert isinstance(refused.value.__cause__, ConnectionRefusedError)
    for _ in range(100):
        with pytest.raises(BackendUnavailable):
            backend.get(key)
    assert backend.node_health()[dead].short_circuited == 100
    backend._nodes.node_for(key)._down_at -= 1.0  # the cool-down is over: one probe
    with pytest.raises(BackendError) as probed:
        backend.get(key)
    assert isinstance(probed.value.__cause__, ConnectionRefusedError)
    with pytest.raises(BackendUnavailable):  # the probe failed: down again
        backend.get(key)
    health = backend.node_health()[dead]
    assert health.marked_down == 1 and health.flushes == 0


def test_remembered_routes_are_pymemcaches_and_bounded(
    memcached_pool: list[str],
    make_backend: Callable[..., Backend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keys land where a plain pymemcache HashClient puts them (other clients of the
    same servers agree, the sync and async backends included), and the route memo
    stays within its bound."""
    monkeypatch.setattr(memcached_module, "_MAX_ROUTES", 50)
    monkeypatch.setattr(async_ring_module, "MAX_ROUTES", 50)
    backend = make_backend(memcached_pool)
    reference = HashClient(memcached_pool)
    keys = [f"route:{i}" for i in range(500)]
    for _ in range(2):  # computed, then remembered (or recomputed after a reset)
        assert [server_of(backend, key) for key in keys] == [
            reference.hasher.get_node(key) for key in keys
        ]
        assert len(backend._nodes.members.routes) <= 50
    reference.close()
    backend.close()
