"""AsyncCache under faults: cancelled tasks, and a private Redis hung or killed under load.

The Redis tests run a ``redis-server`` of their own on a free loopback port (never the
shared one), stopped by PID at the end. They assert counts and correctness, never
timing; their figures are printed (run with ``-s``).
"""

from __future__ import annotations

import asyncio
import functools
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from cachekit import MISSING, AsyncCache
from cachekit.backends.base import AsyncBackend
from cachekit.backends.redis import AsyncRedisBackend
from cachekit.keys import encode_key
from cachekit.markers import is_marker
from tests.async_support import (
    AMEMCACHED,
    AREDIS,
    GENEROUS,
    CancelsTasks,
    Gate,
    on_three,
    until,
)
from tests.conftest import SERVER_TIMEOUT
from tests.servers import Server
from tests.test_faults_redis import redis_process  # noqa: F401 - a fixture

# -- cancellation -----------------------------------------------------------------------


@on_three
async def test_a_cancelled_lease_holder_releases_its_lease(
    acache: AsyncCache, async_backend: AsyncBackend
) -> None:
    gate = Gate()
    holding = asyncio.create_task(acache.get_or_load("k", gate.loader("never stored")))
    await gate.entered.wait()
    bkey = acache.backend_key("k")
    assert is_marker(await async_backend.get(bkey))  # it holds the lease
    holding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holding
    assert await async_backend.get(bkey) is MISSING  # released: no marker left to expire

    async def load() -> str:
        return "loaded"

    assert await acache.get_or_load("k", load) == "loaded"
    assert acache.stats().lease_waits == 0  # the next caller loaded at once
    assert await acache.get("k") == "loaded"


@on_three
@pytest.mark.parametrize("cancelled", ["a follower", "the leader"])
async def test_a_cancelled_task_does_not_fail_those_sharing_its_miss(
    acache: AsyncCache, cancelled: str
) -> None:
    gate, loaders = Gate(), list[Any]()

    async def load() -> str:
        loaders.append(asyncio.current_task())
        if len(loaders) == 1:
            await gate.wait()
        return "value"

    tasks = [asyncio.create_task(acache.get_or_load("k", load)) for _ in range(4)]
    await gate.entered.wait()
    await until(lambda: acache.stats().lease_waits == 3, "three tasks to follow the leader")
    leader = loaders[0]
    victim = leader if cancelled == "the leader" else next(t for t in tasks if t is not leader)
    victim.cancel()
    await asyncio.gather(victim, return_exceptions=True)
    assert victim.cancelled()
    gate.opened.set()
    assert await asyncio.gather(*(t for t in tasks if t is not victim)) == ["value"] * 3
    assert len(loaders) == (2 if victim is leader else 1)  # a follower took over the load
    assert await acache.get("k") == "value"


STORM_KEYS = 400  # two tasks on each
# Tasks at a time: fewer than the 100 connections of a redis.asyncio pool (see below).
WAVE = 96
STORM_LEASE_TTL = 3.0


def storm_value(key: str) -> str:
    """A value only this key has: from a few bytes to ~40 KB (several socket reads)."""
    return f"{key}=" + key * (random.Random(key).choice([1, 10, 100, 4000]))


