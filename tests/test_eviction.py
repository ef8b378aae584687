"""MemoryBackend's eviction policies: their choices, their hit ratios against libCacheSim."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

from cachekit.backends.base import MISSING
from cachekit.backends.eviction import EVICTIONS, Eviction
from cachekit.backends.memory import MemoryBackend
from cachekit.bench.optimal import lru_hit_ratio
from cachekit.bench.workload import Trace, make_trace
from cachekit.exceptions import ConfigurationError
from tests.conftest import require

ROWS = 20_000
# A prefix of the bench's default trace (rows, Zipf 0.99, 5% writes, seed 1): long
# enough for every cache size to fill and settle, short enough to replay in a second.
REQUESTS = 40_000


def cached(backend: MemoryBackend, keys: str) -> str:
    """Which of the one-letter ``keys`` are held, without reading them: a read is a use."""
    return "".join(key for key in keys if key in backend._data)


def test_an_unknown_policy_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="lru, sieve, s3fifo"):
        MemoryBackend(eviction="lfu")  # type: ignore[arg-type]


@pytest.mark.parametrize("eviction", EVICTIONS)
def test_a_full_cache_keeps_maxsize_entries_and_counts_each_eviction(eviction: Eviction) -> None:
    backend = MemoryBackend(maxsize=20, eviction=eviction)
    for i in range(100):
        backend.set(str(i), i, None)
        backend.get(str(i // 2))
    assert len(backend) == 20
    assert backend.evictions == 80
    assert repr(backend).startswith("MemoryBackend(maxsize=20")
    assert (f"eviction={eviction!r}" in repr(backend)) == (eviction != "lru")


def test_sieve_keeps_a_visited_key_in_place_and_evicts_from_its_hand() -> None:
    backend = MemoryBackend(maxsize=3, eviction="sieve")
    for key in "abc":
        backend.set(key, key, None)
    backend.get("a")
    backend.set("a", "a2", None)  # a new value keeps the visited flag
    backend.set("d", "d", None)  # the hand passes a (clearing it) and evicts b
    assert cached(backend, "abcd") == "acd"
    backend.set("e", "e", None)  # the hand goes on from where it stopped: c
    assert cached(backend, "acde") == "ade"
    backend.set("f", "f", None)  # then d; a, passed once, has not been read since
    assert cached(backend, "adef") == "aef"
    backend.set("g", "g", None)  # the hand goes on towards the head (e), not to a
    assert cached(backend, "aefg") == "afg"


def test_lru_moves_a_read_key_to_the_end() -> None:
    backend = MemoryBackend(maxsize=3)
    for key in "abc":
        backend.set(key, key, None)
    backend.get("a")
    backend.set("d", "d", None)
    assert cached(backend, "abcd") == "acd"


def test_s3fifo_promotes_keys_read_twice_and_recalls_its_ghosts() -> None:
    # 20 entries: a small queue of 2, a main queue of 18, a ghost of 18 keys.
    backend = MemoryBackend(maxsize=20, eviction="s3fifo")
    keys = [f"k{i}" for i in range(20)]
    for key in keys:  # k0, k1 fill the small queue; the rest go to main while it fills
        backend.set(key, key, None)
    for key in ["k0", "k0", "k1"]:
        backend.get(key)
    backend.set("new", "new", None)  # k0 (read twice) goes to main; k1 (once) is evicted
    assert "k0" in backend._data
    assert "k1" not in backend._data
    backend.set("k1", "k1", None)  # k1 is in the ghost: to main, where k2 (unread) goes
    assert "k1" in backend._data
    assert "k2" not in backend._data
    # A one-time scan: its first key brings main back to its 18 (k3, unread, goes),
    # the rest pass through the small queue only.
    for i in range(50):
        backend.set(f"scan{i}", i, None)
    assert [key for key in keys if key not in backend._data] == ["k2", "k3"]
    assert len(backend) == 20


@pytest.mark.parametrize("eviction", ["sieve", "s3fifo"])
def test_scan_resistance_keeps_the_hot_keys_that_lru_loses(eviction: Eviction) -> None:
    policies = {name: MemoryBackend(maxsize=100, eviction=name) for name in ("lru", eviction)}
    for backend in policies.values():
        for round_ in range(3):
            for _ in range(3):  # 50 hot keys read three times...
                for i in range(50):
                    if backend.get(f"hot{i}") is MISSING:
                        backend.set(f"hot{i}", i, None)
            for i in range(200):  # ...then a one-time scan of 200 new keys
                backend.set(f"scan{round_}-{i}", i, None)
    survivors = {
        name: sum(f"hot{i}" in backend._data for i in range(50))
        for name, backend in policies.items()
    }
    assert survivors["lru"] == 0
    assert survivors[eviction] == 50


@pytest.mark.parametrize("eviction", EVICTIONS)
def test_a_forked_child_reconciles_a_half_done_write(eviction: Eviction) -> None:
    backend = MemoryBackend(maxsize=10, eviction=eviction)
    for i in range(10):
        backend.set(str(i), i, None)
    # What a thread killed mid-write by the fork leaves: an entry the order never saw,
    # and a key in the order whose entry is gone.
    del backend._data["3"]
    backend._data["x"] = ["x", None, 0]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            for i in range(100, 200):  # read twice: S3-FIFO's main queue turns over too
                backend.set(str(i), i, None)
                backend.get(str(i))
                backend.get(str(i))
            # The stray entry was evicted in its turn: the order knows it again.
            code = 0 if len(backend) == 10 and "x" not in backend._data else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("eviction", EVICTIONS)
def test_threads_reading_writing_and_deleting_leave_a_consistent_cache(
    eviction: Eviction,
) -> None:
    backend = MemoryBackend(maxsize=50, eviction=eviction)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(seed: int) -> None:
        try:
            start.wait()
            for i in range(5000):
                key = str((i * 7919 + seed * 104_729) % 300)
                if backend.get(key) is MISSING:
                    backend.set(key, i, None)
                if i % 17 == seed:
                    backend.delete(key)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(backend) <= 50
    for i in range(150):  # the order still matches the entries: eviction never trips
        backend.set(f"after{i}", i, None)
    assert len(backend) == 50


def replay(trace: Trace, backend: MemoryBackend) -> float:
    """The read hit ratio of cache-aside on ``backend``, as the bench runs it: a read
    that misses stores the row, a write deletes the key (the bench's invalidation)."""
    hits = reads = 0
    for id_, write in zip(trace.ids, trace.writes, strict=True):
        key = str(id_)
        if write:
            backend.delete(key)
            continue
        reads += 1
        if backend.get(key) is MISSING:
            backend.set(key, id_, None)
        else:
            hits += 1
    return hits / reads


def reference_replay(trace: Trace, eviction: Eviction, size: int) -> float:
    """The same replay on libCacheSim's implementation of the policy. A write removes
    the object only when it is cached, as ``MemoryBackend.delete`` forgets nothing
    else (S3-FIFO keeps a deleted key's ghost entry)."""
    try:
        import libcachesim
    except ImportError:
        require("libcachesim", False, "install the dev dependency group")
        raise
    make: Any = {"lru": libcachesim.LRU, "sieve": libcachesim.Sieve, "s3fifo": libcachesim.S3FIFO}
    cache = make[eviction](cache_size=size)
    hits = reads = 0
    for id_, write in zip(trace.ids, trace.writes, strict=True):
        request = libcachesim.Request(obj_id=id_, obj_size=1)
        if write:
            if cache.find(request, False) is not None:
                cache.remove(id_)
            continue
        reads += 1
        hits += cache.get(request)
    return hits / reads


@pytest.fixture(scope="module")
def trace() -> Trace:
    return make_trace(rows=ROWS, requests=REQUESTS, zipf=0.99, write_ratio=0.05, seed=1)


@pytest.mark.parametrize("share", [0.01, 0.05, 0.10, 0.25])
@pytest.mark.parametrize("eviction", EVICTIONS)
def test_hit_ratio_matches_libcachesim(trace: Trace, eviction: Eviction, share: float) -> None:
    size = int(ROWS * share)
    measured = replay(trace, MemoryBackend(maxsize=size, eviction=eviction))
    assert measured == pytest.approx(reference_replay(trace, eviction, size), abs=0.01)
    if eviction == "lru":  # and exactly the bench's own LRU simulation
        assert measured == lru_hit_ratio(trace.ids, trace.writes, size)
