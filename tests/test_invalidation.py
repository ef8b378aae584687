"""Key sets (tags): bulk invalidation in bounded round trips, and no stale fills."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from cachekit import MISSING, Cache
from cachekit.backends.base import Backend
from cachekit.backends.memory import MemoryBackend
from cachekit.backends.redis import RedisBackend
from cachekit.keys import make_backend_key
from tests.support import CountingBackend

pytestmark = pytest.mark.usefixtures("both_drivers")


@pytest.fixture
def cache(backend: Backend, namespace: str) -> Cache:
    return Cache(backend, namespace=namespace, ttl=300)


def test_invalidating_a_tag_removes_its_entries_only(cache: Cache) -> None:
    cache.set("report:7", {"total": 3}, tags=["order:1", "order:2"])
    cache.set("report:8", {"total": 4}, tags=["order:3"])
    cache.set("plain", 1)
    assert cache.get("report:7") == {"total": 3}
    cache.invalidate_tags(["order:2", "order:99"])
    assert cache.get("report:7") is MISSING
    assert cache.get("report:8") == {"total": 4}
    assert cache.get("plain") == 1
    cache.set("report:7", {"total": 5}, tags=["order:1", "order:2"])  # refilled: valid again
    assert cache.get_many(["report:7", "report:8", "plain"]) == {
        "report:7": {"total": 5},
        "report:8": {"total": 4},
        "plain": 1,
    }
    cache.invalidate_tags(["order:3", "order:1"])
    assert cache.get_many(["report:7", "report:8", "plain"]) == {"plain": 1}


def test_round_trips_are_bounded(namespace: str) -> None:
    backend = CountingBackend(MemoryBackend())
    cache = Cache(backend, namespace=namespace)
    for i in range(50):
        cache.set(f"e{i}", i, tags=[f"t{i}", "all"])
    cache.set("untagged", 0)
    backend.calls.clear()
    assert cache.get("untagged") == 0
    assert sum(backend.calls.values()) == 1  # untagged hit: one round trip
    backend.calls.clear()
    assert cache.get("e1") == 1
    assert backend.calls == {"get": 1, "get_many": 1}  # tagged hit: two
    backend.calls.clear()
    assert len(cache.get_many([f"e{i}" for i in range(50)])) == 50
    assert backend.calls == {"get_many": 2}  # entries, then all their tokens
    backend.calls.clear()
    cache.invalidate_tags([f"t{i}" for i in range(1000)] + ["all"])
    assert backend.calls == {"set": 1, "delete_many": 1}  # any number of tags and entries
    assert cache.get_many([f"e{i}" for i in range(50)]) == {}


def test_decorated_results_with_tags_from_the_result(cache: Cache) -> None:
    orders = {3: [{"id": 1}, {"id": 2}]}
    calls: list[int] = []

    @cache.cached(
        ttl=60, tags=lambda result, org_id: [f"org:{org_id}"] + [f"order:{o['id']}" for o in result]
    )
    def orders_of(org_id: int) -> list[dict[str, int]]:
        calls.append(org_id)
        return list(orders[org_id])

    assert orders_of(3) == [{"id": 1}, {"id": 2}]
    assert orders_of(3) and calls == [3]
    orders[3] = [{"id": 1}, {"id": 2}, {"id": 5}]
    cache.invalidate_tags(["order:2"])
    assert orders_of(3) == orders[3] and calls == [3, 3]
    cache.invalidate_tags(["order:5"])
    orders_of(3)
    assert calls == [3, 3, 3]


def test_views_tag_their_entries(cache: Cache) -> None:
    rows = {1: {"org": 7}, 2: {"org": 7}, 3: {"org": 8}}
    users = cache.read_through(
        "user",
        load=rows.get,
        load_many=lambda ids: {i: rows[i] for i in ids if i in rows},
        tags=lambda id_, row: [f"org:{row['org']}"] if row else [],
    )
    assert users.get_many([1, 2, 3]) == rows
    rows[1] = {"org": 9}
    cache.invalidate_tags(["org:7"])
    assert cache.get(users.key(1)) is MISSING and cache.get(users.key(3)) == {"org": 8}
    assert users.get(1) == {"org": 9}


def test_a_fill_racing_an_invalidation_is_not_stored(cache: Cache) -> None:
    """Reader loads v1, a writer commits v2 and invalidates the tag, the reader stores."""
    record = {"v": 1}
    parked, resume = threading.Event(), threading.Event()

    def load() -> dict[str, int]:
        value = dict(record)
        parked.set()
        assert resume.wait(10)
        return value

    result: list[Any] = []
    reader = threading.Thread(
        target=lambda: result.append(cache.get_or_load("row", load, tags=["row:1"]))
    )
    reader.start()
    assert parked.wait(10)
    record["v"] = 2
    cache.invalidate_tags(["row:1"])
    resume.set()
    reader.join(10)
    assert result == [{"v": 1}]  # the caller still gets what it loaded
    assert cache.get("row") is MISSING  # but it was not stored
    assert cache.stats().fills_rejected == 1
    assert cache.get_or_load("row", lambda: dict(record), tags=["row:1"]) == {"v": 2}
    assert cache.get("row") == {"v": 2}


def test_a_lost_token_turns_entries_into_misses(cache: Cache, backend: Backend) -> None:
    cache.set("e", 1, tags=["t"])
    # The token key was evicted or expired: "ns#tag:t" is where it lives.
    backend.delete(
        make_backend_key(cache.namespace + "#", "tag:t", backend.capabilities.key_policy)
    )
    assert cache.get("e") is MISSING


@pytest.mark.redis
def test_token_keys_expire(redis_client: Any, redis_server: str, namespace: str) -> None:
    backend = RedisBackend.from_url(redis_server, timeout=2.0)
    try:
        cache = Cache(backend, namespace=namespace, ttl=60)
        cache.set("e", 1, tags=["t"])
        assert 0 < redis_client.pttl(f"{namespace}#tag:t") <= 120_000
        assert 0 < redis_client.pttl(f"{namespace}:e") <= 60_000
    finally:
        backend.delete_many([f"{namespace}#tag:t", f"{namespace}#epoch", f"{namespace}:e"])
        backend.close()
