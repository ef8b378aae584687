"""Values on every backend: any serializer output reads back exactly, a serializer's
failure never breaks a call, and what a plain set leaves behind it."""

from __future__ import annotations

import itertools
import struct
from typing import Any, NoReturn

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cachekit import MISSING, Cache, SerializationError
from cachekit.backends.base import Backend
from cachekit.entries import ENTRY_BYTE
from cachekit.markers import MARKER_BYTE

# Unique keys across hypothesis examples, which share one namespace per test.
SERIAL = itertools.count()
# An annotated entry's header after ENTRY_BYTE: fresh_until, delta, tags length.
ANNOTATED = struct.Struct("!ddI")


class RawBytes:
    """A serializer whose output is exactly the bytes value it is given."""

    def dumps(self, value: Any, key: str) -> bytes:
        assert type(value) is bytes
        return value

    def loads(self, data: bytes, key: str) -> Any:
        return data


class Failing:
    """A serializer whose ``dumps`` or ``loads`` raises whatever the test asks for."""

    def __init__(self, *, dumps: BaseException | None = None, loads: BaseException | None = None):
        self.dumps_error = dumps
        self.loads_error = loads

    def dumps(self, value: Any, key: str) -> bytes:
        if self.dumps_error is not None:
            raise self.dumps_error
        return repr(value).encode()

    def loads(self, data: bytes, key: str) -> Any:
        if self.loads_error is not None:
            raise self.loads_error
        return data.decode()


def unreachable() -> NoReturn:
    pytest.fail("the loader ran although the value was cached")


@pytest.fixture
def bytes_backend(backend: Backend) -> Backend:
    """Each backend that stores bytes, so runs a serializer."""
    if backend.capabilities.stores_objects:
        pytest.skip("the memory backend stores objects: no serializer runs")
    return backend


@pytest.fixture
def cache_any(backend: Backend, namespace: str) -> Cache:
    return Cache(backend, namespace=namespace)


def byte_cache(backend: Backend, namespace: str, serializer: Any) -> Cache:
    # A value misread as a lease would make get_or_load wait: lease_waits shows it.
    return Cache(backend, namespace=namespace, serializer=serializer, lease_ttl=1.0)


LOOKALIKES = [
    b"",
    MARKER_BYTE,
    MARKER_BYTE + b"L" + bytes(16),  # exactly a lease marker's shape
    ENTRY_BYTE + b"tail",
    ENTRY_BYTE + ANNOTATED.pack(1e18, 0.0, 0) + b"tail",  # a well-formed annotated entry
    b"\x02",
    b"\x02\x00escaped",
    b"\x03\xff",
]


@settings(
    max_examples=40,
    deadline=None,  # round trips to real servers
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.binary(max_size=64))
@example(data=LOOKALIKES[0])
@example(data=LOOKALIKES[1])
@example(data=LOOKALIKES[2])
@example(data=LOOKALIKES[3])
@example(data=LOOKALIKES[4])
@example(data=LOOKALIKES[5])
@example(data=LOOKALIKES[6])
@example(data=LOOKALIKES[7])
def test_any_serializer_output_reads_back_exactly_on_every_path(
    bytes_backend: Backend, namespace: str, data: bytes
) -> None:
    cache = byte_cache(bytes_backend, namespace, RawBytes())
    n = next(SERIAL)
    cache.set(f"set{n}", data)
    cache.set_many({f"many{n}": data})
    cache.set(f"tagged{n}", data, tags=["t"])  # an annotated entry around the output
    for key in (f"set{n}", f"many{n}", f"tagged{n}"):
        assert cache.get(key) == data
        assert cache.get_many([key, "absent"]) == {key: data}
        assert cache.get_or_load(key, unreachable) == data
    assert cache.get_or_load(f"loaded{n}", lambda: data) == data
    assert cache.get_or_load(f"loaded{n}", unreachable) == data

    @cache.cached()
    def decorated(x: int) -> bytes:
        return data

    view = cache.read_through(f"view{n}", load=lambda id_: data)
    stale = cache.read_through(f"stale{n}", load=lambda id_: data, stale_ttl=60)
    for _ in range(2):
        assert decorated(n) == data
        assert view.get(1) == data and view.get_many([2]) == {2: data}
        assert stale.get(1) == data  # annotated: stale_ttl
    stats = cache.stats()
    assert (stats.lease_waits, stats.decode_errors, stats.errors) == (0, 0, 0)
    assert stats.loads == 5  # get_or_load, decorated, view (get and get_many), stale


