"""Stale-while-revalidate, serve-stale-on-error and XFetch early refresh, on every backend."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator

import pytest

from cachekit import MISSING, Cache, ConfigurationError
from cachekit.backends.base import Backend
from cachekit.backends.memory import MemoryBackend
from cachekit.core import fills
from cachekit.core.ops import Flow
from cachekit.entries import Loaded
from tests.support import FakeClock

TTL, STALE = 10.0, 60.0


pytestmark = pytest.mark.usefixtures("both_drivers")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(backend: Backend, namespace: str, clock: FakeClock) -> Cache:
    return Cache(backend, namespace=namespace, ttl=TTL, stale_ttl=STALE, clock=clock)


class Source:
    """A loader whose value and behaviour the test controls."""

    def __init__(self) -> None:
        self.value = "v1"
        self.calls = 0
        self.fail = False
        self.parked = threading.Event()
        self.release = threading.Event()
        self.park = False

    def __call__(self) -> str:
        self.calls += 1
        value = self.value
        if self.park:
            self.parked.set()
            assert self.release.wait(10), "the test never released the loader"
        if self.fail:
            raise ConnectionError("database down")
        return value


@pytest.fixture
def source() -> Source:
    return Source()


@pytest.fixture
def in_thread() -> Iterator[Callable[[Callable[[], object]], list[object]]]:
    threads: list[threading.Thread] = []

    def start(fn: Callable[[], object]) -> list[object]:
        out: list[object] = []
        thread = threading.Thread(target=lambda: out.append(fn()))
        thread.start()
        threads.append(thread)
        return out

    yield start
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()


def test_fresh_entries_are_plain_hits(cache: Cache, source: Source, clock: FakeClock) -> None:
    assert cache.get_or_load("k", source) == "v1"
    clock.advance(TTL - 1)
    source.value = "v2"
    assert cache.get_or_load("k", source) == "v1"
    assert source.calls == 1 and cache.stats().stale_served == 0


def test_a_stale_read_refreshes_while_others_get_the_stale_value(
    cache: Cache,
    source: Source,
    clock: FakeClock,
    in_thread: Callable[[Callable[[], object]], list[object]],
) -> None:
    cache.get_or_load("k", source)
    clock.advance(TTL + 1)
    source.value, source.park = "v2", True
    refreshed = in_thread(lambda: cache.get_or_load("k", source))
    assert source.parked.wait(10)
    # While the refresh runs: the stale value, at once, without a second load.
    assert cache.get_or_load("k", source) == "v1"
    assert cache.get("k") == "v1"
    assert source.calls == 2 and cache.stats().stale_served == 2
    source.release.set()
    for _ in range(1000):
        if refreshed:
            break
        threading.Event().wait(0.01)
    assert refreshed == ["v2"]
    source.park = False
    assert cache.get_or_load("k", source) == "v2" and source.calls == 2


def test_a_failed_refresh_serves_the_stale_value(
    cache: Cache, source: Source, clock: FakeClock
) -> None:
    cache.get_or_load("k", source)
    clock.advance(TTL + 1)
    source.fail = True
    assert cache.get_or_load("k", source) == "v1"
    stats = cache.stats()
    assert (stats.errors, stats.stale_served, stats.loads) == (1, 1, 1)
    source.fail, source.value = False, "v2"
    assert cache.get_or_load("k", source) == "v2"  # the refresh lease was released


def test_a_write_during_a_refresh_wins(
    cache: Cache,
    source: Source,
    clock: FakeClock,
    in_thread: Callable[[Callable[[], object]], list[object]],
) -> None:
    cache.get_or_load("k", source)
    clock.advance(TTL + 1)
    source.park = True
    in_thread(lambda: cache.get_or_load("k", source))
    assert source.parked.wait(10)
    cache.delete("k")  # the record changed and the entry was invalidated
    source.release.set()
    for _ in range(1000):
        if cache.stats().fills_rejected:
            break
        threading.Event().wait(0.01)
    assert cache.stats().fills_rejected == 1
    assert cache.get("k") is MISSING


def test_entries_go_after_the_stale_window() -> None:
    clock = FakeClock()
    cache = Cache(MemoryBackend(timer=clock), namespace="n", ttl=TTL, stale_ttl=STALE, clock=clock)
    cache.get_or_load("k", lambda: "v1")
    clock.advance(TTL + STALE + 1)
    assert cache.get("k") is MISSING
    assert cache.get_or_load("k", lambda: "v2") == "v2"


def test_decorators_and_views_take_the_options(
    backend: Backend, namespace: str, clock: FakeClock, source: Source
) -> None:
    cache = Cache(backend, namespace=namespace, ttl=TTL, clock=clock)

    @cache.cached(key="read:{n}", stale_ttl=STALE)  # a closure over source: no default key
    def read(n: int) -> str:
        return source()

    view = cache.read_through("row", load=lambda n: source(), stale_ttl=STALE)
    assert read(1) == view.get(1) == "v1"
    clock.advance(TTL + 1)
    source.fail = True
    assert read(1) == view.get(1) == view.get_many([1])[1] == "v1"
    assert cache.stats().stale_served == 3 and cache.stats().errors == 2


class Draw:
    """Stands in for random.random, so an XFetch decision is deterministic."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self) -> float:
        return self.value


def test_early_refresh_follows_the_xfetch_rule(
    backend: Backend, namespace: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Cache(backend, namespace=namespace, ttl=TTL, early_refresh=1.0, clock=clock)
    loads: list[int] = []

    def timed_load(core: object, loader: Callable[[], int], tags_of: object = None) -> Flow[Loaded]:
        loads.append(1)
        return Loaded(len(loads), 2.0)  # every load "takes" 2 s
        yield  # a flow that asks for nothing

    monkeypatch.setattr(fills, "timed_load", timed_load)
    assert cache.get_or_load("k", lambda: 0) == 1
    clock.advance(TTL - 1)  # 1 s before expiry, delta = 2 s
    # Refresh when -ln(U) * delta * beta >= 1 s, that is when U <= e^-0.5 ~ 0.607.
    monkeypatch.setattr(random, "random", Draw(1 - 0.7))  # U = 0.7: not yet
    assert cache.get_or_load("k", lambda: 0) == 1 and len(loads) == 1
    monkeypatch.setattr(random, "random", Draw(1 - 0.5))  # U = 0.5: refresh now
    assert cache.get_or_load("k", lambda: 0) == 2 and len(loads) == 2
    monkeypatch.setattr(random, "random", Draw(1 - 0.7))
    assert cache.get_or_load("k", lambda: 0) == 2  # the refreshed entry is fresh again
    assert cache.stats().stale_served == 0


@pytest.mark.parametrize("beta", [0, -1, float("nan"), "1", True])
def test_bad_early_refresh_is_refused(beta: object) -> None:
    with pytest.raises(ConfigurationError, match="early_refresh"):
        Cache(MemoryBackend(), early_refresh=beta)  # type: ignore[arg-type]
