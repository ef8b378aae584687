"""cachekit next to dogpile.cache and cachetools on one Zipf trace and one database loader.

Every contender caches the same function, ``product(product_id)``, which loads a product
and its latest reviews from SQLite (the loader of ``cachekit bench``), and replays the
same seeded trace of reads on one thread. Reported per contender, and as ratios to
cachekit on the same backend:

- hit ratio and loader calls: reads the cache answered, and the loads it needed;
- overhead per request: the replay's time minus the time spent inside the loader,
  over the requests (what the caching layer itself costs: lookups, fills, encoding);
- hit cost: the time of one call that hits, on the hottest id (the best of five runs).

In process every contender is an LRU of the same size (cachetools' ``LRUCache`` is
also dogpile's ``cache_dict``), so hit ratios must agree; on Redis nothing is bounded
and only first reads miss. Redis rows are skipped, with a note, when it does not answer.

Run: python benchmarks/peers.py [--rows N] [--requests N] [--cache-size 10%]
                                [--redis URL] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import cachetools
import redis
from dogpile.cache import make_region

from cachekit import Cache
from cachekit.backends.memory import MemoryBackend
from cachekit.backends.redis import RedisBackend
from cachekit.bench.config import parse_cache_sizes
from cachekit.bench.database import Database, Product, scratch_file
from cachekit.bench.workload import Trace, make_trace

HIT_CALLS = 4_000
HIT_REPEATS = 5  # the minimum of several runs, as timeit advises: noise only adds time
TTL = 3600


class Loader:
    """The database loader, counting its calls and the time spent in them."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, product_id: int) -> Product | None:
        start = time.perf_counter()
        product = self.db.load_product(product_id)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return product


@dataclass
class Outcome:
    library: str
    backend: str
    reads: int
    loader_calls: int
    overhead_us: float  # per request, loader time excluded
    hit_us: float

    @property
    def hit_ratio(self) -> float:
        return 1 - self.loader_calls / self.reads


# Each contender: given the loader and a size, a cached ``product`` and its clean-up.
Build = Callable[[Loader, int, str], tuple[Callable[[int], Any], Callable[[], None]]]


def cachekit_memory(loader: Loader, size: int, redis_url: str) -> tuple[Any, Callable[[], None]]:
    cache = Cache(MemoryBackend(maxsize=size), namespace="peers", ttl=None)

    @cache.cached(key="product:{product_id}")
    def product(product_id: int) -> Product | None:
        return loader(product_id)

    return product, cache.backend.close


def cachetools_lru(loader: Loader, size: int, redis_url: str) -> tuple[Any, Callable[[], None]]:
    @cachetools.cached(cachetools.LRUCache(maxsize=size))
    def product(product_id: int) -> Product | None:
        return loader(product_id)

    return product, lambda: None


def dogpile_memory(loader: Loader, size: int, redis_url: str) -> tuple[Any, Callable[[], None]]:
    region = make_region().configure(
        "dogpile.cache.memory",
        expiration_time=TTL,
        arguments={"cache_dict": cachetools.LRUCache(maxsize=size)},
    )

    @region.cache_on_arguments()
    def product(product_id: int) -> Product | None:
        return loader(product_id)

    return product, lambda: None


def cachekit_redis(loader: Loader, size: int, redis_url: str) -> tuple[Any, Callable[[], None]]:
    namespace = f"peers-{uuid.uuid4().hex[:8]}"
    cache = Cache(RedisBackend.from_url(redis_url, timeout=1.0), namespace=namespace, ttl=TTL)

    @cache.cached(key="product:{product_id}")
    def product(product_id: int) -> Product | None:
        return loader(product_id)

    def clean_up() -> None:
        forget(redis_url, namespace + ":")
        cache.backend.close()

    return product, clean_up


def dogpile_redis(loader: Loader, size: int, redis_url: str) -> tuple[Any, Callable[[], None]]:
    prefix = f"peers-{uuid.uuid4().hex[:8]}:"
    region = make_region(key_mangler=lambda key: prefix + key).configure(
        "dogpile.cache.redis",
        expiration_time=TTL,
        arguments={"url": redis_url, "redis_expiration_time": TTL + 60, "socket_timeout": 1.0},
    )

    @region.cache_on_arguments()
    def product(product_id: int) -> Product | None:
        return loader(product_id)

    return product, lambda: forget(redis_url, prefix)


CONTENDERS: list[tuple[str, str, Build]] = [
    ("cachekit", "in-process", cachekit_memory),
    ("cachetools.cached", "in-process", cachetools_lru),
    ("dogpile.cache", "in-process", dogpile_memory),
    ("cachekit", "redis", cachekit_redis),
    ("dogpile.cache", "redis", dogpile_redis),
]