@dataclass
class Storm:
    """Tasks that load, set, read and delete keys of their own, half of them cancelled
    at random points; any value that is not the key's own is counted."""

    store: CancelsTasks
    acache: AsyncCache
    keys: list[str]
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    wrong: list[tuple[str, Any]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    cancelled: int = 0
    lease_ttls: list[int] = field(default_factory=list)  # on Redis, seen while loading

    async def work(self, key: str, ops: list[str], turns: list[int]) -> None:
        value, acache, backend = storm_value(key), self.acache, self.store.inner

        async def load() -> str:
            if isinstance(backend, AsyncRedisBackend):  # its lease, held while it loads
                self.lease_ttls += await lease_ttls(backend, [acache.backend_key(key)])
            for _ in range(turns.pop()):
                await asyncio.sleep(0)
            return value

        for op in ops:
            if op == "load":
                got = await acache.get_or_load(key, load)
                if got != value:
                    self.wrong.append((key, got))
            elif op == "get" and (got := await acache.get(key)) not in (MISSING, value):
                self.wrong.append((key, got))
            elif op == "set":
                await acache.set(key, value)
            elif op == "delete":
                await acache.delete(key)

    async def wave(self, keys: list[str]) -> None:
        rng, tasks = self.rng, []
        for key in keys * 2:
            ops = rng.choices(["load", "load", "get", "set", "delete"], k=6)
            turns = [rng.randrange(4) for _ in ops]
            tasks.append(task := asyncio.create_task(self.work(key, ops, turns)))
            if rng.random() < 0.5:
                self.store.plans[task] = [rng.randint(1, 8), rng.randrange(6)]
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, asyncio.CancelledError):
                self.cancelled += 1
            elif isinstance(outcome, BaseException):
                self.errors.append(outcome)
        await asyncio.gather(*self.store.cancellers)
        self.store.plans.clear()
        self.store.cancellers.clear()

    async def run(self) -> None:
        for start in range(0, len(self.keys), WAVE // 2):
            await self.wave(self.keys[start : start + WAVE // 2])


async def lease_ttls(backend: AsyncRedisBackend, bkeys: Iterable[str]) -> list[int]:
    """The PTTL in ms (-1: no expiry) of each of ``bkeys`` that holds a lease marker,
    read with its value in one transaction."""
    ttls = []
    for bkey in bkeys:
        name = encode_key(bkey)
        async with backend.client.pipeline(transaction=True) as pipe:
            pipe.get(name)
            pipe.pttl(name)
            raw, ttl = await pipe.execute()
        if raw is not None and is_marker(raw):
            ttls.append(ttl)
    return ttls


@pytest.mark.slow
@pytest.mark.parametrize("async_backend", [AREDIS, AMEMCACHED], indirect=True)
async def test_a_cancellation_storm_returns_no_wrong_value(
    async_backend: AsyncBackend, namespace: str
) -> None:
    store = CancelsTasks(async_backend)
    acache = AsyncCache(store, namespace=namespace, lease_ttl=STORM_LEASE_TTL, lease_poll=0.01)
    storm = Storm(store, acache, [f"k{i}" for i in range(STORM_KEYS)])
    await storm.run()
    print(f"\n{storm.cancelled} of {2 * STORM_KEYS} tasks cancelled; {acache.stats()}")
    assert storm.errors == []
    assert storm.wrong == []
    assert 0 < storm.cancelled < 2 * STORM_KEYS
    # At quiescence, every key holds its own value or nothing, for this cache and for
    # another one on the same server (another process).
    other = AsyncCache(async_backend, namespace=namespace)
    for key in storm.keys:
        assert await acache.get(key) in (MISSING, storm_value(key))
        assert await other.get(key) in (MISSING, storm_value(key))
    if isinstance(async_backend, AsyncRedisBackend):  # every lease expires in time
        left = await lease_ttls(async_backend, map(acache.backend_key, storm.keys))
        ttls = storm.lease_ttls + left
        print(f"leases seen: {len(ttls)} ({len(left)} left), PTTL {min(ttls)}..{max(ttls)} ms")
        assert ttls and [ttl for ttl in ttls if ttl == -1 or ttl > STORM_LEASE_TTL * 1000] == []


@pytest.mark.redis
async def test_more_tasks_than_pooled_connections_do_not_look_like_a_failing_server(
    redis_server: str, namespace: str
) -> None:
    """redis.asyncio's default ConnectionPool (redis-py 8.1) opens at most 100
    connections and refuses the next call at once with ``MaxConnectionsError``, which
    the cache would take for a failing server (reads falling through, invalidations
    journaled, the breaker opening) under an ordinary load of 200 tasks; ``from_url``
    uses a pool that makes such calls wait for a connection instead."""
    backend = AsyncRedisBackend.from_url(redis_server, timeout=SERVER_TIMEOUT)
    acache = AsyncCache(backend, namespace=namespace)
    try:
        assert await asyncio.gather(*(acache.get(f"k{i}") for i in range(200))) == [MISSING] * 200
    finally:
        await backend.aclose()
    assert (acache.stats().errors, acache.stats().breaker_opened) == (0, 0)


@pytest.mark.redis
@pytest.mark.xfail(
    sys.version_info < (3, 12),
    strict=True,
    reason="BUG: on Python 3.11, redis.asyncio swallows a cancel that lands as it sends",
)
async def test_a_cancelled_call_on_redis_is_cancelled(redis_server: str, namespace: str) -> None:
    """BUG (AsyncRedisBackend on Python 3.11): redis-py (8.1) sends each command under
    ``asyncio.wait_for``, which on 3.11 returns the result and drops a cancellation
    that arrives as the send completes (CPython gh-86296, fixed in 3.12). The task goes
    on as if never cancelled: ``asyncio.timeout``, ``TaskGroup`` and shutdown lose it.
    In the storm above most cancels of Redis calls are lost this way."""
    backend = AsyncRedisBackend.from_url(redis_server, timeout=SERVER_TIMEOUT)
    acache = AsyncCache(backend, namespace=namespace)
    outcomes = []
    try:
        for turns in range(6):  # cancel 0 to 5 turns of the loop into the call
            await acache.get("warm")  # an idle connection in the pool
            task = asyncio.create_task(acache.get("k"))
            for _ in range(turns):
                await asyncio.sleep(0)
            cancelled = task.cancel()
            outcome = await asyncio.gather(task, return_exceptions=True)
            outcomes.append((turns, cancelled, type(outcome[0]).__name__))
    finally:
        await backend.aclose()
    assert [o for o in outcomes if o[1] and o[2] != "CancelledError"] == []


# -- a private Redis hung or killed under load ------------------------------------------

TIMEOUT = 0.2  # the backend's socket budget
ROWS, WORKERS, WRITE_SHARE = 100, 48, 0.1
WARM, OUTAGE, AFTER = 1.0, 1.5, 1.5  # seconds of load before, during and after the fault


class Db:
    """The system of record: a version per row, read a loop turn before it is returned
    (so a write can land while a load is in flight)."""

    def __init__(self) -> None:
        self.versions = dict.fromkeys(range(ROWS), 0)

    async def load(self, id_: int) -> dict[str, int]:
        row = {"id": id_, "version": self.versions[id_]}
        await asyncio.sleep(0.001)
        return row

    def update(self, id_: int) -> int:
        self.versions[id_] += 1
        return self.versions[id_]


@dataclass
class Load:
    """Workers reading (get_or_load) and writing (update, then delete) random rows. They
    write until the fault is healed and read on after it: the last write to most rows
    falls in the outage, so each of those rows is stale unless its invalidation, lost
    with the server, is replayed."""

    acache: AsyncCache
    db: Db = field(default_factory=Db)
    writing: bool = True
    errors: list[str] = field(default_factory=list)
    reads: int = 0
    writes: int = 0
    # Reads older than a write that had completed when they started (stale).
    late: int = 0
    floor: dict[int, int] = field(default_factory=lambda: dict.fromkeys(range(ROWS), 0))

    def key(self, id_: int) -> str:
        return f"row:{id_}"

    async def read(self, id_: int) -> dict[str, int]:
        loader = functools.partial(self.db.load, id_)
        row: dict[str, int] = await self.acache.get_or_load(self.key(id_), loader)
        return row

    async def worker(self, seed: int, stop: asyncio.Event) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            id_ = rng.randrange(ROWS)
            try:
                if self.writing and rng.random() < WRITE_SHARE:
                    version = self.db.update(id_)
                    await self.acache.delete(self.key(id_))
                    self.floor[id_] = max(self.floor[id_], version)
                    self.writes += 1
                else:
                    floor = self.floor[id_]
                    self.late += (await self.read(id_))["version"] < floor
                    self.reads += 1
            except Exception as exc:  # the test counts what reaches callers
                self.errors.append(repr(exc))

    async def run(self, fault: Callable[[], None], heal: Callable[[], None]) -> None:
        for id_ in range(ROWS):
            await self.read(id_)
        stop = asyncio.Event()
        workers = [asyncio.create_task(self.worker(seed, stop)) for seed in range(WORKERS)]
        try:
            await asyncio.sleep(WARM)
            await asyncio.to_thread(fault)
            await asyncio.sleep(OUTAGE)
            await asyncio.to_thread(heal)
            self.writing = False
            await asyncio.sleep(AFTER)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), GENEROUS)


@pytest.fixture
async def faulty(redis_process: Server, namespace: str) -> AsyncIterator[AsyncCache]:  # noqa: F811
    """An AsyncCache on the private server, with leases short enough to wait out."""
    backend = AsyncRedisBackend.from_url(f"redis://{redis_process.address}/0", timeout=TIMEOUT)
    acache = AsyncCache(backend, namespace=namespace, lease_ttl=0.5, lease_poll=0.01)
    try:
        yield acache
        await acache.aclose()
    finally:
        await backend.aclose()


async def replayed(acache: AsyncCache) -> None:
    """Replay the journal until nothing is left (the server answers within its budget)."""
    deadline = time.monotonic() + GENEROUS
    while not await acache.replay_invalidations():
        assert time.monotonic() < deadline, "the journal was never replayed"
        await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["hung", "killed"])
