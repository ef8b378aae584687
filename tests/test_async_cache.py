"""AsyncCache natively: its API, single flight, a loop that never blocks, and races."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections import defaultdict
from typing import Any

import pytest

from cachekit import MISSING, AsyncCache, Cache, ConfigurationError, KeyEncodingError
from cachekit.backends.base import AsyncBackend
from cachekit.backends.counting import AsyncCountingBackend
from cachekit.backends.memcached import MemcachedBackend
from cachekit.backends.memory import MemoryBackend
from cachekit.backends.redis import AsyncRedisBackend, RedisBackend
from tests.async_support import (
    AREDIS,
    GENEROUS,
    PROCESSES,
    TASKS_PER_PROCESS,
    Gate,
    Ticker,
    forbidden_sleep,
    on_three,
    on_two,
    stampede_process,
    unexpected,
    until,
    worst_lag,
)
from tests.conftest import MEMCACHED_ADDRESS, REDIS_URL, SERVER_TIMEOUT
from tests.drivers import in_thread
from tests.test_views import Table
from tests.workloads import PROCESS_TIMEOUT, SPAWN, run_processes

# -- the API ---------------------------------------------------------------------------


def test_each_cache_refuses_the_other_kind_of_function() -> None:
    async def fetch() -> int:
        return 1

    def compute() -> int:
        return 1

    cache = Cache(MemoryBackend(), namespace="api")
    with pytest.raises(TypeError, match=r"fetch.*use cachekit\.AsyncCache"):
        cache.cached(fetch)
    with pytest.raises(TypeError, match=r"fetch.*use cachekit\.AsyncCache"):
        cache.cached(ttl=5)(fetch)
    with pytest.raises(TypeError, match="use AsyncCache"):
        cache.get_or_load("k", fetch)  # type: ignore[unused-coroutine]
    with pytest.raises(TypeError, match=r"compute.*use cachekit\.Cache for"):
        AsyncCache(MemoryBackend(), namespace="api").cached(compute)  # type: ignore[arg-type]


async def test_each_cache_refuses_the_other_kind_of_backend() -> None:
    # None of these connects before its first call: no server is needed.
    async_redis = AsyncRedisBackend.from_url(REDIS_URL)
    redis = RedisBackend.from_url(REDIS_URL)
    memcached = MemcachedBackend("{}:{}".format(*MEMCACHED_ADDRESS))
    try:
        with pytest.raises(ConfigurationError, match="use AsyncCache"):
            Cache(async_redis)  # type: ignore[arg-type]
        for blocking in (redis, memcached):
            with pytest.raises(ConfigurationError, match="blocking backend"):
                AsyncCache(blocking)
    finally:
        await async_redis.aclose()
        redis.close()
        memcached.close()


@on_three
async def test_the_decorator_keeps_the_function_and_awaits_its_controls(acache: AsyncCache) -> None:
    calls: list[int] = []

    async def user(user_id: int, *, full: bool = False) -> dict[str, int]:
        """Fetch a user."""
        calls.append(user_id)
        return {"id": user_id, "load": len(calls)}

    cached = acache.cached(ttl=60)(user)
    assert inspect.signature(cached) == inspect.signature(user)
    assert (cached.__name__, cached.__doc__) == ("user", "Fetch a user.")  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(cached)
    key = cached.key(7)
    assert isinstance(key, str) and key == cached.key(user_id=7, full=False)
    assert await acache.get(key) is MISSING
    assert await cached(7) == await cached(user_id=7) == {"id": 7, "load": 1}
    assert await acache.get(key) == {"id": 7, "load": 1}
    await cached.invalidate(7)
    assert await acache.get(key) is MISSING
    assert await cached(7) == {"id": 7, "load": 2}
    assert await cached.refresh(7) == {"id": 7, "load": 3} == await acache.get(key)
    assert calls == [7, 7, 7]


@on_three
async def test_methods_key_self_by_its_cache_key_and_bind_their_controls(
    acache: AsyncCache,
) -> None:
    class Repo:
        def __init__(self, name: str) -> None:
            self.name = name
            self.calls = 0

        def __cache_key__(self) -> str:
            return self.name

        @acache.cached()
        async def get(self, user_id: int) -> str:
            self.calls += 1
            return f"{self.name}:{user_id}"

    class Keyless:
        @acache.cached()
        async def get(self, user_id: int) -> int:
            return user_id

    repo = Repo("a")
    assert await repo.get(7) == await repo.get(user_id=7) == "a:7" and repo.calls == 1
    assert await Repo("b").get(7) == "b:7"  # its state is in the key, not its identity
    assert repo.get.key(7) != Repo("b").get.key(7) and repo.get.key(7) == Repo("a").get.key(7)
    await repo.get.invalidate(7)
    assert await acache.get(repo.get.key(7)) is MISSING
    assert await acache.get(Repo("b").get.key(7)) == "b:7"
    assert await repo.get(7) == "a:7" and repo.calls == 2
    assert await repo.get.refresh(7) == "a:7" and repo.calls == 3
    with pytest.raises(KeyEncodingError, match="__cache_key__"):
        await Keyless().get(1)


@on_three
async def test_views_with_async_loaders_and_savers(
    acache: AsyncCache, async_counted: AsyncCountingBackend
) -> None:
    table = Table()
    users = acache.write_through(
        "user",
        load=in_thread(table.load),
        load_many=in_thread(table.load_many),
        save=in_thread(table.save),
        remove=in_thread(table.remove),
    )
    wanted = {1: table.rows[1], 2: table.rows[2], 3: table.rows[3]}
    assert await users.get_many([1, 2, 3]) == wanted
    assert table.batches == [[1, 2, 3]] and table.single == []
    assert async_counted.calls == {"get_many": 1, "add_many": 1, "compare_and_set_many": 1}
    async_counted.calls.clear()
    assert await users.get_many([1, 2, 3]) == wanted  # hits: one read, nothing else
    assert async_counted.calls == {"get_many": 1} and table.batches == [[1, 2, 3]]
    await users.put(1, {"id": 1, "v": 1})
    assert table.log == ["save 1"] and await acache.get(users.key(1)) == {"id": 1, "v": 1}
    await users.delete(2)
    assert table.log == ["save 1", "remove 2"] and await acache.get(users.key(2)) is MISSING
    assert await users.get(2) is None and table.single == [1, 2]  # put reloads row 1


# -- single flight ----------------------------------------------------------------------

TASKS = 1000


@on_three
async def test_a_thousand_tasks_on_a_cold_key_make_one_load_and_one_lease(
    acache: AsyncCache, async_counted: AsyncCountingBackend
) -> None:
    loads = 0

    async def load() -> str:
        nonlocal loads
        loads += 1
        # Hold the miss path open until every other task is waiting on it.
        await until(lambda: acache.stats().lease_waits >= TASKS - 1, "every task to wait")
        return "value"

    values = await asyncio.gather(*(acache.get_or_load("hot", load) for _ in range(TASKS)))
    assert values == ["value"] * TASKS
    assert loads == 1
    assert async_counted.calls["add"] == 1
    assert acache.stats().lease_waits == TASKS - 1


@pytest.mark.slow
@pytest.mark.parametrize("async_backend", [AREDIS], indirect=True)
async def test_processes_stampeding_on_one_key_make_one_load(
    async_backend: AsyncRedisBackend, redis_server: str, namespace: str
) -> None:
    barrier = SPAWN.Barrier(PROCESSES)
    args = [(redis_server, namespace, barrier)] * PROCESSES
    outcomes = await asyncio.to_thread(
        run_processes, stampede_process, args, PROCESS_TIMEOUT, barrier
    )
    assert [error for outcome in outcomes for error in outcome.errors] == []
    values = [value for outcome in outcomes for value in outcome.values]
    assert values == ["loaded"] * (PROCESSES * TASKS_PER_PROCESS)
    assert int(await async_backend.client.get(f"{namespace}:loads") or 0) == 1


# -- the loop never blocks --------------------------------------------------------------


class Polls(AsyncCountingBackend):
    """Notes, for each task, the ticker's count at each of its reads. A task's first
    two reads (the lookup, then the first poll) may come in one turn of the loop; a
    later one that does is refused, so that a waiter that blocks fails fast."""

    def __init__(self, inner: AsyncBackend, ticker: Ticker) -> None:
        super().__init__(inner)
        self.ticker = ticker
        self.reads: dict[Any, list[int]] = defaultdict(list)

    def _call(self, name: str, *args: Any) -> Any:
        if name == "get":
            reads = self.reads[asyncio.current_task()]
            if len(reads) >= 2 and reads[-1] == self.ticker.ticks:
                raise AssertionError("a waiter polled twice in one turn of the loop")
            reads.append(self.ticker.ticks)
        return super()._call(name, *args)


@on_three
async def test_tasks_waiting_on_a_lease_never_block_the_loop(
    async_backend: AsyncBackend, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder, gate = AsyncCache(async_backend, namespace=namespace, lease_ttl=GENEROUS), Gate()
    holding = asyncio.create_task(holder.get_or_load("k", gate.loader("held")))
    await gate.entered.wait()  # another cache (another process) holds the lease
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", forbidden_sleep(slept))
    ticker = Ticker()
    polls = Polls(async_backend, ticker)
    waiters = AsyncCache(polls, namespace=namespace, lease_ttl=GENEROUS, lease_poll=0.02)
    ticking = asyncio.create_task(ticker.run())
    try:
        waiting = [asyncio.create_task(waiters.get_or_load("k", unexpected)) for _ in range(100)]

        def polled_or_failed() -> bool:
            most = max(map(len, polls.reads.values()), default=0)
            return most >= 6 or all(task.done() for task in waiting)

        await until(polled_or_failed, "a few polls")
        gate.opened.set()
        assert await asyncio.gather(*waiting) == ["held"] * 100
    finally:
        ticking.cancel()
        await asyncio.gather(ticking, return_exceptions=True)
    assert await holding == "held"
    assert slept == []
    poller = max(polls.reads.values(), key=len)  # the one task polling for the others
    assert ticker.ticks > 0 and all(b > a for a, b in itertools.pairwise(poller[1:]))
    assert waiters.stats().loads == 0


@pytest.mark.slow
@on_two
@pytest.mark.parametrize("keys", [1, 100])
async def test_loop_lag_with_a_hundred_waiters_on_a_one_second_lease(
    async_backend: AsyncBackend, namespace: str, keys: int
) -> None:
    """Printed, not asserted (run with ``-s``): the worst lateness of the loop. On Redis
    the holders (another process) have a client of their own: with the waiters' 100
    calls at once, one pool would exceed its 100 connections (see test_async_faults)."""
    own = isinstance(async_backend, AsyncRedisBackend)
    store = AsyncRedisBackend.from_url(REDIS_URL, timeout=SERVER_TIMEOUT) if own else None
    holder = AsyncCache(store or async_backend, namespace=namespace, lease_ttl=GENEROUS)
    waiters = AsyncCache(async_backend, namespace=namespace, lease_ttl=GENEROUS)
    started = 0

    async def hold() -> str:
        nonlocal started
        started += 1
        await asyncio.sleep(1.0)
        return "held"

    _, idle = await worst_lag(asyncio.sleep(0.5))
    holding = [asyncio.create_task(holder.get_or_load(f"k{i}", hold)) for i in range(keys)]
    try:
        await until(lambda: started == keys, "the leases to be taken")
        calls = (waiters.get_or_load(f"k{i % keys}", unexpected) for i in range(100))
        values, lag = await worst_lag(asyncio.gather(*calls))
        assert values == ["held"] * 100 and await asyncio.gather(*holding) == ["held"] * keys
    finally:
        if store is not None:
            await store.aclose()
    print(f"\nloop lag, {type(async_backend).__name__}, 100 waiters on {keys} lease(s): worst"
          f" {lag * 1e3:.2f} ms (idle loop: {idle * 1e3:.2f} ms)")  # fmt: skip


# -- races ------------------------------------------------------------------------------


@on_two
@pytest.mark.parametrize("invalidate", ["delete", "invalidate_tags"])
async def test_a_fill_that_raced_an_invalidation_is_rejected(
    acache: AsyncCache, invalidate: str
) -> None:
    db, gate = {"k": 0}, Gate()

    async def load() -> int:
        version = db["k"]
        await gate.wait()
        return version

    async def fresh() -> int:
        return db["k"]

    reading = asyncio.create_task(acache.get_or_load("k", load, tags=["t"]))
    await gate.entered.wait()
    db["k"] = 1  # committed, then invalidated, while the reader's load is in flight
    if invalidate == "delete":
        await acache.delete("k")
    else:
        await acache.invalidate_tags(["t"])
    gate.opened.set()
    assert await reading == 0  # it started before the write: the old version is right
    assert acache.stats().fills_rejected == 1
    assert await acache.get("k") is MISSING
    assert await acache.get_or_load("k", fresh, tags=["t"]) == 1
    assert await acache.get("k") == 1


@on_two
async def test_two_racing_write_throughs_leave_the_records_value(acache: AsyncCache) -> None:
    record, gate = {1: "old"}, Gate()

    async def load(id_: int) -> str:
        value = record[id_]
        if value == "A":  # writer A's reload: it read A, and now B writes
            await gate.wait()
        return value

    async def save(id_: int, value: str) -> None:
        record[id_] = value

    async def remove(id_: int) -> None:
        del record[id_]

    view = acache.write_through("row", load=load, save=save, remove=remove)
    assert await view.get(1) == "old"
    writing_a = asyncio.create_task(view.put(1, "A"))
    await gate.entered.wait()
    waits = acache.stats().lease_waits
    writing_b = asyncio.create_task(view.put(1, "B"))
    # B has saved and invalidated, and waits for A's load (or, with no load to share,
    # has reloaded on its own).
    await until(lambda: writing_b.done() or acache.stats().lease_waits > waits, "B to reload")
    gate.opened.set()
    await asyncio.gather(writing_a, writing_b)
    assert record[1] == "B"
    assert await acache.get(view.key(1)) in (MISSING, "B")
    assert await view.get(1) == "B" == await acache.get(view.key(1))


@on_two
async def test_a_read_that_starts_after_an_invalidation_gets_the_new_version(
    acache: AsyncCache,
) -> None:
    """A task that misses after a write and its invalidation completed must not take
    the value of a miss path that loaded before them (its fill was rejected): as with
    ``Cache`` (and another process), it loads the new version."""
    db, gate = {"k": 0}, Gate()

    async def load() -> int:
        version = db["k"]
        await gate.wait()
        return version

    async def fresh() -> int:
        return db["k"]

    reading = asyncio.create_task(acache.get_or_load("k", load))
    await gate.entered.wait()
    db["k"] = 1
    await acache.delete("k")  # the write is complete...
    late = asyncio.create_task(acache.get_or_load("k", fresh))  # ...before this read starts
    await until(lambda: late.done() or acache.stats().lease_waits == 1, "the late read")
    gate.opened.set()
    assert await reading == 0
    assert acache.stats().fills_rejected == 1
    assert await late == 1