ENCODE_ERRORS = [
    ValueError("Exceeds the limit (4300 digits) for integer string conversion"),
    RecursionError("maximum recursion depth exceeded"),
    KeyError("custom"),
    RuntimeError("anything at all"),
]


@pytest.mark.parametrize("error", ENCODE_ERRORS, ids=lambda exc: type(exc).__name__)
def test_any_encoder_error_is_a_counted_serialization_error(
    bytes_backend: Backend, namespace: str, error: Exception
) -> None:
    writer = byte_cache(bytes_backend, namespace, RawBytes())
    cache = Cache(
        bytes_backend, namespace=namespace, serializer=Failing(dumps=error), lease_ttl=1.0
    )
    writer.set("k", b"old")
    with pytest.raises(SerializationError) as info:
        cache.set("k", 1)
    assert info.value.__cause__ is error
    assert writer.get("k") is MISSING  # a failed replacement leaves nothing old
    with pytest.raises(SerializationError):
        cache.set_many({"a": 1})
    with pytest.raises(SerializationError):
        cache.set("t", 1, tags=["t"])

    @cache.cached()
    def decorated(x: int) -> int:
        return x * 2

    view = cache.read_through("v", load=lambda id_: id_ * 3)
    assert cache.get_or_load("g", lambda: 5) == 5
    assert decorated(4) == decorated(4) == 8  # works, uncached
    assert view.get(2) == 6 and view.get_many([3]) == {3: 9}
    assert cache.get_or_load("tagged", lambda: 7, tags=["t"]) == 7
    stats = cache.stats()
    assert stats.serialization_errors == 3 + 6  # the three sets, then six fills
    assert stats.errors == 0 and stats.lease_waits == 0  # no server error; no lease left


@pytest.mark.parametrize("error", ENCODE_ERRORS, ids=lambda exc: type(exc).__name__)
def test_any_decoder_error_is_a_counted_miss(
    bytes_backend: Backend, namespace: str, error: Exception
) -> None:
    writer = byte_cache(bytes_backend, namespace, Failing())
    reader = Cache(
        bytes_backend, namespace=namespace, serializer=Failing(loads=error), lease_ttl=1.0
    )

    @reader.cached()
    def decorated(x: int) -> str:
        return "loaded"

    def written() -> None:
        writer.set("plain", "v")
        writer.set("tagged", "v", tags=["t"])
        writer.set(decorated.key(1), "v")

    written()
    assert reader.get("plain") is MISSING and reader.get("tagged") is MISSING
    written()
    assert reader.get_many(["plain", "tagged"]) == {}
    written()
    assert reader.get_or_load("plain", lambda: "loaded") == "loaded"
    assert decorated(1) == "loaded"
    assert reader.stats().decode_errors == 2 + 2 + 2


@pytest.mark.parametrize("values", ["set", "set_many", "tagged set"])
def test_storing_none_without_negative_caching_removes_the_old_value(
    backend: Backend, namespace: str, values: str
) -> None:
    cache = Cache(backend, namespace=namespace, none_ttl=0)
    cache.set_many({"k": "old", "other": "old"})
    if values == "set":
        cache.set("k", None)
    elif values == "set_many":
        cache.set_many({"k": None, "other": "new"})
        assert cache.get("other") == "new"
    else:
        cache.set("k", None, tags=["t"])
    assert cache.get("k") is MISSING
    assert cache.get_or_load("k", lambda: "loaded") == "loaded"


def test_a_tagged_set_under_a_decorated_key_reads_as_its_value(cache_any: Cache) -> None:
    cache = cache_any
    calls: list[int] = []

    @cache.cached()
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    assert square(3) == 9
    cache.set(square.key(3), 10, tags=["t"])
    assert square(3) == 10  # the value, never the internal entry
    assert cache.get(square.key(3)) == 10
    cache.invalidate_tags(["t"])
    assert square(3) == 9
    assert calls == [3, 3]
