"""Leases under forced interleavings: stale fills rejected, failed loads released, markers hidden.

Each test parks a loader on a ``threading.Event`` and performs the other side of the
race while it is parked, so the interleaving is exact on every backend, without sleeps.
A test never hangs: every wait is bounded by ``PARK`` and counts as a failure past it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cachekit import MISSING, Cache
from cachekit.backends.base import Backend
from cachekit.markers import is_marker
from tests.support import CountingBackend

# The longest a test waits for another thread; LEASE_TTL is far longer, so a waiter
# that finishes in time was woken by the protocol, not by its lease expiring.
pytestmark = pytest.mark.usefixtures("both_drivers")


PARK = 5.0
LEASE_TTL = 30.0


class Parked:
    """A loader that reads its value, signals, then waits to be released."""

    def __init__(self, read: Callable[[], Any], error: Exception | None = None) -> None:
        self.read = read
        self.error = error
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __cache_key__(self) -> None:
        return None  # decorated closures over a loader are keyed as if they had none

    def __call__(self) -> Any:
        self.calls += 1
        value = self.read()
        self.entered.set()
        if not self.release.wait(PARK):
            raise TimeoutError("the test never released this loader")
        if self.error is not None:
            raise self.error
        return value


class Call(threading.Thread):
    """Runs ``function`` in a daemon thread and keeps its result or exception."""

    def __init__(self, function: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.function = function
        self.result: Any = MISSING
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.function()
        except BaseException as exc:  # re-raised in the test's thread by finish()
            self.error = exc

    def finish(self) -> Any:
        """Join within ``PARK``; return the result or raise what the call raised."""
        self.join(PARK)
        assert not self.is_alive(), f"the call was still running after {PARK} s"
        if self.error is not None:
            raise self.error
        return self.result


class Threads:
    """The threads and parked loaders of one test, ended at teardown whatever happened."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.calls: list[Call] = []
        self.loaders: list[Parked] = []
        self.bkeys: list[str] = []

    def parked(self, read: Callable[[], Any], error: Exception | None = None) -> Parked:
        loader = Parked(read, error)
        self.loaders.append(loader)
        return loader

    def call(self, function: Callable[[], Any]) -> Call:
        """A thread for ``function``, not started yet."""
        call = Call(function)
        self.calls.append(call)
        return call

    def watch(self, cache: Cache, key: str) -> None:
        """A key whose lease teardown removes if a thread still waits on it."""
        self.bkeys.append(cache.backend_key(key))

    def stop(self) -> list[str]:
        for loader in self.loaders:
            loader.release.set()
        if any(call.is_alive() for call in self.calls):
            # A waiter on a lease nobody releases would poll for LEASE_TTL; an empty
            # key sends it to take a lease and load, which ends it.
            self.backend.delete_many(self.bkeys)
        for call in self.calls:
            if call.ident is not None:
                call.join(PARK)
        return [call.name for call in self.calls if call.is_alive()]


@pytest.fixture
def threads(backend: Backend) -> Iterator[Threads]:
    started = Threads(backend)
    yield started
    # Before the backend fixture closes the connections these threads use.
    assert started.stop() == [], "threads still running at teardown"


