"""Losing a coordination key (epoch, tag token, lease marker) costs a reload, never a
stale value: on every backend, the key is removed behind the cache's back, as an
eviction, a flush on a pool node's rejoin or a server restart would."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from pymemcache.client.base import Client

from cachekit import MISSING, Cache
from cachekit.backends.base import Backend
from cachekit.backends.memcached import MemcachedBackend
from cachekit.backends.memory import MemoryBackend
from cachekit.backends.redis import RedisBackend
from cachekit.keys import make_backend_key
from cachekit.markers import is_marker
from tests.conftest import require
from tests.servers import Servers, binary, memcached_command
from tests.support import FakeClock

pytestmark = pytest.mark.usefixtures("both_drivers")


@pytest.fixture
def cache(backend: Backend, namespace: str) -> Cache:
    return Cache(backend, namespace=namespace, ttl=300)


def _epoch_key(cache: Cache) -> str:
    return make_backend_key(cache.namespace + "#", "epoch", cache.store.capabilities.key_policy)


def _tag_key(cache: Cache, tag: str) -> str:
    return make_backend_key(
        cache.namespace + "#", "tag:" + tag, cache.store.capabilities.key_policy
    )


@pytest.mark.parametrize("after_loss", ["nothing", "another fill", "another invalidation"])
def test_a_tagged_fill_straddling_an_invalidation_and_a_lost_epoch_is_not_stored(
    cache: Cache, backend: Backend, after_loss: str
) -> None:
    """The namespace is fresh (no epoch yet) when the load begins; another process
    invalidates the tag while it loads; then the epoch key is lost (evicted, flushed).
    The value loaded before the invalidation must not be stored."""
    other = Cache(backend, namespace=cache.namespace, ttl=300)  # another process
    row = {"version": 1}

    def load() -> dict[str, int]:
        seen = dict(row)  # read from the database before the write commits...
        row["version"] = 2  # ...then another process commits an update
        other.invalidate_tags(["row:1"])  # and invalidates the tag
        backend.delete(_epoch_key(cache))  # the epoch is evicted
        if after_loss == "another fill":
            other.get_or_load("unrelated", lambda: 0, tags=["row:9"])
        elif after_loss == "another invalidation":
            other.invalidate_tags(["row:9"])
        return seen

    assert cache.get_or_load("row:1", load, tags=["row:1"]) == {"version": 1}
    assert cache.get("row:1") is MISSING  # not stored: a later read loads version 2
    assert other.get_or_load("row:1", lambda: dict(row), tags=["row:1"]) == {"version": 2}
    assert cache.get("row:1") == {"version": 2}


def test_a_lost_epoch_between_fills_only_costs_reloads(cache: Cache, backend: Backend) -> None:
    assert cache.get_or_load("a", lambda: 1, tags=["t"]) == 1
    backend.delete(_epoch_key(cache))
    assert cache.get("a") == 1  # entries do not depend on the epoch, only fills
    assert cache.get_or_load("b", lambda: 2, tags=["t"]) == 2
    assert cache.get("b") == 2  # a fill after the loss recreated it and was stored


def test_a_lost_tag_token_turns_its_entries_into_misses(cache: Cache, backend: Backend) -> None:
    cache.set("report", {"total": 1}, tags=["order:1"])
    backend.delete(_tag_key(cache, "order:1"))  # evicted
    assert cache.get("report") is MISSING
    cache.set("other", 2, tags=["order:1"])  # recreates the token with a new value
    assert cache.get("report") is MISSING  # the old entry never matches it again
    assert cache.get("other") == 2


def test_a_lost_lease_marker_rejects_the_fill(cache: Cache, backend: Backend) -> None:
    bkey = cache.backend_key("k")

    def load() -> str:
        assert is_marker(backend.get(bkey))
        backend.delete(bkey)  # the lease is evicted while the loader runs
        backend.set(bkey, b"newer" if not backend.capabilities.stores_objects else "newer", 60)
        return "loaded before"

    assert cache.get_or_load("k", load) == "loaded before"
    assert cache.stats().fills_rejected == 1
    assert backend.get(bkey) in (b"newer", "newer")  # never overwritten by the old load


def test_tag_tokens_expire_even_without_a_ttl(namespace: str) -> None:
    clock = FakeClock()
    backend = MemoryBackend(timer=clock)
    cache = Cache(backend, namespace=namespace, ttl=None)
    cache.set("forever", 1, tags=["t"])
    assert cache.get("forever") == 1
    clock.advance(3 * 24 * 3600)
    assert backend.get(_tag_key(cache, "t")) is MISSING  # the token went...
    assert cache.get("forever") is MISSING  # ...so its entry is a miss, not a leak


@pytest.mark.redis
def test_tag_tokens_on_redis_carry_a_ttl(redis_server: str, namespace: str) -> None:
    backend = RedisBackend.from_url(redis_server, timeout=2.0)
    client: redis.Redis = backend.client
    try:
        cache = Cache(backend, namespace=namespace, ttl=None)
        cache.set("forever", 1, tags=["t"])
        cache.get_or_load("loaded", lambda: 2, tags=["u"])
        keys: list[Callable[[], str]] = [
            lambda: _tag_key(cache, "t"),
            lambda: _tag_key(cache, "u"),
            lambda: _epoch_key(cache),
        ]
        for key in keys:
            assert 0 < client.ttl(key()) <= 2 * 24 * 3600
    finally:
        keys_left = list(client.scan_iter(match=namespace + "*"))
        if keys_left:
            client.delete(*keys_left)
        backend.close()


@pytest.mark.memcached
def test_a_real_memcached_eviction_of_the_epoch_never_stores_a_stale_fill(
    tmp_path: Path, namespace: str
) -> None:
    """Not rigged: the epoch is evicted by memory pressure in a small memcached, the way a
    busy one evicts it, while the fill's lease marker (read meanwhile) survives."""
    require("the memcached binary", binary("memcached") is not None)
    with Servers(tmp_path) as servers:
        server = servers.start("memcached", memcached_command(memory_mb=2))
        backend = MemcachedBackend(server.address, timeout=2.0, connect_timeout=2.0)
        flood = Client((server.host, server.port), timeout=2.0, connect_timeout=2.0)
        try:
            cache = Cache(backend, namespace=namespace, ttl=300)
            other = Cache(backend, namespace=namespace, ttl=300)
            lease_key, epoch_key = cache.backend_key("row:1"), _epoch_key(cache)

            def load() -> dict[str, int]:
                other.invalidate_tags(["row:1"])  # another process, after our read
                filler = b"x" * len(backend.get(epoch_key))
                for batch in range(200):  # fill the epoch's slab class until it goes
                    flood.set_many({f"f{batch}:{i}": filler for i in range(2000)}, noreply=True)
                    assert is_marker(backend.get(lease_key))  # read: it stays warm
                    # Meta get with "u": look without bumping it in the LRU.
                    if flood.raw_command(f"mg {epoch_key} u", b"\r\n").startswith(b"EN"):
                        break
                else:
                    pytest.fail("the flood never evicted the epoch")
                return {"version": 1}

            assert cache.get_or_load("row:1", load, tags=["row:1"]) == {"version": 1}
            assert cache.get("row:1") is MISSING
        finally:
            flood.close()
            backend.close()
