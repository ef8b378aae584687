"""Redis Cluster: batches across slots and nodes, leases, key sets, bulk invalidation.

The backend contract and the facade suites already run on the cluster (the
``redis-cluster`` id of the ``backend`` fixture); these tests check what is particular
to it: that every key lives on the node owning its slot, that batches really span
nodes, and that the batch compare-and-set works where ``ClusterPipeline`` refuses
``Script`` calls, including on nodes that have never seen the script.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster, key_slot
from redis.exceptions import SlotNotCoveredError

from cachekit import MISSING, Cache
from cachekit.backends.redis import RedisBackend
from cachekit.keys import encode_key
from tests.conftest import cluster_client

pytestmark = pytest.mark.redis_cluster

KEYS = 60  # enough to land on all three nodes


@pytest.fixture
def client(redis_cluster: tuple[str, int]) -> Iterator[RedisCluster]:
    built = cluster_client(redis_cluster)
    yield built
    built.close()


@pytest.fixture
def backend(client: RedisCluster, namespace: str) -> Iterator[RedisBackend]:
    yield RedisBackend(client)
    left = list(client.scan_iter(match=namespace + "*"))  # every primary's keys
    if left:
        client.delete(*left)  # split by slot


@pytest.fixture
def cache(backend: RedisBackend, namespace: str) -> Cache:
    return Cache(backend, namespace=namespace, ttl=60)


def owner(client: RedisCluster, bkey: str) -> tuple[str, int]:
    """The node that serves ``bkey``'s slot, by the cluster's own slot map."""
    node = client.nodes_manager.get_node_from_slot(key_slot(encode_key(bkey)))
    return node.host, node.port


def stored_on(client: RedisCluster, bkeys: list[str]) -> dict[str, tuple[str, int]]:
    """Where each key actually is: asked of every primary directly, not via the client."""
    found: dict[str, tuple[str, int]] = {}
    for node in client.get_primaries():
        direct = redis.Redis(node.host, node.port, socket_timeout=2.0)
        try:
            for bkey in bkeys:
                slot = key_slot(encode_key(bkey))
                if direct.cluster("COUNTKEYSINSLOT", slot) and direct.exists(encode_key(bkey)):
                    found[bkey] = (node.host, node.port)
        finally:
            direct.close()
    return found


def nodes_of(client: RedisCluster, bkeys: list[str]) -> set[tuple[str, int]]:
    return {owner(client, bkey) for bkey in bkeys}


def scripts_known(client: RedisCluster, backend: RedisBackend) -> list[bool]:
    """Whether each primary has the compare-and-set script, asked directly."""
    known = []
    for node in client.get_primaries():
        direct = redis.Redis(node.host, node.port, socket_timeout=2.0)
        try:
            known += direct.script_exists(backend._compare_and_set.sha)
        finally:
            direct.close()
    return known


def test_batches_span_slots_and_every_key_is_on_its_slots_node(
    cache: Cache, client: RedisCluster
) -> None:
    items = {f"k{i}": {"i": i} for i in range(KEYS)}
    cache.set_many(items)  # MSET split by slot
    cache.set_many({f"t{i}": i for i in range(KEYS)}, ttl=None)
    bkeys = [cache.backend_key(key) for key in items]
    assert len(nodes_of(client, bkeys)) == 3  # the batch really crossed every node
    assert len({key_slot(encode_key(bkey)) for bkey in bkeys}) > 50
    assert stored_on(client, bkeys) == {bkey: owner(client, bkey) for bkey in bkeys}
    assert cache.get_many([*items, "absent"]) == items  # MGET split by slot
    cache.delete_many(list(items)[: KEYS // 2])  # DEL split by slot
    assert cache.get_many(list(items)) == dict(list(items.items())[KEYS // 2 :])


def test_batch_compare_and_set_on_nodes_without_the_script(
    backend: RedisBackend, client: RedisCluster, namespace: str
) -> None:
    """NOSCRIPT from a node (restarted, or never used) is answered by loading the
    script on every primary and running only the refused calls again."""
    bkeys = [f"{namespace}:cas{i}" for i in range(KEYS)]
    assert len(nodes_of(client, bkeys)) == 3
    backend.set_many(dict.fromkeys(bkeys, b"lease"), 60)
    client.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.PRIMARIES)
    assert scripts_known(client, backend) == [False, False, False]
    swaps: dict[str, tuple[Any, Any]] = {bkey: (b"lease", b"value") for bkey in bkeys[::2]}
    swaps.update({bkey: (b"not the lease", b"value") for bkey in bkeys[1::2]})
    assert backend.compare_and_set_many(swaps, 60) == set(bkeys[::2])
    assert scripts_known(client, backend) == [True, True, True]
    found = backend.get_many(bkeys)
    assert found == {bkey: b"value" if i % 2 == 0 else b"lease" for i, bkey in enumerate(bkeys)}
    client.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.PRIMARIES)
    assert backend.compare_and_set(bkeys[1], b"lease", b"one", None) is True


def test_leases_make_one_loader_call_per_key_across_threads(cache: Cache) -> None:
    threads = 8
    barrier = threading.Barrier(threads)
    calls: list[int] = []
    lock = threading.Lock()

    def load(i: int) -> int:
        with lock:
            calls.append(i)
        return i * 10

    def race(i: int) -> list[int]:
        barrier.wait()
        return [cache.get_or_load(f"hot{k}", lambda k=k: load(k)) for k in range(12)]

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(race, range(threads)))
    assert results == [[k * 10 for k in range(12)]] * threads
    assert sorted(calls) == list(range(12))  # one load per key, on keys of every node


def test_read_through_batches_lease_and_fill_across_nodes(
    cache: Cache, client: RedisCluster
) -> None:
    batches: list[list[int]] = []

    def load_many(ids: list[int]) -> dict[int, dict[str, int]]:
        batches.append(sorted(ids))
        return {i: {"id": i} for i in ids if i % 7}

    users = cache.read_through("user", load=lambda i: {"id": i}, load_many=load_many)
    ids = list(range(KEYS))
    assert len(nodes_of(client, [cache.backend_key(users.key(i)) for i in ids])) == 3
    expected = {i: {"id": i} for i in ids if i % 7}  # the others: no such row
    assert users.get_many(ids) == expected  # add_many, one load_many, cas_many
    assert batches == [ids]
    assert users.get_many(ids) == expected  # all hits now, absent rows included
    assert batches == [ids]
    assert cache.stats().fills_rejected == 0
    users.invalidate_many(ids[:30])
    assert users.get_many(ids) == expected
    assert batches == [ids, ids[:30]]


def test_key_sets_invalidate_tagged_entries_on_every_node(
    cache: Cache, client: RedisCluster
) -> None:
    for i in range(KEYS):
        cache.set(f"report:{i}", {"i": i}, tags=[f"org:{i % 3}", f"order:{i}"])
    bkeys = [cache.backend_key(f"report:{i}") for i in range(KEYS)]
    assert len(nodes_of(client, bkeys)) == 3
    token_keys = [key.decode() for key in client.scan_iter(match=f"{cache.namespace}#*")]
    assert len(token_keys) == 3 + KEYS  # the org tags and order tags' tokens
    assert len(nodes_of(client, token_keys)) == 3
    assert stored_on(client, token_keys) == {key: owner(client, key) for key in token_keys}

    cache.invalidate_tags(["org:1", "order:0"])  # two round trips, tokens on several nodes
    gone = {i for i in range(KEYS) if i % 3 == 1 or i == 0}
    for i in range(KEYS):
        assert (cache.get(f"report:{i}") is MISSING) == (i in gone)

    @cache.cached(tags=lambda result, org: [f"org:{org}"])
    def org_report(org: int) -> dict[str, int]:
        return {"org": org}

    assert [org_report(org) for org in range(3)] == [{"org": org} for org in range(3)]
    cache.invalidate_tags(["org:2"])
    assert cache.get(org_report.key(2)) is MISSING
    assert cache.get(org_report.key(0)) == {"org": 0}


def test_cluster_errors_are_backend_errors_and_reads_fail_open(
    cache: Cache, backend: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot without a node raises RedisClusterException, which is not a RedisError."""

    def uncovered(*args: Any, **kwargs: Any) -> Any:
        raise SlotNotCoveredError("slot 42 is not covered by the cluster")

    monkeypatch.setattr(backend.client, "get", uncovered)
    monkeypatch.setattr(backend.client, "set", uncovered)
    assert cache.get_or_load("k", lambda: "loaded") == "loaded"
    assert cache.stats().errors >= 1
