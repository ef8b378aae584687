"""The memory backend's two modes, and repositories that never share a mutable value.

By reference (the default), a cached object is handed out as is; with
``serialize=True`` the memory backend stores bytes as Redis and memcached do: every
reader decodes its own copy, and the serializer refuses what it refuses there.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import JSON, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from cachekit import MISSING, Cache, SerializationError
from cachekit.backends.base import Backend
from cachekit.backends.memory import MemoryBackend
from cachekit.sqlalchemy import CachedRepository


@dataclasses.dataclass
class Point:
    x: int


class Colour(enum.Enum):
    RED = 1


class Custom:
    pass


# What the JSON serializer refuses (and the by-reference memory backend stores).
REFUSED: list[Any] = [Point(1), Colour.RED, Custom(), {"nested": [Point(2)]}, 1 + 2j]
ACCEPTED: list[Any] = [{"a": [1, "b"]}, (1, 2), Decimal("1.5"), 10**5000, b"\x00raw"]


def test_serialize_mode_hands_every_reader_its_own_copy() -> None:
    cache = Cache(MemoryBackend(serialize=True), namespace="n")
    value = {"tags": ["a"]}
    cache.set("k", value)
    value["tags"].append("changed after set")
    cache.get("k")["tags"].append("changed after get")
    cache.get_many(["k"])["k"]["tags"].append("changed after get_many")
    assert cache.get("k") == {"tags": ["a"]}

    @cache.cached()
    def tags(x: int) -> dict[str, list[str]]:
        return {"tags": ["b"]}

    tags(1)["tags"].append("changed by the caller that loaded it")
    tags(1)["tags"].append("changed by a caller that hit")
    assert tags(1) == {"tags": ["b"]}
    view = cache.read_through("v", load=lambda id_: [id_])
    view.get(1).append("changed")
    assert view.get(1) == [1]


def test_by_reference_mode_hands_out_the_cached_object() -> None:
    cache = Cache(MemoryBackend(), namespace="n")
    value = {"tags": ["a"]}
    cache.set("k", value)
    assert cache.get("k") is value


@pytest.mark.parametrize("value", REFUSED + ACCEPTED, ids=lambda v: type(v).__name__)
def test_serialize_mode_refuses_exactly_what_a_network_backend_refuses(
    backend: Backend, namespace: str, value: Any
) -> None:
    if backend.capabilities.stores_objects:
        pytest.skip("compared with a byte backend")
    memory = Cache(MemoryBackend(serialize=True), namespace=namespace)
    network = Cache(backend, namespace=namespace)
    outcomes = []
    for cache in (memory, network):
        try:
            cache.set("k", value)
        except SerializationError:
            outcomes.append("refused")
        else:
            outcomes.append("stored" if cache.get("k") == value else "changed")
        assert cache.get_or_load("fill", lambda: value) is value  # the call works either way
    assert outcomes[0] == outcomes[1] == ("refused" if value in REFUSED else "stored")
    stats = [(c.stats().serialization_errors, c.stats().errors) for c in (memory, network)]
    assert stats[0] == stats[1] == ((2, 0) if value in REFUSED else (0, 0))
    by_reference = Cache(MemoryBackend(), namespace=namespace)
    by_reference.set("k", value)  # stored as is: the difference serialize=True removes
    assert by_reference.get("k") is value


def test_serialize_mode_stores_bytes_only() -> None:
    backend = MemoryBackend(serialize=True)
    assert (
        backend.capabilities.stores_objects is False
        and MemoryBackend().capabilities.stores_objects is True
    )
    with pytest.raises(TypeError, match="bytes"):
        backend.set("k", "text", None)  # type: ignore[arg-type]
    assert backend.get("k") is MISSING
    # In-process: no circuit breaker by default, in either mode (it never fails).
    assert Cache(backend).breaker is None and Cache(MemoryBackend()).breaker is None


# -- repositories -----------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Profile(Base):
    __tablename__ = "profiles"

    id: Mapped[int] = mapped_column(primary_key=True)
    prefs: Mapped[dict[str, Any]] = mapped_column(JSON)


@pytest.fixture
def sessions() -> Iterator[sessionmaker[Session]]:
    """An in-memory SQLite database holding one profile."""
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine, expire_on_commit=False)
    with factory.begin() as session:
        session.add(Profile(id=1, prefs={"theme": "dark", "tags": ["a"]}))
    yield factory
    engine.dispose()


def test_changing_an_entity_never_changes_what_the_cache_holds(
    backend: Backend, namespace: str, sessions: sessionmaker[Session]
) -> None:
    cache = Cache(backend, namespace=namespace)
    profiles = CachedRepository(cache, Profile, session_factory=sessions)
    original = {"theme": "dark", "tags": ["a"]}
    for _ in range(2):  # a miss (the loaded snapshot), then a hit (the cached one)
        entity = profiles.get(1)
        assert entity is not None and entity.prefs == original
        entity.prefs["theme"] = "light"  # never saved
        entity.prefs["tags"].append("b")
    for _ in range(2):
        (listed,) = profiles.query("all", select(Profile))
        assert listed.prefs == original
        listed.prefs["tags"].append("c")
    with sessions() as session:
        attached = profiles.get(1, session=session)
        assert attached is not None
        attached.prefs["tags"].append("d")
        session.rollback()
    fresh = profiles.get(1)
    assert fresh is not None and fresh.prefs == original
    assert profiles.get_many([1])[1].prefs == original
    profiles.close()
