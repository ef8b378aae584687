"""What a cachekit hit costs next to the libraries and raw drivers it competes with.

Each section times one kind of call, all cases side by side in one process, and prints
nanoseconds per call (the minimum over several repeats, as ``timeit`` advises) and the
ratio to the section's baseline. Redis and memcached sections run against 127.0.0.1 and
are skipped, with a note, when the server does not answer.

The miss sections time ``get_or_load`` on a key never used before, under a lease (the
default) and without one (``lease_ttl=None``: get, load, set), and count what each
sends: backend calls through a counting proxy, and the commands the driver writes to
the server's socket. The goal is that a lease costs at most one extra round trip on a
miss and none on a hit.

Run: python benchmarks/overhead.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import socket
import statistics
import sys
import threading
import timeit
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import cachetools
import orjson
from dogpile.cache import make_region

from cachekit import Cache
from cachekit.backends.base import Backend
from cachekit.backends.counting import CountingBackend
from cachekit.backends.memory import MemoryBackend

REDIS = ("127.0.0.1", 6379)
MEMCACHED = ("127.0.0.1", 11211)
BATCH = 100
HIT_TITLE = "{} hit: get one key"
BATCH_TITLE = f"{{}}: get_many({BATCH}) vs {BATCH} single gets"
BATCH_KEYS = [f"item:{i}" for i in range(BATCH)]
MISS_TITLE = "{} miss: get_or_load on a new key, lease vs naive"
NAIVE_MISS = "naive miss: get_or_load, lease_ttl=None"
LEASE_MISS = "lease miss: get_or_load, lease_ttl=5"
# Keys the miss cases write live this long, in case a run dies before deleting them.
MISS_TTL = 60
CLEANUP_CHUNK = 1_000
TRIP_CALLS = 20  # calls per operation when counting round trips
# A typical cached row; every case reads this value back.
VALUE = {"id": 7, "name": "Product 7", "price_cents": 1_259, "stock": 12, "tags": ["a", "b"]}


@dataclass
class Case:
    name: str
    fn: Callable[[Any], Any]
    arg: Any
    runs: list[float] = field(default_factory=list)  # ns per call, one entry per run
    after_run: Callable[[], None] | None = None  # untimed, after every batch of calls

    @property
    def ns(self) -> float:
        return min(self.runs)


@dataclass
class Section:
    title: str
    baseline: str  # the case the ratios are relative to
    cases: list[Case] = field(default_factory=list)
    goal: tuple[str, float] | None = None  # (case, the ratio it should stay within)
    skipped: str = ""
    trips: dict[str, Trips] = field(default_factory=dict)  # miss sections: per operation


@dataclass
class Trips:
    """What one operation sends, per call: backend calls, and commands on the wire."""

    calls: dict[str, float]  # backend method: calls per operation
    wire: dict[str, float] | None  # server command: sends per operation; None in-process

    @property
    def round_trips(self) -> float:
        """Commands written to the server (each awaits its reply), or backend calls."""
        return sum((self.calls if self.wire is None else self.wire).values())


def measure(fn: Callable[[Any], Any], arg: Any, number: int) -> float:
    """Nanoseconds per ``fn(arg)`` over ``number`` calls.

    The call is timed as the statement ``fn(arg)``, with no wrapper lambda whose own
    cost would shrink every ratio.
    """
    timer = timeit.Timer("fn(arg)", globals={"fn": fn, "arg": arg})
    return timer.timeit(number) / number * 1e9


def timed(case: Case, number: int) -> float:
    """:func:`measure` the case, then run its untimed ``after_run`` (cleanup, checks)."""
    ns = measure(case.fn, case.arg, number)
    if case.after_run is not None:
        case.after_run()
    return ns


def calls_per_run(case: Case, seconds: float) -> int:
    """How many calls take about ``seconds`` (as ``timeit.Timer.autorange`` estimates)."""
    number = 1
    while (elapsed := timed(case, number) * number / 1e9) < seconds / 5:
        number *= 2
    return max(1, round(number * seconds / elapsed))


def is_hit(result: Any) -> bool:
    """True for VALUE, or for a batch answer holding VALUE for every key."""
    if isinstance(result, dict) and len(result) == BATCH:
        return all(value == VALUE for value in result.values())
    return bool(result == VALUE)


def reachable(address: tuple[str, int]) -> str:
    """An empty string if a TCP connection succeeds, else why it did not."""
    try:
        socket.create_connection(address, timeout=1.0).close()
    except OSError as exc:
        return f"{address[0]}:{address[1]} not reachable ({exc})"
    return ""


def batch_section(
    backend: str, cache: Cache, raw_name: str, raw_fn: Callable[[Any], Any]
) -> Section:
    """``get_many(100)`` next to 100 single gets, and ``raw_fn`` on the backend keys."""
    keys = BATCH_KEYS
    cache.set_many(dict.fromkeys(keys, VALUE), ttl=600)
    get = cache.get
    singles = f"{BATCH} x cache.get"
    section = Section(BATCH_TITLE.format(backend), singles)
    section.cases = [
        Case(singles, lambda keys: {key: get(key) for key in keys}, keys),
        Case(f"cache.get_many({BATCH})", cache.get_many, keys),
        Case(raw_name, raw_fn, [cache.backend_key(key) for key in keys]),
    ]
    return section


def command_name(data: bytes) -> str:
    """The first command in bytes bound for a server: RESP (redis) or memcached text."""
    if data[:1] == b"*":  # *<argc>\r\n$<len>\r\n<NAME>\r\n...
        return data.split(b"\r\n", 3)[2].decode().upper()
    return data.split(b"\r\n", 1)[0].split(b" ", 1)[0].decode()


def counting_redis_client(wire: Counter[str]) -> Any:
    """A redis-py client set up as ``RedisBackend.from_url`` sets one up, whose
    connections count each write to the socket (one per command, or per pipeline)
    under the name of its first command."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    class CountingConnection(redis.Connection):
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            chunks = [command] if isinstance(command, bytes | str) else command
            head = chunks[0]
            wire[command_name(head.encode() if isinstance(head, str) else bytes(head))] += 1
            super().send_packed_command(command, check_health)

    return redis.Redis.from_url(
        f"redis://{REDIS[0]}:{REDIS[1]}/0",
        connection_class=CountingConnection,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )


