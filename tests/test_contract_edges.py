"""Public calls keep their contract under edge input: durations validated at the edge,
re-entrant loads failing fast, and a failed ``set`` that never leaves the old value."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
from datetime import timedelta
from typing import Any

import pytest

from cachekit import (
    MISSING,
    Cache,
    CircuitBreaker,
    ConfigurationError,
    ReentrantLoadError,
)
from cachekit.backends.base import Backend
from cachekit.backends.counting import CountingBackend
from cachekit.backends.memory import MemoryBackend
from cachekit.markers import is_marker
from tests.support import FlakyBackend

pytestmark = pytest.mark.usefixtures("both_drivers")


ABSURD = [math.inf, -math.inf, math.nan, 1e300, 10**400, timedelta.max, 400 * 24 * 3600]


@pytest.mark.parametrize("duration", ABSURD, ids=repr)
@pytest.mark.parametrize("option", ["ttl", "stale_ttl", "lease_ttl", "none_ttl"])
def test_absurd_durations_are_refused_when_configured(option: str, duration: Any) -> None:
    with pytest.raises(ConfigurationError, match=option):
        Cache(MemoryBackend(), **{option: duration})


@pytest.mark.parametrize("duration", ABSURD, ids=repr)
def test_absurd_durations_are_refused_per_call(duration: Any) -> None:
    cache = Cache(MemoryBackend())
    with pytest.raises(ConfigurationError):
        cache.set("k", 1, ttl=duration)
    with pytest.raises(ConfigurationError):
        cache.cached(ttl=duration)
    with pytest.raises(ConfigurationError):
        cache.cached(lease_ttl=duration)
    with pytest.raises(ConfigurationError):
        cache.get_or_load("k", lambda: 1, stale_ttl=duration)
    assert cache.get("k") is MISSING  # nothing half-done


def test_the_largest_accepted_ttl_works_on_every_backend(backend: Backend, namespace: str) -> None:
    cache = Cache(backend, namespace=namespace, ttl=timedelta(days=365), lease_ttl=3600)
    assert cache.get_or_load("k", lambda: "v") == "v"
    cache.set("s", "w")
    assert cache.get_many(["k", "s"]) == {"k": "v", "s": "w"}


@pytest.mark.parametrize("poll", [0, -1, 40, math.inf, math.nan, True])
def test_lease_poll_is_bounded(poll: Any) -> None:
    with pytest.raises(ConfigurationError, match="lease_poll"):
        Cache(MemoryBackend(), lease_poll=poll)


# -- a loader asking for its own key --------------------------------------------------


def test_a_loader_that_asks_for_its_own_key_fails_fast(backend: Backend, namespace: str) -> None:
    # lease_ttl is long: a loader waiting on its own lease would hang the test.
    cache = Cache(backend, namespace=namespace, lease_ttl=60)
    depth = []

    def load() -> int:
        depth.append(1)
        if len(depth) == 1:
            return cache.get_or_load("k", load) + 1
        return 1

    with pytest.raises(ReentrantLoadError, match="asked for"):
        cache.get_or_load("k", load)
    # The lease was released on the way out: the next caller loads at once.
    assert not is_marker(backend.get(cache.backend_key("k")))
    assert cache.get_or_load("k", lambda: 7) == 7


def test_a_recursive_cached_function_on_other_keys_still_works(
    backend: Backend, namespace: str
) -> None:
    cache = Cache(backend, namespace=namespace, lease_ttl=60)

    @cache.cached()
    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    assert fib(20) == 6765


def test_a_batch_loader_that_asks_for_one_of_its_keys_fails_fast(namespace: str) -> None:
    cache = Cache(MemoryBackend(), namespace=namespace, lease_ttl=60)

    recurse = [True]

    def load_many(ids: list[int]) -> dict[int, int]:
        return {i: view.get(i) if i == 2 and recurse[0] else i for i in ids}

    view = cache.read_through("row", load=lambda i: i, load_many=load_many)
    with pytest.raises(ReentrantLoadError):
        view.get_many([1, 2, 3])
    recurse[0] = False
    assert view.get_many([1, 2, 3]) == {1: 1, 2: 2, 3: 3}  # leases released


def test_the_same_key_in_another_thread_still_waits_for_the_holder(namespace: str) -> None:
    cache = Cache(MemoryBackend(), namespace=namespace, lease_ttl=60)
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow() -> str:
        calls.append("slow")
        started.set()
        release.wait(30)
        return "held"

    holder = threading.Thread(target=cache.get_or_load, args=("k", slow))
    holder.start()
    started.wait(30)
    waiter: list[Any] = []
    thread = threading.Thread(target=lambda: waiter.append(cache.get_or_load("k", list)))
    thread.start()
    release.set()
    holder.join(30)
    thread.join(30)
    assert waiter == ["held"] and calls == ["slow"]


# -- a failed set ---------------------------------------------------------------------


@pytest.mark.parametrize("breaker", [False, True])
def test_a_set_the_server_misses_never_leaves_the_old_value(namespace: str, breaker: bool) -> None:
    inner = MemoryBackend()
    flaky = FlakyBackend(inner)
    cache = Cache(
        flaky,
        namespace=namespace,
        breaker=CircuitBreaker(failures=1, cooldown=3600) if breaker else None,
    )
    cache.set("price", 10)
    flaky.down = True
    cache.set("price", 12)  # fails open: journaled like a delete, not raised
    cache.set_many({"a": 1, "b": 2})
    assert cache.get("price") is MISSING  # the old value is not served here...
    assert cache.stats().pending_invalidations == 3
    flaky.down = False
    cache.replay_invalidations()
    assert inner.get(cache.backend_key("price")) is MISSING  # ...nor anywhere, once replayed
    assert cache.stats().pending_invalidations == 0
    cache.set("price", 12)
    assert cache.get("price") == 12


def test_a_fill_interrupted_mid_call_leaves_no_lease_to_wait_out(
    namespace: str, both_drivers: str
) -> None:
    # Under asyncio an interrupted call is a cancelled one (a KeyboardInterrupt inside
    # a task stops the event loop itself).
    interruption = asyncio.CancelledError if both_drivers == "async" else KeyboardInterrupt
    seen = concurrent.futures.CancelledError if both_drivers == "async" else KeyboardInterrupt

    class Interrupting(CountingBackend):
        interrupt = True

        def compare_and_set(self, key: str, expected: Any, value: Any, ttl: Any) -> bool:
            if self.interrupt:
                self.interrupt = False
                raise interruption
            return super().compare_and_set(key, expected, value, ttl)

    cache = Cache(Interrupting(MemoryBackend()), namespace=namespace, lease_ttl=60)
    with pytest.raises(seen):
        cache.get_or_load("k", lambda: 1)
    assert cache.get_or_load("k", lambda: 2) == 2
    assert cache.stats().lease_waits == 0  # its marker was reclaimed, not waited out
    assert cache.get("k") == 2


def test_a_batch_whose_result_cannot_be_used_releases_every_lease(namespace: str) -> None:
    cache = Cache(MemoryBackend(), namespace=namespace, lease_ttl=60)
    view = cache.read_through(
        "row",
        load=lambda i: {"id": i},
        load_many=lambda ids: [{"id": i} for i in ids],  # a list, not a mapping: a bug
    )
    with pytest.raises(AttributeError):
        view.get_many([1, 2])
    assert view.get(1) == {"id": 1}
    assert cache.stats().lease_waits == 0  # its lease was released, not sat out
