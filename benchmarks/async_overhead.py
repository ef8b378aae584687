"""What an AsyncCache hit costs next to its floor, the raw async driver and the peers.

Each section times one kind of awaited call, every case interleaved in one process
(case A, case B, ..., then again), and prints nanoseconds per call (the median of the
runs) and the ratio to the section's baseline:

- in-process hit: the floor is a hand-written coroutine doing what a hit must do (a
  dictionary lookup and an expiry check); against it, ``@acache.cached`` and
  ``acache.get`` on ``MemoryBackend``, and aiocache's and cashews' in-memory decorators
  when installed. A bare ``await`` of a coroutine that returns at once is shown too.
- Redis hit: ``redis.asyncio`` ``GET`` plus the JSON decode, against ``acache.get`` and a
  decorated function on ``AsyncRedisBackend``.
- loop lag: 100 tasks wait on a 1 s lease held by someone else while a ticker task
  measures how late it wakes up; the worst lag is printed (a waiter that blocked the
  loop would show here as a lag near the lease's length).

Run: python benchmarks/async_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from cachekit import AsyncCache
from cachekit.backends.memory import MemoryBackend
from cachekit.markers import new_lease

REDIS = ("127.0.0.1", 6379)
VALUE = {"id": 7, "name": "Product 7", "price_cents": 1_259, "stock": 12, "tags": ["a", "b"]}
Call = Callable[[int], Awaitable[Any]]


async def per_call(fn: Call, number: int) -> float:
    """Nanoseconds per ``await fn(7)`` over ``number`` calls."""
    start = time.perf_counter_ns()
    for _ in range(number):
        await fn(7)
    return (time.perf_counter_ns() - start) / number


async def section(
    title: str, cases: dict[str, Call], baseline: str, runs: int, number: int
) -> None:
    """Time the cases interleaved, ``runs`` times; print medians and ratios."""
    for fn in cases.values():  # warm up, and check every case hits
        assert await fn(7) == VALUE, title
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, fn in cases.items():
            timings[name].append(await per_call(fn, number))
    base = statistics.median(timings[baseline])
    print(f"\n{title} (median of {runs} interleaved runs of {number:,} calls)")
    for name, runs_ns in timings.items():
        median = statistics.median(runs_ns)
        print(f"  {name:<48} {median:>9,.0f} ns  {median / base:>6.2f}x")


async def in_process(runs: int, number: int) -> None:
    data: dict[int, tuple[float, dict[str, Any]]] = {7: (time.monotonic() + 3600, VALUE)}

    async def floor(product_id: int) -> Any:  # a hit's least work: lookup, expiry check
        entry = data.get(product_id)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        return None

    async def bare(product_id: int) -> Any:
        return VALUE

    cache = AsyncCache(MemoryBackend(maxsize=10_000), namespace="bench-async")

    @cache.cached
    async def decorated(product_id: int) -> Any:
        return VALUE

    @cache.cached(key="product:{product_id}")
    async def templated(product_id: int) -> Any:
        return VALUE

    await cache.set("7", VALUE)

    async def get(product_id: int) -> Any:
        return await cache.get("7")

    cases: dict[str, Call] = {
        "floor: coroutine, dict lookup + expiry check": floor,
        "bare await of a coroutine": bare,
        "@acache.cached (default key)": decorated,
        "@acache.cached(key='product:{product_id}')": templated,
        "await acache.get(key)": get,
    }
    cases.update(await peers())
    await section(
        "in-process hit", cases, "floor: coroutine, dict lookup + expiry check", runs, number
    )


async def peers() -> dict[str, Call]:
    """aiocache's and cashews' in-memory decorators, if they are installed."""
    found: dict[str, Call] = {}
    try:
        from aiocache import cached as aiocache_cached
    except ImportError:
        print("aiocache not installed: its case is left out")
    else:

        @aiocache_cached(ttl=300)
        async def via_aiocache(product_id: int) -> Any:
            return VALUE

        found["aiocache @cached (memory)"] = via_aiocache
    try:
        from cashews import Cache as CashewsCache
    except ImportError:
        print("cashews not installed: its case is left out")
    else:
        cashews = CashewsCache()
        cashews.setup("mem://")

        @cashews(ttl=300)
        async def via_cashews(product_id: int) -> Any:
            return VALUE

        found["cashews @cache (mem://)"] = via_cashews
    return found


def reachable(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1.0).close()
    except OSError:
        return False
    return True


async def redis_hit(runs: int, number: int) -> None:
    if not reachable(REDIS):
        print(f"\nRedis hit: skipped, {REDIS[0]}:{REDIS[1]} not reachable")
        return
    import redis.asyncio

    from cachekit.backends.redis import AsyncRedisBackend

    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    backend = AsyncRedisBackend.from_url(f"redis://{REDIS[0]}:{REDIS[1]}/0", timeout=2.0)
    cache = AsyncCache(backend, namespace=namespace)
    await cache.set("7", VALUE, ttl=600)
    raw = redis.asyncio.Redis(host=REDIS[0], port=REDIS[1], decode_responses=False)
    bkey = cache.backend_key("7")

    async def raw_get(product_id: int) -> Any:
        return json.loads(await raw.get(bkey))

    async def get(product_id: int) -> Any:
        return await cache.get("7")

    @cache.cached(key="{product_id}")
    async def decorated(product_id: int) -> Any:
        return VALUE

    cases: dict[str, Call] = {
        "redis.asyncio GET + json.loads": raw_get,
        "await acache.get(key)": get,
        "@acache.cached(key='{product_id}')": decorated,
    }
    try:
        await section("Redis hit", cases, "redis.asyncio GET + json.loads", runs, number)
    finally:
        await raw.delete(bkey)
        await raw.aclose()
        await backend.aclose()


async def loop_lag(waiters: int = 100, lease: float = 1.0) -> None:
    """The worst event-loop lag while ``waiters`` tasks wait on a held lease."""
    memory = MemoryBackend()
    cache = AsyncCache(memory, namespace="lag", lease_ttl=lease)
    memory.add(cache.backend_key("k"), new_lease(True), lease)  # held by nobody here
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - start - 0.005)

    async def loader() -> str:
        return "v"

    tick = asyncio.create_task(ticker())
    started = time.perf_counter()
    results = await asyncio.gather(*(cache.get_or_load("k", loader) for _ in range(waiters)))
    done.set()
    await tick
    print(
        f"\nloop lag: {waiters} tasks waited {time.perf_counter() - started:.2f} s on a "
        f"{lease:.0f} s lease; worst ticker lag {max(lags) * 1000:.1f} ms, median "
        f"{statistics.median(lags) * 1000:.2f} ms over {len(lags)} ticks; "
        f"results {set(results)}; {cache.stats().lease_waits} lease waits"
    )


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few, short runs (a smoke test)")
    args = parser.parse_args(argv)
    runs, number = (2, 200) if args.quick else (9, 20_000)
    print(f"Python {sys.version.split()[0]}")
    await in_process(runs, number)
    await redis_hit(runs, max(50, number // 20))
    await loop_lag()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
