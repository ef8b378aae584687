"""The contract suite for async backends: tests/test_backend_contract.py's cases, awaited.

Run against every backend of the ``async_backend`` fixture. Case data (odd keys, equal
but distinct values) comes from the sync suite; the threads of its concurrency cases
become tasks here, and cancellation, which only an async backend faces, is added.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cachekit.backends.base import MISSING, AsyncBackend
from tests.conftest import Expiry
from tests.test_backend_contract import ODD_KEYS, distinct

Key = Callable[[str], str]


def test_backend_satisfies_the_protocol(async_backend: AsyncBackend) -> None:
    assert isinstance(async_backend, AsyncBackend)


async def test_get_of_an_absent_key_is_missing(async_backend: AsyncBackend, async_key: Key) -> None:
    assert await async_backend.get(async_key("absent")) is MISSING


async def test_set_then_get_round_trips_bytes(async_backend: AsyncBackend, async_key: Key) -> None:
    value = bytes(range(256)) * 4
    await async_backend.set(async_key("k"), value, None)
    assert await async_backend.get(async_key("k")) == value


async def test_set_overwrites(async_backend: AsyncBackend, async_key: Key) -> None:
    await async_backend.set(async_key("k"), b"one", None)
    await async_backend.set(async_key("k"), b"two", 60)
    assert await async_backend.get(async_key("k")) == b"two"


async def test_empty_bytes_is_a_hit_not_a_miss(async_backend: AsyncBackend, async_key: Key) -> None:
    backend, key = async_backend, async_key
    empty = b""
    await backend.set(key("empty"), empty, None)
    assert await backend.get(key("empty")) == b""
    assert await backend.get_many([key("empty")]) == {key("empty"): b""}
    assert await backend.add(key("empty"), b"x", None) is False
    assert await backend.compare_and_set(key("empty"), empty, b"full", None) is True
    assert await backend.get(key("empty")) == b"full"


async def test_none_is_a_storable_object(async_backend: AsyncBackend, async_key: Key) -> None:
    if not async_backend.capabilities.stores_objects:
        return  # byte backends only ever receive serialized bytes
    await async_backend.set(async_key("none"), None, None)
    assert await async_backend.get(async_key("none")) is None
    assert await async_backend.get_many([async_key("none")]) == {async_key("none"): None}


async def test_get_many_returns_hits_only(async_backend: AsyncBackend, async_key: Key) -> None:
    backend, key = async_backend, async_key
    await backend.set(key("a"), b"1", None)
    await backend.set(key("b"), b"2", None)
    found = await backend.get_many([key("a"), key("missing"), key("b"), key("a")])
    assert found == {key("a"): b"1", key("b"): b"2"}
    assert await backend.get_many([]) == {}
    assert await backend.get_many([key("missing")]) == {}


async def test_set_many_stores_every_item(async_backend: AsyncBackend, async_key: Key) -> None:
    backend, key = async_backend, async_key
    items = {key(f"k{i}"): f"v{i}".encode() for i in range(50)}
    await backend.set_many(items, None)
    assert await backend.get_many(list(items)) == items
    await backend.set_many({key("k0"): b"new"}, 60)
    assert await backend.get(key("k0")) == b"new"
    await backend.set_many({}, None)


async def test_delete_is_idempotent(async_backend: AsyncBackend, async_key: Key) -> None:
    backend, key = async_backend, async_key
    await backend.delete(key("never-set"))
    await backend.set(key("k"), b"v", None)
    await backend.delete(key("k"))
    await backend.delete(key("k"))
    assert await backend.get(key("k")) is MISSING


async def test_delete_many_removes_present_keys_and_ignores_absent(
    async_backend: AsyncBackend, async_key: Key
) -> None:
    backend, key = async_backend, async_key
    await backend.set_many({key("a"): b"1", key("b"): b"2", key("keep"): b"3"}, None)
    await backend.delete_many([key("a"), key("absent"), key("b")])
    assert await backend.get_many([key("a"), key("b"), key("keep")]) == {key("keep"): b"3"}
    await backend.delete_many([])


async def test_add_stores_only_when_absent(async_backend: AsyncBackend, async_key: Key) -> None:
    backend, key = async_backend, async_key
    assert await backend.add(key("k"), b"first", None) is True
    assert await backend.add(key("k"), b"second", None) is False
    assert await backend.get(key("k")) == b"first"
    await backend.delete(key("k"))
    assert await backend.add(key("k"), b"third", 60) is True
    assert await backend.get(key("k")) == b"third"


async def test_compare_and_set_replaces_only_a_matching_value(
    async_backend: AsyncBackend, async_key: Key
) -> None:
    backend, key = async_backend, async_key
    old = b"old"
    await backend.set(key("k"), old, None)
    assert await backend.compare_and_set(key("k"), b"other", b"new", None) is False
    assert await backend.get(key("k")) == b"old"
    assert await backend.compare_and_set(key("k"), old, b"new", 60) is True
    assert await backend.get(key("k")) == b"new"


async def test_compare_and_set_never_matches_an_absent_key(
    async_backend: AsyncBackend, async_key: Key
) -> None:
    backend, key = async_backend, async_key
    assert await backend.compare_and_set(key("absent"), b"", b"new", None) is False
    assert await backend.compare_and_set(key("absent"), b"x", b"new", None) is False
    assert await backend.get(key("absent")) is MISSING


async def test_compare_and_set_matching_rule(async_backend: AsyncBackend, async_key: Key) -> None:
    """Bytes match by equality; stored objects match only by identity."""
    backend, key = async_backend, async_key
    stored = distinct(b"value")
    await backend.set(key("k"), stored, None)
    swapped = await backend.compare_and_set(key("k"), distinct(b"value"), b"new", None)
    assert swapped is (not backend.capabilities.stores_objects)
    if backend.capabilities.stores_objects:
        assert await backend.compare_and_set(key("k"), stored, b"new", None) is True


async def test_batch_add_and_compare_and_set(async_backend: AsyncBackend, async_key: Key) -> None:
    backend, key = async_backend, async_key
    taken = distinct(b"taken")
    await backend.set(key("taken"), taken, None)
    new = {key(name): distinct(name.encode()) for name in ("a", "b", "taken")}
    assert await backend.add_many(new, 60) == {key("a"), key("b")}
    assert await backend.get(key("taken")) == b"taken"
    swaps = {
        key("a"): (new[key("a")], b"A"),  # still holds what add_many stored: swapped
        key("b"): (b"something else", b"B"),  # does not match: kept
        key("absent"): (b"x", b"X"),  # absent: never matches
    }
    assert await backend.compare_and_set_many(swaps, None) == {key("a")}
    assert await backend.get_many([key("a"), key("b"), key("absent")]) == {
        key("a"): b"A",
        key("b"): b"b",
    }
    assert await backend.add_many({}, None) == set() == await backend.compare_and_set_many({}, None)


async def test_compare_and_delete_removes_only_a_matching_value(
    async_backend: AsyncBackend, async_key: Key
) -> None:
    backend, key = async_backend, async_key
    stored = distinct(b"lease")
    await backend.set(key("k"), stored, None)
    assert await backend.compare_and_delete(key("k"), b"other") is False
    assert await backend.get(key("k")) == b"lease"
    assert await backend.compare_and_delete(key("k"), stored) is True
    assert await backend.get(key("k")) is MISSING
    assert await backend.compare_and_delete(key("k"), stored) is False
    assert await backend.add(key("k"), b"again", None) is True  # the key is really free


async def test_entries_expire_after_their_ttl(
    async_backend: AsyncBackend, async_key: Key, async_expiry: Expiry
) -> None:
    """Every write path honours the TTL, and None never expires; one wait for all."""
    backend, key, ttl = async_backend, async_key, async_expiry.ttl
    old = b"old"
    await backend.set(key("set"), b"1", ttl)
    await backend.set_many({key("many1"): b"1", key("many2"): b"2"}, ttl)
    assert await backend.add(key("add"), b"1", ttl) is True
    await backend.set(key("cas"), old, None)
    assert await backend.compare_and_set(key("cas"), old, b"new", ttl) is True
    await backend.set(key("forever"), b"1", None)
    names = ["set", "many1", "many2", "add", "cas", "forever"]
    assert len(await backend.get_many([key(name) for name in names])) == len(names)

    await asyncio.to_thread(async_expiry.wait)

    assert await backend.get_many([key(name) for name in names]) == {key("forever"): b"1"}
    assert await backend.get(key("set")) is MISSING
    assert await backend.compare_and_set(key("cas"), b"new", b"newer", None) is False
    assert await backend.add(key("add"), b"again", None) is True
    assert await backend.get(key("add")) == b"again"


async def test_odd_keys_are_distinct_and_round_trip(
    async_backend: AsyncBackend, async_key: Key
) -> None:
    backend = async_backend
    items = {async_key(name): f"value {i}".encode() for i, name in enumerate(ODD_KEYS)}
    assert len(items) == len(ODD_KEYS)
    for backend_key, value in items.items():
        await backend.set(backend_key, value, None)
    for backend_key, value in items.items():
        assert await backend.get(backend_key) == value
    assert await backend.get_many(list(items)) == items
    await backend.delete_many(list(items)[:4])
    assert await backend.get_many(list(items)) == dict(list(items.items())[4:])
    await backend.set_many(items, 60)
    assert await backend.get_many(list(items)) == items


async def test_racing_adds_have_exactly_one_winner(
    async_backend: AsyncBackend, async_key: Key
) -> None:
    tasks = 8
    results = await asyncio.gather(
        *(async_backend.add(async_key("contested"), f"task {i}".encode(), 60) for i in range(tasks))
    )
    assert results.count(True) == 1
    winner = results.index(True)
    assert await async_backend.get(async_key("contested")) == f"task {winner}".encode()


async def test_concurrent_callers_each_get_their_own_replies(
    async_backend: AsyncBackend, async_key: Key
) -> None:
    """A backend shared by tasks must never hand one task another's reply."""
    tasks = 8
    await async_backend.set_many(
        {async_key(f"t{i}"): f"value {i}".encode() for i in range(tasks)}, None
    )

    async def read(i: int) -> int:
        wrong = 0
        for _ in range(200):
            if await async_backend.get(async_key(f"t{i}")) != f"value {i}".encode():
                wrong += 1
        return wrong

    assert await asyncio.gather(*(read(i) for i in range(tasks))) == [0] * tasks


async def test_a_cancelled_call_leaves_no_reply_for_the_next(
    async_backend: AsyncBackend, async_key: Key
) -> None:
    """Calls cancelled before, during and after their round trip: every later call
    on the backend still reads its own key's value."""
    values = {async_key(f"c{i}"): f"value {i}".encode() for i in range(20)}
    await async_backend.set_many(values, None)
    for delay in range(6):  # cancelled after 0..5 turns of the event loop
        for backend_key in values:
            task = asyncio.ensure_future(async_backend.get(backend_key))
            for _ in range(delay):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for backend_key, value in values.items():
            assert await async_backend.get(backend_key) == value
        assert await async_backend.get_many(list(values)) == values
