"""Fork safety: a backend used before ``os.fork()`` works in every child, and in the parent.

Real forks (``tests.forking``): the parent uses the backend, so it holds open
connections, then forks children that use the same backend object while the parent
keeps using it too. Every process must read back exactly what it wrote, with no
exception. Sharing an inherited socket, each process would read replies meant for
another (wrong values, or pymemcache's ``KeyError``). A lock another thread holds at
the instant of the fork must not block the child.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pymemcache.client.base import Client, PooledClient
from pymemcache.client.hash import HashClient

from cachekit import MISSING, Cache
from cachekit.backends.base import Backend
from cachekit.backends.memcached import MemcachedBackend
from cachekit.backends.memcached_pool import _Node
from cachekit.backends.memory import MemoryBackend
from cachekit.backends.redis import RedisBackend
from cachekit.breaker import CircuitBreaker
from cachekit.core.journal import Journal
from cachekit.keys import encode_key
from tests.conftest import cluster_client
from tests.forking import in_children

CHILDREN = 4
ROUNDS = 150

pytestmark = pytest.mark.slow


def exercise(backend: Backend, key: Callable[[str], str], who: str, rounds: int = ROUNDS) -> int:
    """Every kind of call, checked; values unique to ``who`` so a crossed reply shows."""
    absent = key(f"{who}:absent")
    for i in range(rounds):
        k = key(f"{who}:{i}")
        value = f"{who}:{i}:{'x' * (i % 40)}".encode()
        backend.set(k, value, 60)
        assert backend.get(k) == value
        assert backend.get_many([k, absent]) == {k: value}
        assert backend.add(k, b"other", 60) is False
        swapped = value + b"!"
        assert backend.compare_and_set(k, value, swapped, 60) is True
        assert backend.get(k) == swapped
        assert backend.compare_and_delete(k, swapped) is True
        assert backend.get(k) is MISSING
        backend.set_many({k: value, absent + "x": b"y"}, 60)
        backend.delete_many([k, absent + "x"])
        assert backend.get_many([k, absent + "x"]) == {}
    return rounds


def test_every_backend_works_in_forked_children_and_in_the_parent(
    backend: Backend, key: Callable[[str], str]
) -> None:
    assert exercise(backend, key, "parent-before", rounds=5) == 5  # connections are open

    _, children = in_children(
        lambda i: exercise(backend, key, f"child{i}"),
        CHILDREN,
        meanwhile=lambda: exercise(backend, key, "parent-during"),
    )

    assert children == [("ok", ROUNDS)] * CHILDREN
    # The children closed only their copies: the parent's connections still answer.
    assert exercise(backend, key, "parent-after", rounds=20) == 20


@pytest.mark.memcached
def test_cache_get_in_forked_children_never_raises_nor_crosses_values(
    memcached_server: tuple[str, int], namespace: str
) -> None:
    """The reported symptom: after fork(), pymemcache's KeyError escaped cache.get."""
    host, port = memcached_server
    backend = MemcachedBackend(f"{host}:{port}", timeout=2.0, connect_timeout=2.0)
    cache = Cache(backend, namespace=namespace)
    rows = {f"row:{i}": {"id": i, "name": f"n{i}"} for i in range(200)}
    cache.set_many(rows, ttl=60)

    def read_all(_: int = 0) -> int:
        for _round in range(3):
            for name, row in rows.items():
                assert cache.get(name) == row
        return cache.stats().errors

    try:
        parent_errors, children = in_children(read_all, CHILDREN, meanwhile=read_all)
    finally:
        backend.close()
    assert children == [("ok", 0)] * CHILDREN
    assert parent_errors == 0


# -- locks held by another thread at the instant of the fork -------------------------


@contextlib.contextmanager
def holding(*locks: Any) -> Iterator[None]:
    """Threads of the parent hold ``locks`` (one each) until the block ends."""
    taken = [threading.Event() for _ in locks]
    done = threading.Event()

    def hold(lock: Any, taken: threading.Event) -> None:
        with lock:
            taken.set()
            done.wait()

    holders = [threading.Thread(target=hold, args=pair) for pair in zip(locks, taken, strict=True)]
    for holder in holders:
        holder.start()
    for event in taken:
        event.wait()
    try:
        yield
    finally:
        done.set()
        for holder in holders:
            holder.join()


def _memory() -> tuple[Any, Callable[[], object]]:
    backend = MemoryBackend()

    def use() -> object:
        backend.set("k", "v", None)
        return backend.get("k")

    return backend, use


def _breaker() -> tuple[Any, Callable[[], object]]:
    breaker = CircuitBreaker(failures=1)

    def use() -> object:
        breaker.failed()
        return breaker.state

    return breaker, use


def _journal() -> tuple[Any, Callable[[], object]]:
    journal = Journal()  # no runner: only its lock matters

    def use() -> object:
        journal.record(keys=["k"])
        return len(journal)

    return journal, use


LOCK_OWNERS: dict[str, tuple[Callable[[], tuple[Any, Callable[[], object]]], object]] = {
    "memory backend": (_memory, "v"),
    "circuit breaker": (_breaker, "open"),
    "journal": (_journal, 1),
}


