"""CachedRepository keys: every accepted spelling of a primary key is the key a commit invalidates.

Run on SQLite and PostgreSQL, on the in-process backend and the real Redis.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy
import pytest
from sqlalchemy import CHAR, DateTime, Numeric, String, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from cachekit import Cache
from cachekit.backends.base import Backend
from cachekit.backends.memory import MemoryBackend
from cachekit.backends.redis import RedisBackend
from cachekit.sqlalchemy import CachedRepository
from tests.test_sqlalchemy_repository import DATABASES, Database, make_database

# SQLite has no DECIMAL: SQLAlchemy says so once per engine, and converts.
pytestmark = pytest.mark.filterwarnings("ignore:Dialect sqlite\\+pysqlite does \\*not\\*")


class Base(DeclarativeBase):
    pass


class Price(Base):
    __tablename__ = "prices"

    amount: Mapped[Decimal] = mapped_column(Numeric(10, 2), primary_key=True)
    label: Mapped[str] = mapped_column(String(20))


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(20))


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> Iterator[Database]:
    with make_database(request.param, tmp_path, namespace) as database:
        Base.metadata.create_all(database.engine)
        yield database


@pytest.fixture(
    params=["memory", pytest.param("redis", marks=pytest.mark.redis)], ids=["memory", "redis"]
)
def cache(request: pytest.FixtureRequest, namespace: str) -> Iterator[Cache]:
    backend: Backend
    if request.param == "redis":
        backend = RedisBackend.from_url(request.getfixturevalue("redis_server"))
    else:
        backend = MemoryBackend()
    yield Cache(backend, namespace=namespace, ttl=300)
    if isinstance(backend, RedisBackend):
        keys = list(backend.client.scan_iter(match=namespace + ":*"))
        if keys:
            backend.client.delete(*keys)
    backend.close()


def relabel(db: Database, model: type[Any], pk: Any, label: str) -> None:
    """A committed UPDATE through a tracked session, as an application would write."""
    with db.Session.begin() as session:
        session.get(model, pk).label = label


def assert_every_spelling_reads(
    repo: CachedRepository[Any], spellings: list[Any], label: str
) -> None:
    for spelling in spellings:
        found = repo.get(spelling)
        assert found is not None and found.label == label, f"get({spelling!r})"


def test_numeric_keys_of_one_row_are_one_key(cache: Cache, db: Database) -> None:
    with db.Session.begin() as session:
        session.add_all([Price(amount=Decimal("1.50"), label="old"), Price(amount=2, label="x")])
    repo = CachedRepository(cache, Price, session_factory=db.Session)
    spellings = ["1.5", 1.5, Decimal("1.50"), Decimal("1.5"), "1.50", Decimal("15E-1")]
    assert_every_spelling_reads(repo, spellings, "old")  # each spelling cached, then hit
    assert {repo.key(spelling) for spelling in spellings} == {'prices:"1.5"'}
    assert {repo.pk_tag(spelling) for spelling in spellings} == {'prices:"1.5"'}
    relabel(db, Price, Decimal("1.50"), "new")
    assert_every_spelling_reads(repo, spellings, "new")  # no spelling kept the old row
    assert repo.get(2).label == repo.get("2.00").label == "x"  # type: ignore[union-attr]
    for bad, error in ((True, TypeError), ("abc", ValueError), (float("nan"), ValueError)):
        with pytest.raises(error):
            repo.get(bad)
    repo.close()


def test_integer_keys_of_one_row_are_one_key(cache: Cache, db: Database) -> None:
    with db.Session.begin() as session:
        session.add(Item(id=1, label="old"))
    repo = CachedRepository(cache, Item, session_factory=db.Session)
    spellings = [1, "1", numpy.int64(1)]
    assert_every_spelling_reads(repo, spellings, "old")
    relabel(db, Item, 1, "new")
    assert_every_spelling_reads(repo, spellings, "new")
    # What an Integer column cannot take exactly is refused, not cached under its own key.
    for bad, error in ((True, TypeError), (1.0, TypeError), ("1.5", ValueError)):
        with pytest.raises(error):
            repo.get(bad)
        with pytest.raises(error):
            repo.invalidate([bad])
    repo.close()


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(Uuid(as_uuid=False), primary_key=True)
    label: Mapped[str] = mapped_column(String(20))


class Code(Base):
    __tablename__ = "codes"

    code: Mapped[str] = mapped_column(CHAR(4), primary_key=True)
    label: Mapped[str] = mapped_column(String(20))


class Event(Base):
    __tablename__ = "events"

    at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    label: Mapped[str] = mapped_column(String(20))


def test_spellings_the_database_takes_as_equal_are_one_key(cache: Cache, db: Database) -> None:
    """A UUID string in capitals, a CHAR without its padding, one instant at two offsets."""
    row_id = "6f1c2a8e-0b7d-4c1e-9a3f-2d5e8b7c6a10"
    utc = datetime.datetime(2026, 1, 2, 12, tzinfo=datetime.UTC)
    plus2 = utc.astimezone(datetime.timezone(datetime.timedelta(hours=2)))
    with db.Session.begin() as session:
        session.add_all(
            [
                Token(id=row_id, label="old"),
                Code(code="ab", label="old"),
                Event(at=utc, label="old"),
            ]
        )
    cases: list[tuple[type[Any], Any, list[Any]]] = [
        (Token, row_id, [row_id, row_id.upper(), "{" + row_id + "}"]),
        (Code, "ab", ["ab", "ab  "]),
    ]
    if db.engine.dialect.name == "postgresql":  # SQLite keeps no offset to compare
        cases.append((Event, utc, [utc, plus2]))
    for model, pk, spellings in cases:
        repo = CachedRepository(cache, model, session_factory=db.Session)
        assert_every_spelling_reads(repo, spellings, "old")
        assert len({repo.key(spelling) for spelling in spellings}) == 1
        relabel(db, model, pk, "new")
        assert_every_spelling_reads(repo, spellings, "new")
        repo.close()
