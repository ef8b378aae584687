"""Fail-open reads, the circuit breaker, the invalidation journal and oversize values."""

from __future__ import annotations

import time
from typing import Any

import pytest

from cachekit import MISSING, BackendError, Cache, ValueTooLarge
from cachekit.backends.base import Backend
from cachekit.backends.memory import MemoryBackend
from cachekit.breaker import CircuitBreaker
from cachekit.exceptions import BackendUnavailable
from tests.support import FakeClock, FlakyBackend

pytestmark = pytest.mark.usefixtures("both_drivers")


def test_the_breaker_opens_cools_down_and_probes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=3, cooldown=1.0, timer=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failed()
    assert breaker.state == "closed"
    breaker.failed()
    assert breaker.state == "open" and breaker.opened == 1
    assert not breaker.allow() and breaker.short_circuited == 1
    clock.advance(1.0)
    assert breaker.allow() and breaker.state == "half-open"  # one probe...
    assert not breaker.allow()  # ...and only one
    breaker.failed()  # the probe failed: open again for a full cool-down
    assert breaker.state == "open" and breaker.opened == 2
    clock.advance(1.0)
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.allow()


def test_a_dead_server_is_skipped_after_a_few_failures(namespace: str) -> None:
    clock = FakeClock()
    flaky = FlakyBackend(MemoryBackend())
    breaker = CircuitBreaker(failures=3, cooldown=5.0, timer=clock)
    cache = Cache(flaky, namespace=namespace, breaker=breaker)
    flaky.down = True
    for i in range(20):
        assert cache.get_or_load(f"k{i}", lambda i=i: i) == i  # reads never fail
    calls_while_down = sum(flaky.calls.values())
    assert calls_while_down <= 4  # three failures opened it; nothing else reached it
    stats = cache.stats()
    assert stats.breaker_state == "open" and stats.short_circuited > 0 and stats.errors > 0
    flaky.down = False
    clock.advance(5.0)
    assert cache.get_or_load("k1", lambda: "fresh") == "fresh"  # the probe closes it
    assert cache.stats().breaker_state == "closed"
    assert cache.get("k1") == "fresh"


def test_unavailable_is_a_backend_error() -> None:
    assert issubclass(BackendUnavailable, BackendError)


def test_an_invalidation_the_server_missed_is_replayed_before_any_read(namespace: str) -> None:
    inner = MemoryBackend()
    flaky = FlakyBackend(inner)
    cache = Cache(flaky, namespace=namespace, breaker=None)
    record = {"v": 1}
    assert cache.get_or_load("row", lambda: dict(record)) == {"v": 1}
    flaky.down = True  # the server hangs...
    record["v"] = 2  # ...while the database commits an update
    cache.delete("row")  # the delete cannot reach it: journaled
    assert cache.get_or_load("row", lambda: dict(record)) == {"v": 2}  # bypassed, no fill
    flaky.down = False  # the server is back, still holding the old entry
    assert inner.get(cache.backend_key("row")) == {"v": 1}
    cache.journal._next_try = 0.0  # don't wait for the retry interval in this test
    assert cache.get("row") is MISSING  # the delete was replayed before the read
    assert inner.get(cache.backend_key("row")) is MISSING
    assert cache.stats().pending_invalidations == 0
    assert cache.get_or_load("row", lambda: dict(record)) == {"v": 2}


def test_tag_invalidations_the_server_missed_are_honoured(namespace: str) -> None:
    flaky = FlakyBackend(MemoryBackend())
    cache = Cache(flaky, namespace=namespace, breaker=None)
    cache.set("report", {"total": 1}, tags=["order:1"])
    flaky.down = True
    cache.invalidate_tags(["order:1"])
    flaky.down = False
    cache.journal._next_try = float("inf")  # the replay has not happened yet...
    assert cache.get("report") is MISSING  # ...but the entry is not served
    cache.journal._next_try = 0.0
    assert cache.get("report") is MISSING
    # Replayed by that read or, if it was replaying at that moment, by the background
    # runner: either way soon (the deadline only guards against a hang).
    deadline = time.monotonic() + 30
    while cache.stats().pending_invalidations and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.stats().pending_invalidations == 0
    assert cache.get("report") is MISSING


def test_oversize_values_are_refused_counted_and_never_clobber(
    backend: Backend, namespace: str
) -> None:
    if backend.capabilities.stores_objects:
        pytest.skip("the memory backend stores objects; it has no item size")
    cache = Cache(backend, namespace=namespace, max_value_size=1000)
    cache.set("k", "small")
    with pytest.raises(ValueTooLarge):
        cache.set("k", "x" * 2000)
    assert cache.get("k") is MISSING  # the old value did not silently survive

    @cache.cached()
    def big(n: int) -> str:
        return "y" * n

    assert big(5000) == "y" * 5000  # the call works; the value is not cached
    assert cache.get(big.key(5000)) is MISSING
    assert cache.stats().oversize == 2


@pytest.mark.memcached
def test_memcached_items_over_a_megabyte(memcached_server: tuple[str, int], namespace: str) -> None:
    from cachekit.backends.memcached import MemcachedBackend

    backend = MemcachedBackend(f"{memcached_server[0]}:{memcached_server[1]}", timeout=2.0)
    try:
        cache = Cache(backend, namespace=namespace)
        assert cache.max_value_size is not None and cache.max_value_size <= 1024 * 1024
        cache.set("k", "old")
        value: Any = "z" * (2 * 1024 * 1024)
        with pytest.raises(ValueTooLarge):
            cache.set("k", value)
        assert cache.get("k") is MISSING
        assert cache.get_or_load("k2", lambda: value) == value
        assert cache.get("k2") is MISSING and cache.stats().oversize == 2
    finally:
        backend.close()


def test_a_probe_that_ends_without_a_verdict_does_not_wedge_the_breaker() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, cooldown=1.0, timer=clock)
    breaker.failed()
    clock.advance(1.0)
    assert breaker.allow() and breaker.state == "half-open"
    breaker.abandoned()  # e.g. the probe was interrupted
    assert breaker.state == "open"
    clock.advance(1.0)
    assert breaker.allow()  # a new probe, not a breaker stuck half-open forever


def test_a_pending_delete_is_honoured_by_the_in_process_fast_path(namespace: str) -> None:
    inner = MemoryBackend()
    flaky = FlakyBackend(inner)
    cache = Cache(flaky, namespace=namespace, breaker=None)
    record = {1: "v1"}

    @cache.cached()
    def read(n: int) -> str:
        return record[n]

    assert read(1) == "v1"
    flaky.down = True
    record[1] = "v2"
    read.invalidate(1)  # journaled
    flaky.down = False
    cache.journal._next_try = float("inf")  # the replay has not run yet
    assert read(1) == "v2"