@pytest.mark.parametrize("owner", list(LOCK_OWNERS))
def test_a_lock_held_at_fork_time_does_not_block_the_child(owner: str) -> None:
    build, expected = LOCK_OWNERS[owner]
    obj, use = build()
    with holding(obj._lock):
        _, children = in_children(lambda _: use(), 2, deadline=20.0)
    assert children == [("ok", expected)] * 2


@pytest.mark.memcached
def test_memcached_locks_held_at_fork_time_do_not_block_the_child(
    memcached_pool: list[str],
) -> None:
    """The pool's per-server breakers, its membership lock and the CAS-token memo."""
    backend = MemcachedBackend(memcached_pool, timeout=2.0, connect_timeout=2.0)
    ring = backend._nodes
    node = next(iter(ring.members.nodes.values()))
    locks = [node._lock, ring._lock, backend._tokens._lock]

    def use(_: int) -> list[bool]:
        renewed = (node._lock, ring._lock, backend._tokens._lock)  # read in the child
        return [lock.acquire(timeout=5) for lock in renewed]

    try:
        with holding(*locks):
            _, children = in_children(use, 2, deadline=20.0)
    finally:
        backend.close()
    assert children == [("ok", [True, True, True])] * 2


@pytest.mark.redis
def test_a_redis_pool_lock_held_at_fork_time_does_not_block_the_child(
    redis_server: str, namespace: str
) -> None:
    """redis-py resets its pool in the child under the pool's own lock (8.1): a parent
    thread holding that lock at the fork would block the child's first command."""
    backend = RedisBackend.from_url(redis_server, timeout=2.0)
    key = f"{namespace}:k"
    backend.set(key, b"v", 60)
    try:
        with holding(backend.client.connection_pool._lock):
            _, children = in_children(lambda _: backend.get(key).decode(), 2, deadline=20.0)
    finally:
        backend.delete(key)
        backend.close()
    assert children == [("ok", "v")] * 2


@pytest.mark.redis_cluster
def test_a_redis_cluster_routing_lock_held_at_fork_time_does_not_block_the_child(
    redis_cluster: tuple[str, int], namespace: str
) -> None:
    """A cluster client takes its routing lock on every keyed command."""
    client = cluster_client(redis_cluster)
    backend = RedisBackend(client)
    key = f"{namespace}:k"
    backend.set(key, b"v", 60)
    node = client.get_node_from_key(encode_key(key))
    pool = client.get_redis_connection(node).connection_pool
    try:
        with holding(client.nodes_manager._lock, pool._lock):
            _, children = in_children(lambda _: backend.get(key).decode(), 2, deadline=20.0)
    finally:
        backend.delete(key)
        client.close()
    assert children == [("ok", "v")] * 2


@pytest.mark.memcached
@pytest.mark.parametrize("kind", ["Client", "PooledClient", "HashClient"])
def test_an_injected_memcached_client_works_in_forked_children(
    memcached_server: tuple[str, int], namespace: str, kind: str
) -> None:
    """The caller's client is never closed, but a child drops its copies of the
    client's connections (closing only its own descriptors), or it would share them."""
    options: dict[str, Any] = {"timeout": 2.0, "connect_timeout": 2.0}
    client: Any
    if kind == "Client":
        client = Client(memcached_server, **options)
    elif kind == "PooledClient":
        client = PooledClient(memcached_server, **options)
    else:
        client = HashClient([memcached_server], use_pooling=True, **options)
    backend = MemcachedBackend(client)

    def key(name: str) -> str:
        return f"{namespace}:{name}"

    def work(i: int) -> int:
        return exercise(backend, key, f"child{i}")

    try:
        assert exercise(backend, key, "parent-before", rounds=5) == 5
        _, children = in_children(
            work, CHILDREN, meanwhile=lambda: exercise(backend, key, "parent-during")
        )
        assert children == [("ok", ROUNDS)] * CHILDREN
        assert exercise(backend, key, "parent-after", rounds=20) == 20
    finally:
        backend.close()
        client.close()


def test_a_probe_in_flight_at_fork_time_does_not_cut_the_child_off() -> None:
    """Another thread of the parent was probing: that thread does not exist in a child,
    so the child must probe on its own instead of waiting for it forever."""
    clock = [0.0]
    breaker = CircuitBreaker(failures=1, cooldown=1.0, timer=lambda: clock[0])
    node = _Node("n", object(), object(), failures=1, cooldown=1.0, timer=lambda: clock[0])
    breaker.failed()
    node.unanswered()
    clock[0] = 5.0
    assert breaker.allow() and breaker.state == "half-open"  # a probe is in flight
    assert node.admit() is False and node.state == "probing"  # this caller probes it

    def child(_: int) -> list[bool]:
        return [breaker.allow(), node.admit() is False]  # each: this call is the probe

    _, children = in_children(child, 2, deadline=20.0)
    assert children == [("ok", [True, True])] * 2  # (results come back as JSON lists)
