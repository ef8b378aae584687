"""What a cachekit hit costs next to the libraries and raw drivers it competes with.

Each section times one kind of hit, all cases side by side in one process, and prints
nanoseconds per call (the minimum over several repeats, as ``timeit`` advises) and the
ratio to the section's baseline. Redis and memcached sections run against 127.0.0.1 and
are skipped, with a note, when the server does not answer.

Run: python benchmarks/overhead.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import socket
import statistics
import sys
import threading
import timeit
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import cachetools
import orjson
from dogpile.cache import make_region

from cachekit import Cache
from cachekit.backends.memory import MemoryBackend

REDIS = ("127.0.0.1", 6379)
MEMCACHED = ("127.0.0.1", 11211)
BATCH = 100
HIT_TITLE = "{} hit: get one key"
BATCH_TITLE = f"{{}}: get_many({BATCH}) vs {BATCH} single gets"
BATCH_KEYS = [f"item:{i}" for i in range(BATCH)]
# A typical cached row; every case reads this value back.
VALUE = {"id": 7, "name": "Product 7", "price_cents": 1_259, "stock": 12, "tags": ["a", "b"]}


@dataclass
class Case:
    name: str
    fn: Callable[[Any], Any]
    arg: Any
    runs: list[float] = field(default_factory=list)  # ns per call, one entry per run

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


def measure(fn: Callable[[Any], Any], arg: Any, number: int) -> float:
    """Nanoseconds per ``fn(arg)`` over ``number`` calls.

    The call is timed as the statement ``fn(arg)``, with no wrapper lambda whose own
    cost would shrink every ratio.
    """
    timer = timeit.Timer("fn(arg)", globals={"fn": fn, "arg": arg})
    return timer.timeit(number) / number * 1e9


def calls_per_run(fn: Callable[[Any], Any], arg: Any, seconds: float) -> int:
    """How many calls take about ``seconds`` (as ``timeit.Timer.autorange`` estimates)."""
    number = 1
    while (elapsed := measure(fn, arg, number) * number / 1e9) < seconds / 5:
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
    decorated = Section("in-process decorated hit: f(7)", "cachetools.cached(LRUCache)")
    decorated.goal = ("cachekit @cache.cached() ttl=None", 1.0)
    decorated.cases = [
        Case("cachetools.cached(LRUCache)", lru, 7),
        Case("cachekit @cache.cached() ttl=None", no_ttl.cached()(f), 7),
        Case("cachekit @cache.cached() ttl=300", with_ttl.cached()(f), 7),
        Case("cachetools.cached(TTLCache ttl=300)", ttl_cache, 7),
        Case("cachetools.cached(LRUCache, lock=Lock())", locked, 7),
        Case("functools.lru_cache", functools.lru_cache(maxsize=10_000)(f), 7),
        Case("dogpile memory region.cache_on_arguments", region.cache_on_arguments()(f), 7),
    ]
    memory = Cache(MemoryBackend(maxsize=10_000), namespace="bench", ttl=300)
    raw = memory.backend.get_many
    yield [decorated, batch_section("memory", memory, "MemoryBackend.get_many", raw)]


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
        yield [hit, batch]
    finally:
        cache.delete_many(["item", *BATCH_KEYS])
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
        yield [hit, batch_section("memcached", cache, raw_name, raw_get_many)]
    finally:
        cache.delete_many(["item", *BATCH_KEYS])
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
            raise AssertionError(f"{section.title}: {case.name} did not hit: {result!r}")
    numbers = [calls_per_run(case.fn, case.arg, seconds) for case in section.cases]
    for _ in range(repeat):
        for case, number in zip(section.cases, numbers, strict=True):
            case.runs.append(measure(case.fn, case.arg, number))


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

    sections: list[Section] = []
    with ExitStack() as stack:
        sections += stack.enter_context(memory_sections())
        for name, address, builder in (
            ("redis", REDIS, redis_sections),
            ("memcached", MEMCACHED, memcached_sections),
        ):
            if reason := reachable(address):
                skipped = [HIT_TITLE.format(name), BATCH_TITLE.format(name)]
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
