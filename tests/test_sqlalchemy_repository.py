"""CachedRepository: the cache changes after commits only, and agrees with the database after.

Every scenario runs on each backend against SQLite and, marked ``postgres``, against the
real PostgreSQL on 127.0.0.1:5432 (a schema of its own per test).
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from redis.connection import AbstractConnection
from sqlalchemy import (
    DateTime,
    Engine,
    LargeBinary,
    String,
    Uuid,
    create_engine,
    delete,
    event,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from cachekit import MISSING, Cache
from cachekit.backends.base import Backend
from cachekit.backends.memory import MemoryBackend
from cachekit.backends.redis import RedisBackend
from cachekit.exceptions import BackendError, ConfigurationError, MissingDependencyError
from cachekit.sqlalchemy import CachedRepository
from tests.conftest import RedisCommands, require
from tests.servers import ServerError, Servers, binary, redis_command
from tests.support import CountingBackend

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_USERS = ("postgres", "root")
EPOCH = datetime(2024, 1, 1, 12, 0, 0)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(60))
    org: Mapped[int]
    version: Mapped[int] = mapped_column(default=0)
    seen: Mapped[datetime] = mapped_column(DateTime)
    token: Mapped[uuid.UUID] = mapped_column(Uuid)
    avatar: Mapped[bytes | None] = mapped_column(LargeBinary)


class Membership(Base):
    """A composite primary key whose string part may contain the key separator."""

    __tablename__ = "memberships"

    org: Mapped[int] = mapped_column(primary_key=True)
    login: Mapped[str] = mapped_column(String(60), primary_key=True)
    role: Mapped[str] = mapped_column(String(20))


def new_user(i: int, *, org: int | None = None, name: str | None = None) -> User:
    return User(
        id=i,
        name=name or f"user {i}",
        org=i % 5 if org is None else org,
        seen=EPOCH + timedelta(minutes=i),
        token=uuid.UUID(int=i),
        avatar=bytes([i % 256, 0, 255]) if i % 2 else None,
    )


def snapshot(obj: Any) -> dict[str, Any]:
    return {attr.key: getattr(obj, attr.key) for attr in inspect(type(obj)).column_attrs}


# -- databases ------------------------------------------------------------------------------


@dataclass
class Database:
    """An engine with the test's tables, a tracked-able sessionmaker, and a SELECT counter."""

    kind: str
    engine: Engine
    Session: sessionmaker[Session]
    schema: str | None = None  # PostgreSQL: the test's own
    statements: list[str] = field(default_factory=list)

    def writer(self) -> Session:
        """A session of the tracked sessionmaker whose transactions lock for writing at
        BEGIN on SQLite (the option means nothing to PostgreSQL)."""
        return self.Session(bind=self.engine.execution_options(**{IMMEDIATE: True}))

    def selects(self) -> int:
        return sum(1 for sql in self.statements if sql.lstrip().upper().startswith("SELECT"))

    def users(self) -> dict[int, dict[str, Any]]:
        """Every row as stored now, read in a fresh session."""
        with self.Session() as session:
            return {u.id: snapshot(u) for u in session.scalars(select(User))}

    def seed(self, count: int) -> None:
        """Insert rows on a plain connection: no session event sees them, so a
        repository neither invalidates nor refills anything for them."""
        rows = [{**snapshot(new_user(i)), "version": 0} for i in range(1, count + 1)]
        with self.engine.begin() as connection:
            connection.execute(insert(User), rows)
            if self.schema is not None:  # explicit ids leave the serial behind
                table = f'"{self.schema}".users'
                connection.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {count})"
                )


@functools.cache
def postgres_url() -> str | None:
    """A URL for the ``test`` database, as whichever trusted user exists (or ``None``)."""
    for user in POSTGRES_USERS:
        dsn = f"host=127.0.0.1 port=5432 dbname=test user={user} connect_timeout=2"
        try:
            psycopg.connect(dsn).close()
        except psycopg.Error:
            continue
        return f"postgresql+psycopg://{user}@127.0.0.1:5432/test"
    return None