class CountingSocket:
    """A socket whose ``sendall`` counts what it sends, by command name."""

    def __init__(self, sock: socket.socket, wire: Counter[str]) -> None:
        self._sock = sock
        self._wire = wire

    def sendall(self, data: bytes, *args: Any) -> None:
        self._wire[command_name(data)] += 1
        self._sock.sendall(data, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class CountingSocketModule:
    """The ``socket`` module, for pymemcache's ``socket_module``: its sockets count."""

    def __init__(self, wire: Counter[str]) -> None:
        self._wire = wire

    def socket(self, *args: Any) -> CountingSocket:
        return CountingSocket(socket.socket(*args), self._wire)

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)


def per_call(counts: Counter[str], calls: int) -> dict[str, float]:
    return {name: count / calls for name, count in counts.items()}


def count_trips(backend: Backend, wire: Counter[str] | None, namespace: str) -> dict[str, Trips]:
    """Backend calls and wire commands per ``get_or_load`` miss and hit, leases on and off.

    ``wire`` is the counter the backend's driver writes to, or ``None`` in-process.
    Each operation runs once untimed first (connecting, loading Lua scripts), then
    ``TRIP_CALLS`` times counted.
    """
    counted = CountingBackend(backend)
    lease = Cache(counted, namespace=namespace, ttl=MISS_TTL)
    naive = Cache(counted, namespace=namespace, ttl=MISS_TTL, lease_ttl=None)
    operations: dict[str, Callable[[int], Any]] = {
        "naive miss": lambda i: naive.get_or_load(f"trips:naive:{i}", VALUE.copy),
        "lease miss": lambda i: lease.get_or_load(f"trips:lease:{i}", VALUE.copy),
        "naive hit": lambda i: naive.get_or_load("trips:hit", VALUE.copy),
        "lease hit": lambda i: lease.get_or_load("trips:hit", VALUE.copy),
    }
    trips: dict[str, Trips] = {}
    try:
        lease.set("trips:hit", VALUE)
        for name, operation in operations.items():
            operation(-1)
            counted.calls.clear()
            if wire is not None:
                wire.clear()
            for i in range(TRIP_CALLS):
                assert operation(i) == VALUE, name
            calls = per_call(counted.calls, TRIP_CALLS)
            trips[name] = Trips(calls, None if wire is None else per_call(wire, TRIP_CALLS))
        for cache in (naive, lease):  # every miss loaded and stored; no lease contended
            stats = cache.stats()
            assert stats.loads == stats.hits == TRIP_CALLS + 1, stats
            assert stats.errors == stats.lease_waits == stats.fills_rejected == 0, stats
    finally:
        kinds = ("naive", "lease")
        keys = [f"trips:{kind}:{i}" for kind in kinds for i in range(-1, TRIP_CALLS)]
        naive.delete_many(["trips:hit", *keys])
    return trips


