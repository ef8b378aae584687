"""The Cache facade on every backend: values, TTLs, batches, negative caching, failures."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest

from cachekit import (
    MISSING,
    BackendError,
    Cache,
    ConfigurationError,
    SerializationError,
)
from cachekit.backends.base import Backend
from cachekit.backends.memory import MemoryBackend
from cachekit.markers import MARKER_BYTE, Marker
from cachekit.serializers import PickleSerializer
from tests.support import CountingBackend, FailingBackend, FakeClock

pytestmark = pytest.mark.usefixtures("both_drivers")


ODD_KEYS = ["with space", "ctl\x00\x01\n", "ünïcødé ключ 鍵", "\ud800", "k" * 1024, "#hash-like"]
FALSY = [0, "", False, [], {}, 0.0]


@pytest.fixture
def cache(backend: Backend, namespace: str) -> Cache:
    return Cache(backend, namespace=namespace, ttl=300)


def test_a_miss_is_missing_or_the_default(cache: Cache) -> None:
    assert cache.get("absent") is MISSING
    assert cache.get("absent", default=None) is None


@pytest.mark.parametrize("value", [None, *FALSY, {"id": 7, "tags": ["a"]}], ids=repr)
def test_every_value_is_a_hit_including_none_and_falsy(cache: Cache, value: Any) -> None:
    cache.set("k", value)
    assert cache.get("k", default="miss") == value
    assert cache.stats().hits == 1


@pytest.mark.parametrize("key", ODD_KEYS, ids=lambda k: repr(k)[:20])
def test_any_string_is_a_key(cache: Cache, key: str) -> None:
    cache.set(key, "value")
    cache.set(key + "x", "other")
    assert cache.get(key) == "value"
    cache.delete(key)
    assert cache.get(key) is MISSING
    assert cache.get(key + "x") == "other"


def test_namespaces_are_isolated(backend: Backend, namespace: str) -> None:
    one = Cache(backend, namespace=namespace + "a")
    two = Cache(backend, namespace=namespace + "b")
    one.set("k", 1)
    assert two.get("k") is MISSING
    assert one.backend_key("k") == namespace + "a:k"


def test_batches(cache: Cache) -> None:
    cache.set_many({"a": 1, "b": None, "c": [3]})
    assert cache.get_many(["a", "b", "c", "d"]) == {"a": 1, "b": None, "c": [3]}
    cache.delete_many(["a", "c", "never-set"])
    assert cache.get_many(["a", "b", "c"]) == {"b": None}
    assert cache.get_many([]) == {}
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (4, 3)


def test_delete_is_idempotent(cache: Cache) -> None:
    cache.delete("never-set")
    cache.set("k", 1)
    cache.delete("k")
    cache.delete("k")
    assert cache.get("k") is MISSING


def test_get_or_load_loads_once_and_counts(cache: Cache) -> None:
    calls: list[int] = []

    def load() -> dict[str, int]:
        calls.append(1)
        return {"v": 1}

    assert cache.get_or_load("k", load) == {"v": 1}
    assert cache.get_or_load("k", load) == {"v": 1}
    assert len(calls) == 1
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.errors) == (1, 1, 1, 0)
    assert stats.hit_ratio == 0.5


def test_a_failing_loader_caches_nothing(cache: Cache) -> None:
    def boom() -> int:
        raise LookupError("db down")

    with pytest.raises(LookupError):
        cache.get_or_load("k", boom)
    assert cache.get("k") is MISSING


def test_ttl_and_negative_caching_on_an_injected_clock() -> None:
    clock = FakeClock()
    cache = Cache(MemoryBackend(timer=clock), namespace="n", ttl=60, none_ttl=5)
    cache.get_or_load("row", lambda: {"id": 1})
    cache.get_or_load("gone", lambda: None)
    cache.set("forever", 1, ttl=None)
    cache.set("short", 1, ttl=timedelta(seconds=2))
    clock.advance(3)
    assert cache.get("short") is MISSING
    assert cache.get("gone", default="miss") is None
    clock.advance(3)
    assert cache.get("gone") is MISSING  # none_ttl is the shorter TTL
    assert cache.get("row") == {"id": 1}
    clock.advance(60)
    assert cache.get("row") is MISSING
    assert cache.get("forever") == 1


def test_none_ttl_zero_disables_negative_caching() -> None:
    cache = Cache(MemoryBackend(), namespace="n", none_ttl=0)
    calls: list[int] = []
    for _ in range(3):
        cache.get_or_load("gone", lambda: calls.append(1))
    assert len(calls) == 3


def test_none_ttl_defaults_to_at_most_thirty_seconds() -> None:
    assert Cache(MemoryBackend(), ttl=300).none_ttl == 30
    assert Cache(MemoryBackend(), ttl=5).none_ttl == 5
    assert Cache(MemoryBackend(), ttl=None).none_ttl == 30


@pytest.mark.parametrize("ttl", [0, -1, "60", True])
def test_bad_ttls_are_refused(ttl: Any) -> None:
    with pytest.raises(ConfigurationError):
        Cache(MemoryBackend(), ttl=ttl)
    with pytest.raises(ConfigurationError):
        Cache(MemoryBackend()).set("k", 1, ttl=ttl)


def test_misconfiguration_fails_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="Backend"):
        Cache(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="namespace"):
        Cache(MemoryBackend(), namespace="has space")
    with pytest.raises(ConfigurationError, match="dumps"):
        Cache(MemoryBackend(), serializer=object())  # type: ignore[arg-type]


def test_unserializable_values_raise_a_type_error(backend: Backend, namespace: str) -> None:
    if backend.capabilities.stores_objects:
        pytest.skip("the memory backend stores objects by reference")
    cache = Cache(backend, namespace=namespace)
    with pytest.raises(SerializationError) as info:
        cache.set("k", object())
    assert isinstance(info.value, TypeError)


def test_memory_stores_by_reference() -> None:
    cache = Cache(MemoryBackend(), namespace="n")
    value = {"a": 1}
    cache.set("k", value)
    assert cache.get("k") is value


def test_reads_fail_open_and_count(namespace: str) -> None:
    backend = FailingBackend(MemoryBackend())
    cache = Cache(backend, namespace=namespace)
    assert cache.get("k", default="fallback") == "fallback"
    assert cache.get_many(["a", "b"]) == {}
    assert cache.get_or_load("k", lambda: 42) == 42
    stats = cache.stats()
    assert stats.errors == 4  # get, get_many, get in get_or_load, and its fill
    assert stats.loads == 1 and stats.hits == 0


def test_failed_invalidations_are_journaled_never_dropped(namespace: str) -> None:
    inner = MemoryBackend()
    failing = FailingBackend(inner)
    cache = Cache(failing, namespace=namespace, breaker=None)
    inner.set(cache.backend_key("k"), "old", None)
    cache.delete("k")  # the server is down: journaled, not raised
    cache.delete_many(["a", "b"])
    cache.invalidate_tags(["t"])
    stats = cache.stats()
    assert stats.invalidations_deferred == 4 and stats.pending_invalidations == 4
    with pytest.raises(BackendError, match="journal full"):
        cache.journal.limit = 4
        cache.delete("one too many")


def test_undecodable_entries_are_misses_that_are_counted_and_deleted(
    backend: Backend, namespace: str
) -> None:
    if backend.capabilities.stores_objects:
        pytest.skip("the memory backend stores objects, not bytes")
    cache = Cache(backend, namespace=namespace, serializer=PickleSerializer(secret=b"k" * 32))
    bkey = cache.backend_key("k")
    backend.set(bkey, b"ckp1:sha256:" + b"\x00" * 32 + b"forged", None)
    assert cache.get("k") is MISSING
    assert cache.stats().decode_errors == 1
    assert backend.get(bkey) is MISSING


def test_cachekit_markers_are_never_returned(backend: Backend, namespace: str) -> None:
    # A foreign lease that never expires: the waiter gives up after lease_ttl + 1 s.
    cache = Cache(backend, namespace=namespace, lease_ttl=0.1, lease_poll=0.01)
    bkey = cache.backend_key("k")
    marker = Marker(b"t") if backend.capabilities.stores_objects else MARKER_BYTE + b"lease"
    backend.set(bkey, marker, None)
    assert cache.get("k") is MISSING
    assert cache.get_many(["k"]) == {}
    assert cache.get_or_load("k", lambda: 1) == 1


def test_batches_are_one_backend_call(namespace: str) -> None:
    backend = CountingBackend(MemoryBackend())
    cache = Cache(backend, namespace=namespace)
    keys = [f"k{i}" for i in range(100)]
    cache.set_many(dict.fromkeys(keys, 1))
    cache.get_many(keys)
    cache.delete_many(keys)
    assert backend.calls == {"set_many": 1, "get_many": 1, "delete_many": 1}


def test_concurrent_readers_and_writers_stay_consistent() -> None:
    cache = Cache(MemoryBackend(maxsize=50), namespace="n")
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(2000):
                key = f"k{(seed * 7 + i) % 80}"
                if i % 3:
                    value = cache.get(key)
                    assert value is MISSING or value == key
                else:
                    cache.set(key, key)
                if i % 50 == 0:
                    cache.delete(key)
        except BaseException as exc:  # surfaced to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache.backend) <= 50  # type: ignore[arg-type]


def test_set_many_gives_none_values_the_none_ttl() -> None:
    clock = FakeClock()
    cache = Cache(MemoryBackend(timer=clock), namespace="n", ttl=300, none_ttl=30)
    cache.set("a", None)
    cache.set_many({"b": None, "c": 1})
    clock.advance(31)
    assert cache.get_many(["a", "b", "c"]) == {"c": 1}
