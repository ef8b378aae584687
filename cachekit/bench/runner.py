"""Replaying the trace: uncached, and through cachekit with each strategy, then checking
every cached entry against the database.

Workers are threads, each with its own database connection, taking every
``workers``-th request of the trace, so together they replay it roughly in order. A
request is a cache miss exactly when it sent a statement to the database, which each
worker sees on its own connection's counter: that counts what the database was spared,
whatever the cache's own counters say (a read that waited for another caller's lease
was answered by the cache, not the database).
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from cachekit.backends.memory import MemoryBackend
from cachekit.bench.config import BenchError, Strategy
from cachekit.bench.database import Database, Product
from cachekit.bench.workload import Trace
from cachekit.cache import Cache
from cachekit.stats import CacheStats

__all__ = ["Replay", "Verdict", "key_of", "operations", "replay", "uncached_operations", "verify"]

Read = Callable[[int], object]
Write = Callable[[int, int], None]  # (product id, request index)
_PROGRESS_EVERY = 256  # requests between progress updates (and stop checks)
_VERIFY_CHUNK = 1000


def key_of(product_id: int) -> str:
    """The logical cache key of a product, the same for every strategy (views build
    ``prefix + ":" + id``)."""
    return f"product:{product_id}"


Kind = Literal["all", "hit", "miss", "write"]


@dataclass
class Replay:
    """What one replay of the trace measured; latencies in seconds, each list sorted."""

    hits: list[float] = field(default_factory=list, repr=False)  # reads the cache answered
    misses: list[float] = field(default_factory=list, repr=False)  # reads that queried the DB
    writes: list[float] = field(default_factory=list, repr=False)
    queries: int = 0  # statements sent, reads and writes
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)  # every request

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def reads(self) -> int:
        return len(self.hits) + len(self.misses)

    @property
    def hit_ratio(self) -> float:
        """Reads answered without the database, over reads."""
        return len(self.hits) / self.reads if self.reads else 0.0

    @property
    def throughput(self) -> float:
        """Requests per second, all workers together."""
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float, kind: Kind = "all") -> float:
        """The latency below which ``q`` of the requests (of one kind) finished, in ms
        (nearest rank); 0.0 when there were none."""
        values = {"all": self.latencies, "hit": self.hits, "miss": self.misses}.get(
            kind, self.writes
        )
        if not values:
            return 0.0
        rank = min(len(values), max(1, math.ceil(q * len(values))))
        return values[rank - 1] * 1000


@dataclass(frozen=True)
class Verdict:
    """The cache after a run, next to the database."""

    checked: int  # entries found in the cache and compared
    stale: int  # entries that differ from the row as the database holds it now
    stats: CacheStats  # the cache's own counters for the replay
    evictions: int | None  # None for servers, whose evictions are not ours to count


def uncached_operations(db: Database, trace: Trace) -> tuple[Read, Write]:
    """Reads and writes straight to the database: the baseline."""

    def write(product_id: int, index: int) -> None:
        db.save_product(product_id, trace.new_values(index))

    return db.load_product, write


def operations(strategy: Strategy, cache: Cache, db: Database, trace: Trace) -> tuple[Read, Write]:
    """The read and write of one strategy, as an application would write them."""
    if strategy == "write-through":

        def save(product_id: int, values: Product | None) -> None:
            assert values is not None  # noqa: S101 - the bench only puts values
            db.save_product(product_id, values)

        view = cache.write_through(
            "product", load=db.load_product, save=save, remove=db.remove_product
        )

        def put(product_id: int, index: int) -> None:
            view.put(product_id, trace.new_values(index))  # save, invalidate, reload

        return view.get, put
    if strategy == "read-through":
        rview = cache.read_through("product", load=db.load_product)
        invalidate: Callable[[int], None] = rview.invalidate
        read: Read = rview.get
    else:

        def read(product_id: int) -> object:
            return cache.get_or_load(
                key_of(product_id), functools.partial(db.load_product, product_id)
            )

        def invalidate(product_id: int) -> None:
            cache.delete(key_of(product_id))

    def write(product_id: int, index: int) -> None:
        db.save_product(product_id, trace.new_values(index))  # commit first...
        invalidate(product_id)  # ...then invalidate, as the README says

    return read, write


def replay(
    trace: Trace,
    db: Database,
    ops: tuple[Read, Write],
    *,
    workers: int,
    progress: Callable[[int], None],
) -> Replay:
    """Replay ``trace`` with ``workers`` threads; ``progress(done)`` is called as it goes.

    Raises:
        BenchError: a worker failed (the database went away, say); the others stop.
    """
    state = _Shared(workers)
    done, tallies, stop = state.done, state.tallies, state.stop
    threads = [
        threading.Thread(
            target=_work,
            args=(trace, db, ops),
            kwargs={"indices": range(w, len(trace), workers), "slot": w, "state": state},
            name=f"cachekit-bench-{w}",
            daemon=True,
        )
        for w in range(workers)
    ]
    start = time.perf_counter()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)
                progress(sum(done))
    except BaseException:  # Ctrl-C: stop the workers before the tables are dropped
        stop.set()
        for thread in threads:
            thread.join()
        raise
    seconds = time.perf_counter() - start
    progress(len(trace))
    return _merge(tallies, seconds)


class _Shared:
    """What workers and the main thread share; each worker writes only its own slot."""

    def __init__(self, workers: int) -> None:
        self.done = [0] * workers  # requests replayed, for the progress bar
        self.tallies: list[Replay | BaseException] = [Replay() for _ in range(workers)]
        self.stop = threading.Event()  # set when a worker failed or the user interrupted


def _work(
    trace: Trace,
    db: Database,
    ops: tuple[Read, Write],
    *,
    indices: range,
    slot: int,
    state: _Shared,
) -> None:
    """One worker's share of the trace; timing wraps exactly the application's call."""
    done, tallies, stop = state.done, state.tallies, state.stop
    read, write = ops
    ids, writes, clock = trace.ids, trace.writes, time.perf_counter
    tally = Replay()
    hits, misses, written = tally.hits, tally.misses, tally.writes
    try:
        with db.session() as session:
            for count, index in enumerate(indices, 1):
                product_id, before = ids[index], session.queries
                start = clock()
                if writes[index]:
                    write(product_id, index)
                    written.append(clock() - start)
                else:
                    read(product_id)
                    elapsed = clock() - start
                    (hits if session.queries == before else misses).append(elapsed)
                if count % _PROGRESS_EVERY == 0:
                    done[slot] = count
                    if stop.is_set():
                        return
            tally.queries = session.queries
        done[slot] = len(indices)
        tallies[slot] = tally
    except BaseException as exc:  # re-raised in the main thread by _merge
        tallies[slot] = exc
        stop.set()


def _merge(tallies: list[Replay | BaseException], seconds: float) -> Replay:
    total = Replay(seconds=seconds)
    for tally in tallies:
        if isinstance(tally, BaseException):
            raise BenchError(f"a worker failed: {type(tally).__name__}: {tally}") from tally
        total.hits += tally.hits
        total.misses += tally.misses
        total.writes += tally.writes
        total.queries += tally.queries
    total.latencies = sorted(total.hits + total.misses + total.writes)
    for values in (total.hits, total.misses, total.writes):
        values.sort()
    return total


def verify(cache: Cache, db: Database, product_ids: Iterable[int]) -> Verdict:
    """Compare every entry the cache holds for ``product_ids`` with the database now.

    The counters are read first: the verification's own reads must not count.
    """
    stats = cache.stats()
    backend = cache.backend
    evictions = backend.evictions if isinstance(backend, MemoryBackend) else None
    ids = sorted(set(product_ids))
    checked = stale = 0
    for start in range(0, len(ids), _VERIFY_CHUNK):
        chunk = {key_of(i): i for i in ids[start : start + _VERIFY_CHUNK]}
        cached = cache.get_many(chunk)
        fresh = db.load_products(chunk[key] for key in cached)
        for key, value in cached.items():
            checked += 1
            stale += value != fresh.get(chunk[key])
    return Verdict(checked=checked, stale=stale, stats=stats, evictions=evictions)