def miss_case(name: str, cache: Cache, prefix: str) -> Case:
    """A case whose every call misses: ``get_or_load`` on a key never used before.

    After each batch (untimed) the keys the batch wrote are deleted, and the cache's
    counters checked: every call missed and loaded, nothing waited or was rejected.
    The key is built inside the timed call, a cost both miss cases share.
    """
    counter = itertools.count()
    get_or_load = cache.get_or_load
    first = 0

    def miss(loader: Callable[[], Any]) -> Any:
        return get_or_load(f"{prefix}{next(counter)}", loader)

    def after_run() -> None:
        nonlocal first
        end = next(counter)  # one past the last key handed out; never used itself
        for start in range(first, end, CLEANUP_CHUNK):
            stop = min(start + CLEANUP_CHUNK, end)
            cache.delete_many([f"{prefix}{i}" for i in range(start, stop)])
        stats, calls = cache.stats(), end - first
        cache.reset_stats()
        first = end + 1
        if not (stats.misses == stats.loads == calls and stats.hits == 0):
            raise AssertionError(f"{name}: {calls} calls were not all misses: {stats}")
        if stats.errors or stats.lease_waits or stats.fills_rejected:
            raise AssertionError(f"{name}: errors, waits or rejected fills: {stats}")

    return Case(name, miss, VALUE.copy, after_run=after_run)


def miss_section(
    backend_name: str, backend: Backend, namespace: str, trips: dict[str, Trips]
) -> Section:
    """A lease-protected miss and fill next to a naive get, load and set, on ``backend``;
    then ``get_or_load`` hits, leases on and off, which should cost the same."""
    lease = Cache(backend, namespace=namespace, ttl=MISS_TTL)
    naive = Cache(backend, namespace=namespace, ttl=MISS_TTL, lease_ttl=None)
    lease_hits = Cache(backend, namespace=namespace, ttl=MISS_TTL)
    naive_hits = Cache(backend, namespace=namespace, ttl=MISS_TTL, lease_ttl=None)
    lease_hits.set("miss-section-hit", VALUE, ttl=600)  # outlives every run, like "item"
    section = Section(MISS_TITLE.format(backend_name), NAIVE_MISS, trips=trips)
    section.cases = [
        miss_case(NAIVE_MISS, naive, "miss:naive:"),
        miss_case(LEASE_MISS, lease, "miss:lease:"),
        Case(
            "hit: get_or_load, lease_ttl=None",
            functools.partial(naive_hits.get_or_load, "miss-section-hit"),
            VALUE.copy,
        ),
        Case(
            "hit: get_or_load, lease_ttl=5",
            functools.partial(lease_hits.get_or_load, "miss-section-hit"),
            VALUE.copy,
        ),
    ]
    return section