async def test_no_errors_and_no_stale_rows_when_redis_fails_under_load(
    faulty: AsyncCache,
    redis_process: Server,  # noqa: F811
    namespace: str,
    fault: str,
) -> None:
    load = Load(faulty)
    if fault == "hung":
        await load.run(redis_process.pause, redis_process.resume)  # SIGSTOP, SIGCONT
    else:
        await load.run(redis_process.kill, redis_process.start)  # SIGKILL, same port
    print(f"\n{load.reads} reads, {load.writes} writes, {load.late} late; {faulty.stats()}")
    assert load.errors == []
    assert load.reads > 0 and load.writes > 0
    assert faulty.stats().errors > 0  # the fault was felt
    assert load.late == 0
    await replayed(faulty)
    latest = [{"id": id_, "version": load.db.versions[id_]} for id_ in range(ROWS)]
    assert [await load.read(id_) for id_ in range(ROWS)] == latest
    # What the server holds, seen by this cache and by a cache of another process.
    backend = AsyncRedisBackend.from_url(f"redis://{redis_process.address}/0", timeout=1.0)
    try:
        other = AsyncCache(backend, namespace=namespace, breaker=None)
        for cache in (faulty, other):
            cached = [await cache.get(load.key(id_)) for id_ in range(ROWS)]
            assert [row for row in cached if row is not MISSING and row not in latest] == []
    finally:
        await backend.aclose()