#: Execution option of a SQLite engine whose transactions take the write lock at BEGIN.
IMMEDIATE = "test_begin_immediate"


def _sqlite_engine(path: Path, *, wal: bool) -> Engine:
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})
    sqlite_transactions(engine, wal=wal)
    return engine


def sqlite_transactions(engine: Engine, *, wal: bool) -> None:
    """pysqlite's (and aiosqlite's) own BEGIN handling breaks SAVEPOINTs; SQLAlchemy's
    documented fix, on a sync engine or an async one's ``sync_engine``.

    With ``wal``, readers read while a writer's transaction is open (as on
    PostgreSQL), and an engine with the :data:`IMMEDIATE` option takes the write lock
    at BEGIN, so writers wait for each other instead of failing to upgrade a read lock.
    """

    @event.listens_for(engine, "connect")
    def autocommit_driver(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        if wal:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

    @event.listens_for(engine, "begin")
    def begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(IMMEDIATE)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def make_database(
    kind: str, tmp_path: Path, namespace: str, *, wal: bool = False
) -> Iterator[Database]:
    """SQLite in a file of the test's own, or a PostgreSQL schema named after the test."""
    if kind == "sqlite":
        base = _sqlite_engine(tmp_path / "db.sqlite", wal=wal)
        engine = base
    else:
        url = postgres_url()
        require("PostgreSQL on 127.0.0.1:5432", url is not None, "no trusted user answered")
        assert url is not None
        base = create_engine(url, pool_size=10)
        with base.begin() as connection:
            connection.exec_driver_sql(f'CREATE SCHEMA "{namespace}"')
        engine = base.execution_options(schema_translate_map={None: namespace})
    db = Database(kind, engine, sessionmaker(engine), None if kind == "sqlite" else namespace)
    event.listen(base, "before_cursor_execute", lambda *args: db.statements.append(args[2]))
    try:
        Base.metadata.create_all(engine)
        yield db
    finally:
        if kind != "sqlite":
            with base.begin() as connection:
                connection.exec_driver_sql(f'DROP SCHEMA "{namespace}" CASCADE')
        base.dispose()


DATABASES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> Iterator[Database]:
    with make_database(request.param, tmp_path, namespace) as database:
        yield database


@pytest.fixture
def sqlite_db(tmp_path: Path, namespace: str) -> Iterator[Database]:
    with make_database("sqlite", tmp_path, namespace) as database:
        yield database


def make_repository(
    cache: Cache, db: Database, model: type[Any] = User, **options: Any
) -> CachedRepository[Any]:
    return CachedRepository(cache, model, session_factory=db.Session, ttl=300, **options)


@pytest.fixture
def cache(backend: Backend, namespace: str) -> Cache:
    return Cache(backend, namespace=namespace, ttl=300)


@pytest.fixture
def repo(cache: Cache, db: Database) -> Iterator[CachedRepository[User]]:
    repository = make_repository(cache, db)
    yield repository
    repository.close()


@pytest.fixture
def local_cache(namespace: str) -> Cache:
    """For behaviour of the repository itself, which no backend changes: the
    commit/rollback/SAVEPOINT/bulk scenarios run on every backend instead."""
    return Cache(MemoryBackend(), namespace=namespace, ttl=300)


@pytest.fixture
def local_repo(local_cache: Cache, db: Database) -> Iterator[CachedRepository[User]]:
    repository = make_repository(local_cache, db)
    yield repository
    repository.close()


QUERIES: dict[str, Callable[[], Any]] = {
    "org:1": lambda: select(User).where(User.org == 1).order_by(User.id),
    "named-3": lambda: select(User).where(User.name.like("%3")).order_by(User.id),
    "all": lambda: select(User).order_by(User.id),
}


def warm(repo: CachedRepository[User], pks: list[int]) -> None:
    repo.get_many(pks)
    for name, stmt in QUERIES.items():
        repo.query(name, stmt())


def assert_cache_agrees(repo: CachedRepository[User], db: Database, pks: list[int]) -> int:
    """Every entity and query entry a reader could be served equals the database now.

    Returns how many entries were compared, so tests can insist the check was not empty.
    """
    cached = repo.cache.get_many([repo.key(pk) for pk in pks])  # tag-checked, as get() is
    queries = {name: repo.cache.get(repo.query_key(name)) for name in QUERIES}
    return compare_with_database(db, repo, pks, cached, queries)


def compare_with_database(
    db: Database, repo: Any, pks: list[int], cached: dict[str, Any], queries: dict[str, Any]
) -> int:
    """:func:`assert_cache_agrees` once the entries are read (by ``Cache`` or
    ``AsyncCache``): ``cached`` by entity key, ``queries`` by query name."""
    rows = db.users()
    for pk in pks:
        value = cached.get(repo.key(pk), MISSING)
        assert value is MISSING or value == rows.get(pk), f"entity {pk}: {value} != {rows.get(pk)}"
    compared = len(cached)
    with db.Session() as session:
        for name, stmt in QUERIES.items():
            if queries[name] is not MISSING:
                fresh = [snapshot(u) for u in session.scalars(stmt())]
                assert queries[name] == fresh, f"query {name} disagrees with the database"
                compared += 1
    return compared


# -- reads ----------------------------------------------------------------------------------


def test_entities_are_column_snapshots_returned_detached(
    local_repo: CachedRepository[User], db: Database
) -> None:
    repo = local_repo
    db.seed(10)
    first = repo.get(3)
    assert first is not None and inspect(first).detached
    db.statements.clear()
    again = repo.get(3)
    assert db.selects() == 0, "a hit reads no row"
    assert again is not None and again is not first
    assert snapshot(again) == db.users()[3]  # datetime, UUID, bytes and None round-trip
    assert repo.cache.get(repo.key(3)) == db.users()[3], "a plain dict, never a pickled object"
    assert repo.get(404) is None
    with db.Session() as session:
        db.statements.clear()
        merged = repo.get(3, session=session)
        assert db.selects() == 0 and merged in session, "merged without a SELECT"
        assert repo.get(3, session=session) is merged, "the session's own instance is kept"
        merged.name = "renamed in session"
        session.commit()
    assert repo.get(3) is not None and repo.get(3).name == "renamed in session"  # type: ignore[union-attr]


def test_composite_keys_are_unambiguous(local_cache: Cache, db: Database) -> None:
    cache = local_cache
    repo = make_repository(cache, db, Membership)
    with db.Session.begin() as session:
        session.add_all(
            [
                Membership(org=1, login="a:b", role="admin"),
                Membership(org=1, login="a", role="member"),
                Membership(org=2, login="b", role="owner"),
            ]
        )
    assert repo.key((1, "a:b")) == 'memberships:1:"a:b"'
    assert repo.key((1, "a:b")) != repo.key((1, "a"))
    assert repo.key(("1", "a")) == repo.key((1, "a")), "components take their column's type"
    found = repo.get_many([(1, "a:b"), (2, "b"), (9, "none")])
    assert {pk: m.role for pk, m in found.items()} == {(1, "a:b"): "admin", (2, "b"): "owner"}
    member = repo.get((1, "a"))
    assert member is not None
    member.role = "admin"
    with db.Session.begin() as session:
        repo.update(member, session=session)  # a detached instance from the cache
        assert repo.delete((2, "b"), session=session)
    assert cache.get(repo.key((1, "a")))["role"] == "admin", "refilled after the commit"
    assert repo.get((2, "b")) is None
    with pytest.raises(ValueError, match="2 parts"):
        repo.get(1)
    repo.close()


#: Cache calls of ``get_many`` of 100 ids, 30 of them misses: the read, the hits' tag
#: check, the tag tokens of the loaded rows; leases, new tokens; the epoch before the
#: load and again after creating tokens (cachekit.core.tags); one batch fill.
GET_MANY_CALLS = {"get_many": 3, "add_many": 2, "get": 2, "compare_and_set_many": 1}


def test_get_many_loads_30_misses_with_one_select_and_one_batch_fill(
    backend: Backend, namespace: str, sqlite_db: Database
) -> None:
    sqlite_db.seed(100)
    counting = CountingBackend(backend)
    repo = make_repository(Cache(counting, namespace=namespace, ttl=300), sqlite_db)
    ids = list(range(1, 101))
    repo.get_many(ids[:70])
    sqlite_db.statements.clear()
    counting.calls.clear()
    found = repo.get_many(ids)
    assert len(found) == 100 and list(found) == ids
    assert sqlite_db.selects() == 1
    assert " IN (" in next(sql for sql in sqlite_db.statements if "SELECT" in sql)
    assert dict(+counting.calls) == GET_MANY_CALLS
    repo.close()


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of this module's own: ``INFO commandstats`` then counts only our commands."""
    require("the redis-server binary", binary("redis-server") is not None)
    workdir = tmp_path_factory.mktemp("private-redis")
    with Servers(workdir) as servers:
        try:
            server = servers.start("redis", redis_command(workdir))
        except ServerError as exc:
            require("a private redis-server", False, str(exc))
            raise  # not reached: require() skipped or failed
        yield f"redis://{server.address}/0"


@pytest.mark.redis
def test_get_many_round_trips_on_redis(
    private_redis: str, monkeypatch: pytest.MonkeyPatch, namespace: str, sqlite_db: Database
) -> None:
    sqlite_db.seed(100)
    backend = RedisBackend.from_url(private_redis, timeout=2.0)
    repo = make_repository(Cache(backend, namespace=namespace, ttl=300), sqlite_db)
    ids = list(range(1, 101))
    repo.get_many(ids[:70])
    sqlite_db.statements.clear()
    commands = RedisCommands(backend.client, Counter())
    original = AbstractConnection.send_packed_command

    def counting(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        commands.writes["writes"] += 1  # one command, or a whole pipeline
        original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    trips, counted = commands.measure(lambda: repo.get_many(ids))
    assert sqlite_db.selects() == 1
    # MGET (entries), MGET (the hits' tags), pipeline of 30 SET NX (leases), GET (epoch),
    # MGET (tags of the loaded rows), pipeline of 30 SET NX (their new tag tokens),
    # GET (the epoch again, after creating tokens), pipeline of 30 EVALSHA.
    assert trips == 8
    # Commands a script runs inside Redis count too: each compare-and-set is a GET and
    # a SET there. So GET: the epoch twice + 30; SET: 30 leases + 30 tokens + 30 fills.
    expected = {"mget": 3, "get": 32, "set": 90, "evalsha": 30}
    assert {name: n for name, n in counted.items() if n and name != "info"} == expected
    repo.close()
    backend.close()


# -- writes, commits and rollbacks ----------------------------------------------------------


@pytest.mark.parametrize("policy", ["write-through", "invalidate"])
def test_commit_invalidates_then_refills(
    cache: Cache, db: Database, policy: str, namespace: str
) -> None:
    repo = make_repository(cache, db, write_policy=policy)
    db.seed(20)
    warm(repo, list(range(1, 21)))
    with db.Session.begin() as session:
        user = session.get(User, 4)
        assert user is not None
        user.org = 1  # moves into the "org:1" query
        repo.update(user, session=session)
        repo.add(new_user(100), session=session)
        generated = User(name="no id given", org=2, seen=EPOCH, token=uuid.uuid4())
        repo.add(generated, session=session)
        session.flush()
        generated_id = generated.id
        assert repo.delete(7, session=session)
        assert cache.get(repo.key(4))["org"] == 4 % 5, "nothing changes before the commit"
        assert cache.get(repo.query_key("org:1")) is not MISSING
        db.statements.clear()
    reloads = db.selects()
    refilled = cache.get(repo.key(4))
    if policy == "write-through":
        assert reloads == 1, "one SELECT reloads every row the transaction wrote"
        assert refilled == db.users()[4]
        assert cache.get(repo.key(100)) == db.users()[100]
        assert cache.get(repo.key(generated_id)) == db.users()[generated_id]
    else:
        assert refilled is MISSING and reloads == 0
    assert cache.get(repo.key(7)) is MISSING
    assert cache.get(repo.query_key("org:1")) is MISSING
    assert [u.id for u in repo.query("org:1", QUERIES["org:1"]())] == [1, 4, 6, 11, 16]
    assert assert_cache_agrees(repo, db, [*range(1, 21), 100, generated_id]) > 0
    repo.close()


def test_rollback_leaves_the_cache_alone(
    repo: CachedRepository[User], db: Database, cache: Cache
) -> None:
    db.seed(20)
    warm(repo, list(range(1, 21)))
    before = {pk: cache.get(repo.key(pk)) for pk in range(1, 21)}
    with db.Session() as session:
        user = session.get(User, 5)
        assert user is not None
        user.name = "never committed"
        session.add(new_user(200))
        session.execute(update(User).where(User.org == 2).values(name="bulk, rolled back"))
        session.flush()
        assert repo.get(5, session=session).name == "never committed", "reads its own writes"  # type: ignore[union-attr]
        assert repo.get(5).name == "user 5", "others read the committed row"  # type: ignore[union-attr]
        assert [u.id for u in repo.query("org:1", QUERIES["org:1"](), session=session)][-1] == 16
        session.rollback()
    assert {pk: cache.get(repo.key(pk)) for pk in range(1, 21)} == before
    assert cache.get(repo.query_key("org:1")) is not MISSING
    assert assert_cache_agrees(repo, db, [*range(1, 21), 200]) == 20 + len(QUERIES)


def test_savepoint_rollback_drops_only_its_own_changes(
    repo: CachedRepository[User], db: Database, cache: Cache
) -> None:
    db.seed(20)
    warm(repo, list(range(1, 21)))
    with db.Session.begin() as session:
        session.get(User, 1).name = "outer"  # type: ignore[union-attr]
        with session.begin_nested():
            session.get(User, 2).name = "released"  # type: ignore[union-attr]
        savepoint = session.begin_nested()
        session.get(User, 3).name = "rolled back"  # type: ignore[union-attr]
        session.execute(delete(User).where(User.org == 4))  # bulk, inside the savepoint
        session.flush()
        savepoint.rollback()
        with session.begin_nested():
            inner = session.begin_nested()
            session.get(User, 5).name = "rolled back inside a released one"  # type: ignore[union-attr]
            session.flush()
            inner.rollback()
            session.get(User, 6).name = "released inside a released one"  # type: ignore[union-attr]
    names = {pk: cache.get(repo.key(pk))["name"] for pk in range(1, 7)}
    assert names == {
        1: "outer",
        2: "released",
        3: "user 3",
        4: "user 4",
        5: "user 5",
        6: "released inside a released one",
    }
    # Every query carries the table tag, which the committed updates invalidated.
    assert assert_cache_agrees(repo, db, list(range(1, 21))) == 20


def test_writes_outside_the_repository_are_caught(
    local_repo: CachedRepository[User], db: Database, local_cache: Cache
) -> None:
    repo, cache = local_repo, local_cache
    db.seed(20)
    warm(repo, [*range(1, 21), 300])
    assert cache.get(repo.key(300)) is None, "absence is cached..."
    with db.Session.begin() as session:  # plain ORM work: flushes
        session.get(User, 8).name = "flushed"  # type: ignore[union-attr]
        session.delete(session.get(User, 9))
        session.add(new_user(300))
    assert cache.get(repo.key(300)) == db.users()[300], "...and an insert replaces it"
    assert cache.get(repo.key(9)) is MISSING
    repo.get_many([11, 111])
    with db.Session.begin() as session:  # a changed primary key: the old row is gone
        session.get(User, 11).id = 111  # type: ignore[union-attr]
    assert cache.get(repo.key(11)) is MISSING and cache.get(repo.key(111))["id"] == 111
    warm(repo, list(range(1, 21)))
    with db.Session.begin() as session:  # ORM bulk UPDATE: rows unknown, so all entries
        session.execute(update(User).where(User.org == 3).values(version=User.version + 1))
    assert all(cache.get(repo.key(pk)) is MISSING for pk in range(1, 21))
    assert all(cache.get(repo.query_key(name)) is MISSING for name in QUERIES)
    warm(repo, list(range(1, 21)))
    with db.Session.begin() as session:  # Core DML on the table, through the session
        session.execute(insert(User.__table__).values({**snapshot(new_user(301)), "version": 0}))
    assert cache.get(repo.query_key("all")) is MISSING
    warm(repo, list(range(1, 21)))
    with db.Session.begin() as session:  # on the session's connection: no ORM event sees it
        raw = update(User.__table__).where(User.__table__.c.id == 10).values(name="raw")
        session.connection().execute(raw)
        repo.mark_written(session, [10])
    assert cache.get(repo.key(10))["name"] == "raw"
    assert assert_cache_agrees(repo, db, [*range(1, 21), 111, 300, 301]) > 0


def test_declared_tags_spare_queries_from_unrelated_writes(
    local_cache: Cache, db: Database
) -> None:
    cache = local_cache
    repo = make_repository(cache, db, row_tags=lambda row: [f"users:org={row['org']}"])
    db.seed(20)
    stmt = select(User).where(User.org == 1).order_by(User.id)
    by_org = functools.partial(repo.query, "org:1", stmt, tags=["users:org=1"])
    plain = functools.partial(repo.query, "plain:org:1", stmt)
    by_org()
    plain()
    with db.Session.begin() as session:
        repo.add(new_user(50, org=2), session=session)
    assert cache.get(repo.query_key("org:1")) is not MISSING, "an insert elsewhere spares it"
    assert cache.get(repo.query_key("plain:org:1")) is MISSING, "the table tag did not"
    with db.Session.begin() as session:
        repo.add(new_user(51, org=1), session=session)
    assert cache.get(repo.query_key("org:1")) is MISSING
    assert [u.id for u in by_org()][-1] == 51
    with db.Session.begin() as session:
        session.get(User, 50).org = 1  # type: ignore[union-attr] - an update moving a row in
    assert [u.id for u in by_org()][-2:] == [50, 51]
    assert repo.delete_where(User.org == 2) == 4  # rows read whole, for their row_tags
    assert repo.delete(3)
    assert cache.get(repo.query_key("org:1")) is not MISSING, "deletes elsewhere spare it"
    assert repo.delete(51)
    assert cache.get(repo.query_key("org:1")) is MISSING
    assert [u.id for u in by_org()] == [1, 6, 11, 16, 50]
    repo.close()


def test_a_failed_invalidation_reaches_the_committer(
    local_repo: CachedRepository[User],
    db: Database,
    local_cache: Cache,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo, cache = local_repo, local_cache
    db.seed(3)
    repo.get(1)

    def refuse(tags: Any) -> None:
        raise BackendError("journal full")

    monkeypatch.setattr(cache, "invalidate_tags", refuse)
    with pytest.raises(BackendError), db.Session() as session:
        session.get(User, 1).name = "committed anyway"  # type: ignore[union-attr]
        session.commit()
    assert db.users()[1]["name"] == "committed anyway", "the commit itself stands"
    monkeypatch.undo()
    with db.Session.begin() as session:  # the session machinery is not left broken
        session.get(User, 2).name = "next"  # type: ignore[union-attr]
    assert cache.get(repo.key(2))["name"] == "next"


# -- bulk deletes ---------------------------------------------------------------------------


def test_delete_where_100_of_1000_rows(
    repo: CachedRepository[User], db: Database, cache: Cache
) -> None:
    db.seed(1000)
    pks = list(range(1, 1001))
    warm(repo, pks)
    db.statements.clear()
    deleted = repo.delete_where(User.id % 10 == 0, chunk=40)
    assert deleted == 100
    assert db.selects() == 3, "the primary keys in chunks of 40: 40 + 40 + 20"
    assert len(db.users()) == 900
    assert all(cache.get(repo.key(pk)) is MISSING for pk in range(10, 1001, 10))
    # The other 900 entities stay cached; the queries carry the table tag, which any
    # write drops (a delete can shift a page or an aggregate it did not return).
    assert assert_cache_agrees(repo, db, pks) == 900
    warm(repo, list(range(10, 1001, 10)))  # absent now, and cached as absent
    assert assert_cache_agrees(repo, db, pks) == 1000 + len(QUERIES)


def test_delete_where_in_a_given_session_follows_its_transaction(
    repo: CachedRepository[User], db: Database, cache: Cache
) -> None:
    db.seed(50)
    pks = list(range(1, 51))
    with db.Session() as session:
        assert repo.delete_where(User.org == 0, session=session) == 10
        warm(repo, pks)  # readers refill from the committed rows meanwhile
        session.rollback()
    assert assert_cache_agrees(repo, db, pks) == 50 + len(QUERIES)
    with db.Session() as session:
        assert repo.delete_where(User.org == 0, session=session) == 10
        warm(repo, pks)
        assert cache.get(repo.key(5)) is not None, "a reader refilled it before the commit"
        session.commit()
    assert cache.get(repo.key(5)) is MISSING, "invalidated again after the commit"
    assert assert_cache_agrees(repo, db, pks) == 40
    with pytest.raises(ConfigurationError):
        repo.delete_where(User.org == 1, chunk=0)


# -- configuration, packaging, examples -----------------------------------------------------


def test_configuration_errors(local_cache: Cache, sqlite_db: Database) -> None:
    cache = local_cache
    with pytest.raises(ConfigurationError, match="write_policy"):
        make_repository(cache, sqlite_db, write_policy="write-behind")
    with pytest.raises(ConfigurationError, match="not a mapped class"):
        make_repository(cache, sqlite_db, dict)


@pytest.mark.parametrize("name", ["rows", "tracking", "base", "repository", "async_repository", ""])
def test_all_is_sorted_and_importable(name: str) -> None:
    module = importlib.import_module("cachekit.sqlalchemy" + (f".{name}" if name else ""))
    names = module.__all__
    assert names == sorted(
        names, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n)
    )
    assert all(hasattr(module, attr) for attr in names)


def test_missing_sqlalchemy_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.startswith("cachekit.sqlalchemy")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # what a missing package looks like
    with pytest.raises(MissingDependencyError, match=r"cachekit-layer\[sqlalchemy\]"):
        import cachekit.sqlalchemy  # noqa: F401


def run_example(name: str, *options: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), *options],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{name} {options}\n{result.stdout}\n{result.stderr}"
    return result.stdout


EXAMPLES = ["sqlalchemy_repository", "bulk_delete"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_on_sqlite_and_memory(name: str) -> None:
    assert "cache agrees with the database" in run_example(name)


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_on_postgres_and_redis(name: str, redis_server: str) -> None:
    url = postgres_url()
    require("PostgreSQL on 127.0.0.1:5432", url is not None)
    assert url is not None
    out = run_example(name, "--postgres", url, "--redis", redis_server)
    assert "RedisBackend" in out and "postgresql" in out


@pytest.mark.memcached
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_on_memcached(name: str, memcached_server: tuple[str, int]) -> None:
    host, port = memcached_server
    assert "MemcachedBackend" in run_example(name, "--memcached", f"{host}:{port}")