def forget(redis_url: str, prefix: str) -> None:
    """Delete one contender's keys from the shared server."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()


def redis_problem(redis_url: str) -> str:
    """An empty string if Redis answers, else why not."""
    client = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return f"{redis_url} does not answer ({exc})"
    finally:
        client.close()
    return ""


def race(
    library: str, backend: str, build: Build, *, trace: Trace, db: Database, args: Any
) -> Outcome:
    """Replay the trace through one contender, then time hits on the hottest id."""
    loader = Loader(db)
    product, clean_up = build(loader, args.size, args.redis)
    try:
        start = time.perf_counter()
        for product_id in trace.ids:
            product(product_id)
        total = time.perf_counter() - start
        hottest = _hottest(trace)
        product(hottest)
        hit = min(time_hits(product, hottest) for _ in range(HIT_REPEATS))
    finally:
        clean_up()
    overhead = (total - loader.seconds) / len(trace)
    return Outcome(library, backend, len(trace), loader.calls, overhead * 1e6, hit * 1e6)


def time_hits(product: Callable[[int], Any], product_id: int) -> float:
    """Seconds per call of ``product(product_id)``, which hits."""
    start = time.perf_counter()
    for _ in range(HIT_CALLS):
        product(product_id)
    return (time.perf_counter() - start) / HIT_CALLS


def _hottest(trace: Trace) -> int:
    counts: dict[int, int] = {}
    for product_id in trace.ids:
        counts[product_id] = counts.get(product_id, 0) + 1
    return max(counts, key=counts.__getitem__)


@contextmanager
def database(rows: int, seed: int) -> Iterator[Database]:
    """The bench's products and reviews in a temporary SQLite file."""
    scratch = tempfile.mkdtemp(prefix="cachekit-peers-")
    db = Database(scratch_file(scratch), prefix="peers_")
    try:
        db.create(rows, seed=seed, advance=lambda done: None)
        with db.session():
            yield db
    finally:
        db.drop()
        shutil.rmtree(scratch, ignore_errors=True)


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def table(outcomes: list[Outcome]) -> str:
    """Markdown, with ratios to cachekit on the same backend."""
    lines = [
        "| library | backend | hit ratio | loader calls | calls vs cachekit "
        "| overhead per request | vs cachekit | one hit | vs cachekit |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = {o.backend: o for o in outcomes if o.library == "cachekit"}
    for o in outcomes:
        b = base.get(o.backend, o)
        lines.append(
            f"| {o.library} | {o.backend} | {o.hit_ratio:.1%} | {o.loader_calls:,} "
            f"| {ratio(o.loader_calls, b.loader_calls)} | {o.overhead_us:.1f} µs "
            f"| {ratio(o.overhead_us, b.overhead_us)} | {o.hit_us:.2f} µs "
            f"| {ratio(o.hit_us, b.hit_us)} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--zipf", type=float, default=0.99)
    parser.add_argument("--cache-size", default="10%", help="in-process LRU size, % of rows")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    (fraction,) = parse_cache_sizes(args.cache_size)
    args.size = max(1, round(fraction * args.rows))
    return args


def main() -> int:
    args = parse_args()
    trace = make_trace(
        rows=args.rows, requests=args.requests, zipf=args.zipf, write_ratio=0.0, seed=args.seed
    )
    skipped = redis_problem(args.redis)
    print(
        f"Workload: {args.requests:,} reads, Zipf {args.zipf:g} over {args.rows:,} products "
        f"(SQLite loader: product + latest reviews), seed {args.seed}; in-process LRU of "
        f"{args.size:,} entries ({args.cache_size}); Redis unbounded; one thread. "
        f"Python {platform.python_version()}.\n"
    )
    outcomes = []
    with database(args.rows, args.seed) as db:
        for library, backend, build in CONTENDERS:
            if backend == "redis" and skipped:
                continue
            print(f"running {library} on {backend}...", file=sys.stderr, flush=True)
            outcomes.append(race(library, backend, build, trace=trace, db=db, args=args))
    print(table(outcomes))
    if skipped:
        print(f"\nredis rows skipped: {skipped}")
    in_process = {o.loader_calls for o in outcomes if o.backend == "in-process"}
    print(f"\nin-process LRUs agree on loader calls: {'yes' if len(in_process) == 1 else 'NO'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"args": vars(args), "results": [asdict(o) for o in outcomes]}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
