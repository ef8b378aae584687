"""One contract suite, run against every backend through the `backend` fixture."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from cachekit.backends.base import MISSING, Backend
from tests.conftest import Expiry

Key = Callable[[str], str]


def distinct(value: bytes) -> bytes:
    """An equal bytes object that is not the same object (literals are shared)."""
    return bytes(bytearray(value))


def test_backend_satisfies_the_protocol(backend: Backend) -> None:
    assert isinstance(backend, Backend)


def test_get_of_an_absent_key_is_missing(backend: Backend, key: Key) -> None:
    assert backend.get(key("absent")) is MISSING


def test_set_then_get_round_trips_bytes(backend: Backend, key: Key) -> None:
    value = bytes(range(256)) * 4
    backend.set(key("k"), value, None)
    assert backend.get(key("k")) == value


def test_set_overwrites(backend: Backend, key: Key) -> None:
    backend.set(key("k"), b"one", None)
    backend.set(key("k"), b"two", 60)
    assert backend.get(key("k")) == b"two"


def test_empty_bytes_is_a_hit_not_a_miss(backend: Backend, key: Key) -> None:
    empty = b""
    backend.set(key("empty"), empty, None)
    assert backend.get(key("empty")) == b""
    assert backend.get_many([key("empty")]) == {key("empty"): b""}
    assert backend.add(key("empty"), b"x", None) is False
    assert backend.compare_and_set(key("empty"), empty, b"full", None) is True
    assert backend.get(key("empty")) == b"full"


def test_none_is_a_storable_object(backend: Backend, key: Key) -> None:
    if not backend.capabilities.stores_objects:
        return  # byte backends only ever receive serialized bytes
    backend.set(key("none"), None, None)
    assert backend.get(key("none")) is None
    assert backend.get_many([key("none")]) == {key("none"): None}


def test_get_many_returns_hits_only(backend: Backend, key: Key) -> None:
    backend.set(key("a"), b"1", None)
    backend.set(key("b"), b"2", None)
    found = backend.get_many([key("a"), key("missing"), key("b"), key("a")])
    assert found == {key("a"): b"1", key("b"): b"2"}
    assert backend.get_many([]) == {}
    assert backend.get_many([key("missing")]) == {}


def test_set_many_stores_every_item(backend: Backend, key: Key) -> None:
    items = {key(f"k{i}"): f"v{i}".encode() for i in range(50)}
    backend.set_many(items, None)
    assert backend.get_many(list(items)) == items
    backend.set_many({key("k0"): b"new"}, 60)
    assert backend.get(key("k0")) == b"new"
    backend.set_many({}, None)


def test_delete_is_idempotent(backend: Backend, key: Key) -> None:
    backend.delete(key("never-set"))
    backend.set(key("k"), b"v", None)
    backend.delete(key("k"))
    backend.delete(key("k"))
    assert backend.get(key("k")) is MISSING


def test_delete_many_removes_present_keys_and_ignores_absent(backend: Backend, key: Key) -> None:
    backend.set_many({key("a"): b"1", key("b"): b"2", key("keep"): b"3"}, None)
    backend.delete_many([key("a"), key("absent"), key("b")])
    assert backend.get_many([key("a"), key("b"), key("keep")]) == {key("keep"): b"3"}
    backend.delete_many([])


def test_add_stores_only_when_absent(backend: Backend, key: Key) -> None:
    assert backend.add(key("k"), b"first", None) is True
    assert backend.add(key("k"), b"second", None) is False
    assert backend.get(key("k")) == b"first"
    backend.delete(key("k"))
    assert backend.add(key("k"), b"third", 60) is True
    assert backend.get(key("k")) == b"third"


def test_compare_and_set_replaces_only_a_matching_value(backend: Backend, key: Key) -> None:
    old = b"old"
    backend.set(key("k"), old, None)
    assert backend.compare_and_set(key("k"), b"other", b"new", None) is False
    assert backend.get(key("k")) == b"old"
    assert backend.compare_and_set(key("k"), old, b"new", 60) is True
    assert backend.get(key("k")) == b"new"


def test_compare_and_set_never_matches_an_absent_key(backend: Backend, key: Key) -> None:
    assert backend.compare_and_set(key("absent"), b"", b"new", None) is False
    assert backend.compare_and_set(key("absent"), b"x", b"new", None) is False
    assert backend.get(key("absent")) is MISSING


def test_compare_and_set_matching_rule(backend: Backend, key: Key) -> None:
    """Bytes match by equality; stored objects match only by identity."""
    stored = distinct(b"value")
    backend.set(key("k"), stored, None)
    swapped = backend.compare_and_set(key("k"), distinct(b"value"), b"new", None)
    assert swapped is (not backend.capabilities.stores_objects)
    if backend.capabilities.stores_objects:
        assert backend.compare_and_set(key("k"), stored, b"new", None) is True


def test_batch_add_and_compare_and_set(backend: Backend, key: Key) -> None:
    taken = distinct(b"taken")
    backend.set(key("taken"), taken, None)
    new = {key(name): distinct(name.encode()) for name in ("a", "b", "taken")}
    assert backend.add_many(new, 60) == {key("a"), key("b")}
    assert backend.get(key("taken")) == b"taken"
    swaps = {
        key("a"): (new[key("a")], b"A"),  # still holds what add_many stored: swapped
        key("b"): (b"something else", b"B"),  # does not match: kept
        key("absent"): (b"x", b"X"),  # absent: never matches
    }
    assert backend.compare_and_set_many(swaps, None) == {key("a")}
    assert backend.get_many([key("a"), key("b"), key("absent")]) == {
        key("a"): b"A",
        key("b"): b"b",
    }
    assert backend.add_many({}, None) == set() == backend.compare_and_set_many({}, None)


def test_compare_and_delete_removes_only_a_matching_value(backend: Backend, key: Key) -> None:
    stored = distinct(b"lease")
    backend.set(key("k"), stored, None)
    assert backend.compare_and_delete(key("k"), b"other") is False
    assert backend.get(key("k")) == b"lease"
    assert backend.compare_and_delete(key("k"), stored) is True
    assert backend.get(key("k")) is MISSING
    assert backend.compare_and_delete(key("k"), stored) is False
    assert backend.add(key("k"), b"again", None) is True  # the key is really free


def test_entries_expire_after_their_ttl(backend: Backend, key: Key, expiry: Expiry) -> None:
    """Every write path honours the TTL, and None never expires; one wait for all."""
    old = b"old"
    backend.set(key("set"), b"1", expiry.ttl)
    backend.set_many({key("many1"): b"1", key("many2"): b"2"}, expiry.ttl)
    assert backend.add(key("add"), b"1", expiry.ttl) is True
    backend.set(key("cas"), old, None)
    assert backend.compare_and_set(key("cas"), old, b"new", expiry.ttl) is True
    backend.set(key("forever"), b"1", None)
    names = ["set", "many1", "many2", "add", "cas", "forever"]
    assert len(backend.get_many([key(name) for name in names])) == len(names)

    expiry.wait()

    assert backend.get_many([key(name) for name in names]) == {key("forever"): b"1"}
    assert backend.get(key("set")) is MISSING
    assert backend.compare_and_set(key("cas"), b"new", b"newer", None) is False
    assert backend.add(key("add"), b"again", None) is True
    assert backend.get(key("add")) == b"again"


ODD_KEYS = [
    "with space",
    "tab\tnewline\ncr\r",
    "control \x00\x01\x7f",
    "non-ascii ключ 鍵 ü 🗝",
    "lone surrogate \udc80 \ud800",
    "x" * 1024,
    "#looks-hashed",
    "",
]


def test_odd_keys_are_distinct_and_round_trip(backend: Backend, key: Key) -> None:
    """Memory and Redis take any str; memcached gets policy-compliant keys from keys.py."""
    items = {key(name): f"value {i}".encode() for i, name in enumerate(ODD_KEYS)}
    assert len(items) == len(ODD_KEYS)
    for backend_key, value in items.items():
        backend.set(backend_key, value, None)
    for backend_key, value in items.items():
        assert backend.get(backend_key) == value
    assert backend.get_many(list(items)) == items
    backend.delete_many(list(items)[:4])
    assert backend.get_many(list(items)) == dict(list(items.items())[4:])
    backend.set_many(items, 60)
    assert backend.get_many(list(items)) == items


def test_racing_adds_have_exactly_one_winner(backend: Backend, key: Key) -> None:
    threads = 8
    barrier = threading.Barrier(threads)

    def race(i: int) -> bool:
        barrier.wait()
        return backend.add(key("contested"), f"thread {i}".encode(), 60)

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(race, range(threads)))
    assert results.count(True) == 1
    winner = results.index(True)
    assert backend.get(key("contested")) == f"thread {winner}".encode()


def test_concurrent_callers_each_get_their_own_replies(backend: Backend, key: Key) -> None:
    """A backend shared by threads must never hand one thread another's reply."""
    threads = 8
    backend.set_many({key(f"t{i}"): f"value {i}".encode() for i in range(threads)}, None)

    def read(i: int) -> int:
        wrong = 0
        for _ in range(200):
            if backend.get(key(f"t{i}")) != f"value {i}".encode():
                wrong += 1
        return wrong

    with ThreadPoolExecutor(threads) as pool:
        assert list(pool.map(read, range(threads))) == [0] * threads