class LeaseObserver(CountingBackend):
    """Signals when an ``add`` finds the key taken: its caller is about to wait."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.found_lease = threading.Event()

    def add(self, key: str, value: Any, ttl: float | None) -> bool:
        added = super().add(key, value, ttl)
        if not added:
            self.found_lease.set()
        return added


def race_fill_against_write(
    threads: Threads, cache: Cache, write: Callable[[Cache], None]
) -> dict[str, str]:
    """A reader loads "v1"; while its loader is parked, the DB becomes "v2" and ``write``
    runs; then the reader fills. Returns the DB."""
    db = {"k": "v1"}
    loader = threads.parked(lambda: db["k"])
    reader = threads.call(lambda: cache.get_or_load("k", loader))
    threads.watch(cache, "k")
    reader.start()
    try:
        assert loader.entered.wait(PARK), "the reader never reached its loader"
        db["k"] = "v2"  # the write commits...
        write(cache)  # ...then invalidates or overwrites the cache
    finally:
        loader.release.set()
    assert reader.finish() == "v1"  # the reader's own answer predates the write
    assert loader.calls == 1
    return db


WRITES: dict[str, Callable[[Cache], None]] = {
    "delete": lambda cache: cache.delete("k"),
    "set": lambda cache: cache.set("k", "v2"),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_a_value_loaded_before_a_write_is_not_stored_after_it(
    backend: Backend, namespace: str, threads: Threads, write: str
) -> None:
    leased = Cache(backend, namespace=namespace + "l", lease_ttl=LEASE_TTL)
    db = race_fill_against_write(threads, leased, WRITES[write])
    assert leased.stats().fills_rejected == 1
    assert leased.get("k") == (MISSING if write == "delete" else "v2")
    assert leased.get_or_load("k", lambda: db["k"]) == "v2"

    # The race is real: without a lease the reader's fill lands after the write.
    naive = Cache(backend, namespace=namespace + "n", lease_ttl=None)
    db = race_fill_against_write(threads, naive, WRITES[write])
    assert naive.get("k") == "v1"
    assert naive.get_or_load("k", lambda: db["k"]) == "v1"  # and stays, until the TTL
    assert naive.stats().fills_rejected == 0


@pytest.mark.parametrize("waiter_fails", [False, True], ids=["waiter-loads", "waiter-fails-too"])
def test_a_failed_load_hands_the_lease_to_a_waiter_at_once(
    backend: Backend, namespace: str, threads: Threads, waiter_fails: bool
) -> None:
    """The holder's loader raises while another caller waits on the key.

    Defined behaviour: the holder re-raises and releases its lease; the waiter,
    polling, sees the key free, takes a new lease and runs its own loader (once),
    without waiting for the 30 s lease to expire. Nothing of the failed load is
    stored; the waiter's result is stored if its loader succeeds, and if that fails
    too, the key is left empty (no value, no marker).
    """
    holder_cache = Cache(backend, namespace=namespace, lease_ttl=LEASE_TTL)
    observer = LeaseObserver(backend)
    waiter_cache = Cache(observer, namespace=namespace, lease_ttl=LEASE_TTL)
    failing = threads.parked(lambda: "never stored", error=RuntimeError("database down"))
    waiter_loads: list[str] = []

    def waiter_load() -> str:
        waiter_loads.append("called")
        if waiter_fails:
            raise RuntimeError("still down")
        return "fresh"

    holder = threads.call(lambda: holder_cache.get_or_load("k", failing))
    waiter = threads.call(lambda: waiter_cache.get_or_load("k", waiter_load))
    threads.watch(holder_cache, "k")
    holder.start()
    try:
        assert failing.entered.wait(PARK), "the holder never reached its loader"
        waiter.start()
        assert observer.found_lease.wait(PARK), "the waiter never found the lease"
    finally:
        failing.release.set()
    with pytest.raises(RuntimeError, match="database down"):
        holder.finish()

    assert holder_cache.stats().loads == 0  # a loader that raised loaded nothing
    if waiter_fails:
        with pytest.raises(RuntimeError, match="still down"):
            waiter.finish()
        assert backend.get(holder_cache.backend_key("k")) is MISSING
        assert holder_cache.get_or_load("k", lambda: "third") == "third"  # no lease left
    else:
        assert waiter.finish() == "fresh"
        assert holder_cache.get("k") == "fresh"
    assert waiter_loads == ["called"]
    assert waiter_cache.stats().lease_waits == 1


@pytest.mark.parametrize("key", [None, "item:{n}"], ids=["default-key", "template-key"])
def test_a_lease_marker_is_never_returned_as_a_value(
    backend: Backend, namespace: str, threads: Threads, key: str | None
) -> None:
    cache = Cache(backend, namespace=namespace, lease_ttl=LEASE_TTL)
    observer = LeaseObserver(backend)
    other_cache = Cache(observer, namespace=namespace, lease_ttl=LEASE_TTL)
    loader = threads.parked(lambda: "item 1")

    def item(n: int) -> str:
        return loader()  # type: ignore[no-any-return]

    # Two decorations of one function: same keys, different caches, so one call can
    # hold the lease while the other runs the decorated hit path against the marker.
    held = cache.cached(key=key)(item)
    other = other_cache.cached(key=key)(item)
    logical = held.key(1)
    cache.set("other", "o")

    holder = threads.call(lambda: held(1))
    waiter = threads.call(lambda: other(1))
    threads.watch(cache, logical)
    holder.start()
    try:
        assert loader.entered.wait(PARK), "the holder never reached its loader"
        assert is_marker(backend.get(cache.backend_key(logical)))  # there is one to leak
        assert cache.get(logical) is MISSING
        assert cache.get(logical, "default") == "default"
        assert cache.get_many([logical, "other"]) == {"other": "o"}
        waiter.start()
        assert observer.found_lease.wait(PARK), "the decorated call did not wait"
        assert waiter.is_alive()
    finally:
        loader.release.set()
    assert holder.finish() == "item 1"
    assert waiter.finish() == "item 1"
    assert loader.calls == 1
    assert other_cache.stats().lease_waits == 1