@contextmanager
def memory_sections() -> Iterator[list[Section]]:
    def f(x: int) -> dict[str, Any]:
        return VALUE

    lru = cachetools.cached(cachetools.LRUCache(maxsize=10_000))(f)
    locked = cachetools.cached(cachetools.LRUCache(maxsize=10_000), lock=threading.Lock())(f)
    ttl_cache = cachetools.cached(cachetools.TTLCache(maxsize=10_000, ttl=300))(f)
    region = make_region().configure("dogpile.cache.memory")
    no_ttl = Cache(MemoryBackend(maxsize=10_000), namespace="bench", ttl=None)
    with_ttl = Cache(MemoryBackend(maxsize=10_000), namespace="bench", ttl=300)
    # Isolating: stores JSON, so every hit decodes a fresh copy, as on Redis.
    copies = Cache(MemoryBackend(maxsize=10_000, serialize=True), namespace="bench", ttl=None)
    sieve = Cache(MemoryBackend(maxsize=10_000, eviction="sieve"), namespace="bench", ttl=None)
    s3fifo = Cache(MemoryBackend(maxsize=10_000, eviction="s3fifo"), namespace="bench", ttl=None)
    decorated = Section("in-process decorated hit: f(7)", "cachetools.cached(LRUCache)")
    decorated.goal = ("cachekit @cache.cached() ttl=None", 1.0)
    decorated.cases = [
        Case("cachetools.cached(LRUCache)", lru, 7),
        Case("cachekit @cache.cached() ttl=None", no_ttl.cached()(f), 7),
        Case("cachekit @cache.cached() ttl=300", with_ttl.cached()(f), 7),
        Case("cachekit @cache.cached() ttl=None, sieve", sieve.cached()(f), 7),
        Case("cachekit @cache.cached() ttl=None, s3fifo", s3fifo.cached()(f), 7),
        Case("cachekit @cache.cached() serialize=True", copies.cached()(f), 7),
        Case("cachetools.cached(TTLCache ttl=300)", ttl_cache, 7),
        Case("cachetools.cached(LRUCache, lock=Lock())", locked, 7),
        Case("functools.lru_cache", functools.lru_cache(maxsize=10_000)(f), 7),
        Case("dogpile memory region.cache_on_arguments", region.cache_on_arguments()(f), 7),
    ]
    memory = Cache(MemoryBackend(maxsize=10_000), namespace="bench", ttl=300)
    raw = memory.backend.get_many
    batch = batch_section("memory", memory, "MemoryBackend.get_many", raw)
    # Large enough that no run's keys are evicted before they are deleted.
    misses = MemoryBackend(maxsize=1_000_000)
    trips = count_trips(MemoryBackend(maxsize=10_000), None, "bench")
    yield [decorated, batch, miss_section("memory", misses, "bench", trips)]


@contextmanager
def redis_sections(namespace: str) -> Iterator[list[Section]]:
    from cachekit.backends.redis import RedisBackend

    backend = RedisBackend.from_url(f"redis://{REDIS[0]}:{REDIS[1]}/0", timeout=2.0)
    cache = Cache(backend, namespace=namespace, ttl=600)
    region = make_region(key_mangler=lambda key: f"{namespace}:dogpile:{key}").configure(
        "dogpile.cache.redis",
        arguments={"host": REDIS[0], "port": REDIS[1], "db": 0, "redis_expiration_time": 600},
    )
    client = backend.client  # the raw cases share cachekit's connection and its settings
    loads = orjson.loads

    def raw_get(key: str) -> Any:
        return loads(client.get(key))

    def raw_mget(keys: list[str]) -> dict[str, Any]:
        return dict(zip(keys, map(loads, client.mget(keys)), strict=True))

    try:
        cache.set("item", VALUE)
        with warnings.catch_warnings():  # dogpile writes with SETEX, deprecated in redis-py
            warnings.simplefilter("ignore", DeprecationWarning)
            region.set("item", VALUE)
        hit = Section(HIT_TITLE.format("redis"), "raw redis-py GET + orjson.loads")
        hit.goal = ("cachekit cache.get", 1.1)
        hit.cases = [
            Case("raw redis-py GET + orjson.loads", raw_get, cache.backend_key("item")),
            Case("cachekit cache.get", cache.get, "item"),
            Case("dogpile redis region.get", region.get, "item"),
        ]
        batch = batch_section("redis", cache, f"raw MGET({BATCH}) + orjson.loads", raw_mget)
        wire: Counter[str] = Counter()
        counting = counting_redis_client(wire)
        try:
            trips = count_trips(RedisBackend(counting), wire, namespace)
        finally:
            counting.close()
        yield [hit, batch, miss_section("redis", backend, namespace, trips)]
    finally:
        cache.delete_many(["item", "miss-section-hit", *BATCH_KEYS])
        region.delete("item")
        backend.close()


