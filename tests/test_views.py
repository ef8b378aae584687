"""Read-through and write-through views: batched loads, negative caching, write order."""

from __future__ import annotations

import pytest

from cachekit import MISSING, Cache, KeyEncodingError
from cachekit.backends.base import Backend
from cachekit.backends.memory import MemoryBackend
from tests.support import CountingBackend

Row = dict[str, int]


pytestmark = pytest.mark.usefixtures("both_drivers")


class Table:
    """A system of record that counts how it is queried."""

    def __init__(self, n: int = 10) -> None:
        self.rows: dict[int, Row] = {i: {"id": i, "v": 0} for i in range(1, n + 1)}
        self.single: list[int] = []
        self.batches: list[list[int]] = []
        self.log: list[str] = []

    def load(self, row_id: int) -> Row | None:
        self.single.append(row_id)
        return self.rows.get(row_id)

    def load_many(self, ids: list[int]) -> dict[int, Row]:
        self.batches.append(sorted(ids))
        return {i: self.rows[i] for i in ids if i in self.rows}

    def save(self, row_id: int, row: Row) -> None:
        self.log.append(f"save {row_id}")
        self.rows[row_id] = row

    def remove(self, row_id: int) -> None:
        self.log.append(f"remove {row_id}")
        del self.rows[row_id]


@pytest.fixture
def cache(backend: Backend, namespace: str) -> Cache:
    return Cache(backend, namespace=namespace)


def test_get_loads_once_and_caches_missing_rows(cache: Cache) -> None:
    table = Table()
    users = cache.read_through("user", load=table.load, ttl=300)
    assert users.get(1) == {"id": 1, "v": 0} == users.get(1)
    assert users.get(99) is None and users.get(99) is None
    assert table.single == [1, 99]
    assert users.key(7) == "user:7"
    assert cache.get(users.key(1)) == {"id": 1, "v": 0}


def test_ids_of_different_types_or_values_never_share_a_key(cache: Cache) -> None:
    def load(id_: object) -> str:
        return f"{type(id_).__name__} {id_!r}"

    view = cache.read_through("user", load=load)
    assert view.get(1) == "int 1"
    assert view.get("1") == "str '1'"  # str(id) keys served row 1 here
    assert view.get(1.0) == "float 1.0" and view.get(True) == "bool True"
    assert view.get_many([1, "1", 2]) == {1: "int 1", "1": "str '1'", 2: "int 2"}
    assert [view.key(i) for i in (7, "7", "ada", "a:b")] == [
        "user:7", "user:%37", "user:ada", "user:a%3Ab",
    ]  # fmt: skip
    view.invalidate("1")
    assert cache.get(view.key(1)) == "int 1" and cache.get(view.key("1")) is MISSING
    with pytest.raises(KeyEncodingError, match="no stable key encoding"):
        view.get(object())


def test_get_many_is_one_read_one_load_many_one_write(namespace: str) -> None:
    backend = CountingBackend(MemoryBackend())
    table = Table()
    users = Cache(backend, namespace=namespace).read_through(
        "user", load=table.load, load_many=table.load_many
    )
    users.get(1)
    backend.calls.clear()
    result = users.get_many([1, 2, 3, 42])
    assert result == {1: table.rows[1], 2: table.rows[2], 3: table.rows[3]}
    assert table.batches == [[2, 3, 42]] and table.single == [1]
    assert backend.calls["get_many"] == 1
    assert backend.calls["add_many"] == 1  # the leases of all misses, in one call
    # One fill per TTL: the found rows, and the negative entry for 42 (none_ttl).
    assert backend.calls["compare_and_set_many"] == 2
    assert backend.calls["set"] + backend.calls["set_many"] + backend.calls["add"] == 0
    assert users.get_many([1, 2, 3, 42]) == result
    assert table.batches == [[2, 3, 42]]


def test_get_many_falls_back_to_load_per_id(cache: Cache) -> None:
    table = Table()
    users = cache.read_through("user", load=table.load)
    assert users.get_many([2, 3]) == {2: table.rows[2], 3: table.rows[3]}
    assert sorted(table.single) == [2, 3]
    assert cache.stats().loads == 2


def test_invalidate(cache: Cache) -> None:
    table = Table()
    users = cache.read_through("user", load=table.load, load_many=table.load_many)
    users.get_many([1, 2, 3])
    table.rows[1] = table.rows[2] = {"id": 0, "v": 1}
    users.invalidate(1)
    users.invalidate_many([2, 3])
    assert users.get_many([1, 2]) == {1: {"id": 0, "v": 1}, 2: {"id": 0, "v": 1}}


def test_write_through_writes_the_record_first(cache: Cache) -> None:
    table = Table()
    users = cache.write_through("user", load=table.load, save=table.save, remove=table.remove)
    users.put(1, {"id": 1, "v": 5})
    assert table.rows[1] == {"id": 1, "v": 5}
    assert table.single == [1]  # reloaded from the record under a lease, after the save
    assert users.get(1) == {"id": 1, "v": 5} and table.single == [1]
    users.delete(1)
    assert table.log == ["save 1", "remove 1"]
    assert users.get(1) is None


def test_a_failed_save_leaves_the_cache_alone(cache: Cache) -> None:
    table = Table()
    users = cache.write_through("user", load=table.load, save=table.save, remove=table.remove)
    assert users.get(1) == {"id": 1, "v": 0}

    def broken_save(row_id: int, row: Row) -> None:
        raise RuntimeError("constraint violated")

    broken = cache.write_through("user", load=table.load, save=broken_save, remove=table.remove)
    with pytest.raises(RuntimeError):
        broken.put(1, {"id": 1, "v": 9})
    assert users.get(1) == {"id": 1, "v": 0}