@contextmanager
def memcached_sections(namespace: str) -> Iterator[list[Section]]:
    from pymemcache.client.base import Client

    from cachekit.backends.memcached import MemcachedBackend

    # Round trips on this box vary with the connection, so the raw cases and the
    # headline cachekit case share one socket: the client handed to MemcachedBackend.
    client = Client(MEMCACHED, timeout=2.0, connect_timeout=2.0, no_delay=True)
    cache = Cache(MemcachedBackend(client), namespace=namespace, ttl=600)
    pooled = MemcachedBackend([f"{MEMCACHED[0]}:{MEMCACHED[1]}"], timeout=2.0)
    pooled_cache = Cache(pooled, namespace=namespace, ttl=600)
    region = make_region(key_mangler=lambda key: f"{namespace}:dogpile:{key}").configure(
        "dogpile.cache.pymemcache",
        arguments={"url": [f"{MEMCACHED[0]}:{MEMCACHED[1]}"], "memcached_expire_time": 600},
    )
    loads = orjson.loads

    def raw_get(key: str) -> Any:
        return loads(client.get(key))

    def raw_get_many(keys: list[str]) -> dict[str, Any]:
        return {key: loads(data) for key, data in client.get_many(keys).items()}

    try:
        cache.set("item", VALUE)
        region.set("item", VALUE)
        hit = Section(HIT_TITLE.format("memcached"), "raw pymemcache get + orjson.loads")
        hit.goal = ("cachekit cache.get", 1.1)
        hit.cases = [
            Case("raw pymemcache get + orjson.loads", raw_get, cache.backend_key("item")),
            Case("cachekit cache.get", cache.get, "item"),
            Case("cachekit cache.get, backend from a server list", pooled_cache.get, "item"),
            Case("dogpile pymemcache region.get", region.get, "item"),
        ]
        raw_name = f"raw get_many({BATCH}) + orjson.loads"
        batch = batch_section("memcached", cache, raw_name, raw_get_many)
        wire: Counter[str] = Counter()
        counting = Client(
            MEMCACHED,
            timeout=2.0,
            connect_timeout=2.0,
            no_delay=True,
            socket_module=CountingSocketModule(wire),
        )
        try:
            trips = count_trips(MemcachedBackend(counting), wire, namespace)
        finally:
            counting.close()
        yield [hit, batch, miss_section("memcached", cache.backend, namespace, trips)]
    finally:
        cache.delete_many(["item", "miss-section-hit", *BATCH_KEYS])
        region.delete("item")
        region.backend.client.close()  # dogpile's HashClient; dogpile has no close of its own
        pooled.close()
        client.close()


def run(section: Section, *, seconds: float, repeat: int) -> None:
    """Check every case really hits, then time them: the fastest of ``repeat`` runs each.

    The cases take turns, run by run, so that a burst of load on the machine (or on
    the server) falls on all of them rather than skewing the ratios.
    """
    for case in section.cases:
        result = case.fn(case.arg)
        if not is_hit(result):
            raise AssertionError(f"{section.title}: {case.name} returned {result!r}")
    numbers = [calls_per_run(case, seconds) for case in section.cases]
    for _ in range(repeat):
        for case, number in zip(section.cases, numbers, strict=True):
            case.runs.append(timed(case, number))


def paired_ratio(case: Case, base: Case) -> float:
    """The median, over rounds, of this case's run divided by the baseline's run.

    Round trips on a shared machine drift by tens of percent over seconds; runs taken
    back to back share the drift, so their ratio is steadier than a ratio of minimums.
    """
    return statistics.median(c / b for c, b in zip(case.runs, base.runs, strict=True))


def print_section(section: Section) -> None:
    print(f"\n## {section.title}")
    if section.skipped:
        print(f"   skipped: {section.skipped}")
        return
    cases = {case.name: case for case in section.cases}
    base = cases[section.baseline]
    print(f"   {'case':<46} {'ns/call':>11} {'ratio':>7} {'paired':>7}")
    for case in section.cases:
        ratio, paired = case.ns / base.ns, paired_ratio(case, base)
        print(f"   {case.name:<46} {case.ns:>11,.0f} {ratio:>6.2f}x {paired:>6.2f}x")
    if section.goal is not None:
        name, limit = section.goal
        paired = paired_ratio(cases[name], base)
        verdict = "met" if paired <= limit else "MISSED"
        print(f"   goal: {name} <= {limit:.2f}x {section.baseline}: {verdict} ({paired:.2f}x)")
    if section.trips:
        print_trips(section, cases)


def describe(counts: dict[str, float]) -> str:
    """``get + add + compare_and_set = 3``: calls per operation, in the order made."""
    parts = [name if count == 1 else f"{count:g} x {name}" for name, count in counts.items()]
    return f"{' + '.join(parts)} = {sum(counts.values()):g}"


def trip_goals(trips: dict[str, Trips]) -> list[tuple[str, bool, str]]:
    """The issue's goal, per backend: (goal, met, the numbers behind it)."""
    naive, lease = trips["naive miss"].round_trips, trips["lease miss"].round_trips
    naive_hit, lease_hit = trips["naive hit"].round_trips, trips["lease hit"].round_trips
    return [
        (
            "lease miss <= naive miss + 1 round trip",
            lease <= naive + 1,
            f"{lease:g} vs {naive:g}, +{lease - naive:g}",
        ),
        (
            "hit with leases on = 1 round trip, as with leases off",
            lease_hit == naive_hit == 1,
            f"{lease_hit:g} vs {naive_hit:g}",
        ),
    ]


def print_trips(section: Section, cases: dict[str, Case]) -> None:
    in_process = any(trip.wire is None for trip in section.trips.values())
    wire_title = "wire: none, in-process" if in_process else "wire: commands sent to the server"
    print(f"\n   {'per call':<12} {'backend calls':<42} {wire_title}")
    for name, trip in section.trips.items():
        wire = "" if trip.wire is None else describe(trip.wire)
        print(f"   {name:<12} {describe(trip.calls):<42} {wire}".rstrip())
    ratio = paired_ratio(cases[LEASE_MISS], cases[NAIVE_MISS])
    naive, lease = (section.trips[name].round_trips for name in ("naive miss", "lease miss"))
    unit = "backend calls" if in_process else "round trips"
    print(f"   lease/naive miss: {ratio:.2f}x the time (paired), {lease:g}/{naive:g} {unit}")
    for goal, met, numbers in trip_goals(section.trips):
        print(f"   goal: {goal}: {'met' if met else 'MISSED'} ({numbers})")


def as_json(section: Section) -> dict[str, Any]:
    """One section's results, with every run kept for later analysis."""
    result: dict[str, Any] = {"section": section.title, "skipped": section.skipped, "cases": []}
    if section.skipped:
        return result
    base = next(case for case in section.cases if case.name == section.baseline)
    result["baseline"] = base.name
    result["cases"] = [
        {
            "name": case.name,
            "ns_per_call": case.ns,
            "ratio": case.ns / base.ns,
            "paired_ratio": paired_ratio(case, base),
            "runs_ns_per_call": case.runs,
        }
        for case in section.cases
    ]
    if section.trips:
        result["per_call"] = {
            name: {"backend_calls": trip.calls, "wire_commands": trip.wire}
            for name, trip in section.trips.items()
        }
        result["goals"] = [
            {"goal": goal, "met": met, "numbers": numbers}
            for goal, met, numbers in trip_goals(section.trips)
        ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few iterations, for smoke tests")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    seconds, repeat = (0.002, 2) if args.quick else (0.03, 40)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    print(f"cachekit overhead: Python {platform.python_version()} on {platform.machine()}")
    print(f"ns/call: the fastest of {repeat} runs per case, the cases taking turns run by run")
    print("ratio: to the section's first row; paired: median of the per-run ratios to it")
    print("miss rows: each call a new key (deleted after each run, untimed)")

    sections: list[Section] = []
    with ExitStack() as stack:
        sections += stack.enter_context(memory_sections())
        for name, address, builder in (
            ("redis", REDIS, redis_sections),
            ("memcached", MEMCACHED, memcached_sections),
        ):
            if reason := reachable(address):
                titles = (HIT_TITLE, BATCH_TITLE, MISS_TITLE)
                skipped = [title.format(name) for title in titles]
                sections += [Section(title, "", skipped=reason) for title in skipped]
            else:
                sections += stack.enter_context(builder(namespace))
        for section in sections:
            if not section.skipped:
                run(section, seconds=seconds, repeat=repeat)
            print_section(section)
            sys.stdout.flush()

    if args.json:
        results = [as_json(section) for section in sections]
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"quick": args.quick, "repeat": repeat, "sections": results}, out, indent=2)


if __name__ == "__main__":
    main()
