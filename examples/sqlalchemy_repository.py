"""SQLAlchemy rows behind cachekit: the cache changes after a commit, never before.

Part 1 uses ``CachedRepository``: reads by primary key and named queries are cached as
column snapshots; commits (through the repository or any tracked session), rollbacks
and SAVEPOINTs are followed exactly. Part 2 wraps a repository class an application
already has: ``@cache.cached(tags=...)`` on its reads and ``cache.invalidate_tags`` in
its writes, after the commit, give the same guarantees.

Run: python examples/sqlalchemy_repository.py [--postgres URL] [--redis URL | --memcached HOST:PORT]
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from _common import expect, make_backend
from sqlalchemy import Engine, String, create_engine, event, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from cachekit import MISSING, Cache
from cachekit.sqlalchemy import CachedRepository

USERS = 300


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(60))
    org: Mapped[int]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--postgres", metavar="URL", help="e.g. postgresql://postgres@127.0.0.1/test"
    )
    server = parser.add_mutually_exclusive_group()
    server.add_argument("--redis", metavar="URL", help="e.g. redis://127.0.0.1:6379/0")
    server.add_argument("--memcached", metavar="HOST:PORT", help="e.g. 127.0.0.1:11211")
    return parser.parse_args()


@contextmanager
def open_database(url: str | None) -> Iterator[Engine]:
    """SQLite in memory, or a PostgreSQL schema of this run's own, dropped at the end."""
    if url is None:
        engine = create_engine("sqlite://")
        # pysqlite's own BEGIN handling breaks SAVEPOINTs: SQLAlchemy's documented fix.
        event.listen(
            engine, "connect", lambda dbapi, record: setattr(dbapi, "isolation_level", None)
        )
        event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN"))
        yield engine
        engine.dispose()
        return
    base = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    schema = f"cachekit_example_{uuid.uuid4().hex[:8]}"
    with base.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield base.execution_options(schema_translate_map={None: schema})
    finally:
        with base.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        base.dispose()


class SelectCounter:
    """Counts the SELECTs an engine sends, the way a database would see them."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.count += statement.lstrip().upper().startswith("SELECT")


def reads(users: CachedRepository[User], selects: SelectCounter) -> None:
    before = selects.count
    users.get_many(range(1, 101))  # 100 misses: one SELECT ... WHERE id IN (...)
    first = selects.count - before
    found = users.get_many(range(1, 101))  # 100 hits: no SELECT
    second = selects.count - before - first
    print(f"  get_many of 100 ids: {first} SELECT cold, {second} warm")
    expect(first == 1 and second == 0 and len(found) == 100, "one SELECT, then all hits")


def transactions(users: CachedRepository[User], Session: sessionmaker[Session]) -> None:
    """A commit changes the cache after it; a rollback or a rolled-back SAVEPOINT never."""
    cache = users.cache
    with Session.begin() as session:
        ada = session.get(User, 7)
        expect(ada is not None, "user 7 exists")
        ada.name = "Ada"  # type: ignore[union-attr]
        users.update(ada, session=session)  # type: ignore[arg-type]
        expect(cache.get(users.key(7))["name"] == "user 7", "nothing changes before the commit")
    expect(cache.get(users.key(7))["name"] == "Ada", "after it: invalidated and reloaded")

    with Session() as session:
        session.get(User, 8).name = "rolled back"  # type: ignore[union-attr]
        session.flush()
        own = users.get(8, session=session)
        expect(own is not None and own.name == "rolled back", "a session reads its own writes")
        session.rollback()
    expect(cache.get(users.key(8))["name"] == "user 8", "a rollback leaves the cache alone")

    with Session.begin() as session:
        savepoint = session.begin_nested()
        session.get(User, 9).name = "inside a rolled-back SAVEPOINT"  # type: ignore[union-attr]
        session.flush()
        savepoint.rollback()
        session.get(User, 10).name = "Grace"  # type: ignore[union-attr]
    expect(cache.get(users.key(9))["name"] == "user 9", "the SAVEPOINT's change was dropped")
    expect(cache.get(users.key(10))["name"] == "Grace", "the rest of the transaction applied")


def queries_and_bulk(users: CachedRepository[User], Session: sessionmaker[Session]) -> None:
    in_org_3 = select(User).where(User.org == 3).order_by(User.id)
    count = len(users.query("org:3", in_org_3, ttl=60))
    with Session.begin() as session:  # a plain session: tracked through its sessionmaker
        session.add(User(id=USERS + 1, name="new", org=3))
    expect(users.cache.get(users.query_key("org:3")) is MISSING, "an insert drops queries")
    expect(len(users.query("org:3", in_org_3)) == count + 1, "and the next read sees the row")

    with Session.begin() as session:  # ORM bulk UPDATE: rows unknown, so every entry goes
        session.execute(update(User).where(User.org == 4).values(name="bulk"))
    bulk = users.get(4)
    expect(bulk is not None and bulk.name == "bulk", "bulk statements are caught too")


def repository_part(cache: Cache, Session: sessionmaker[Session], selects: SelectCounter) -> None:
    """CachedRepository through commits, a rollback, SAVEPOINTs, queries and bulk writes."""
    users = CachedRepository(cache, User, session_factory=Session, ttl=300)
    reads(users, selects)
    transactions(users, Session)
    queries_and_bulk(users, Session)
    users.close()


def build_user_store(cache: Cache, Session: sessionmaker[Session]) -> Any:
    """A repository the application already had, made cached with two habits:
    tag every cached read with the rows it depends on, and invalidate those tags in
    each write method after its transaction committed."""

    class UserStore:
        @cache.cached(key="user:{user_id}", tags=lambda row, self, user_id: [f"user:{user_id}"])
        def find(self, user_id: int) -> dict[str, Any] | None:
            with Session() as session:
                user = session.get(User, user_id)
                return None if user is None else {"id": user.id, "name": user.name}

        @cache.cached(
            key="org:{org}",
            tags=lambda rows, self, org: [f"org:{org}", *(f"user:{r['id']}" for r in rows)],
        )
        def members_of(self, org: int) -> list[dict[str, Any]]:
            with Session() as session:
                stmt = select(User).where(User.org == org).order_by(User.id)
                return [{"id": u.id, "name": u.name} for u in session.scalars(stmt)]

        def move(self, user_id: int, org: int) -> None:
            with Session.begin() as session:
                session.get(User, user_id).org = org  # type: ignore[union-attr]
            # After the commit; a rollback raised above and skips it. The tags drop the
            # user, its old org's list (it holds user:ID) and its new org's list.
            cache.invalidate_tags([f"user:{user_id}", f"org:{org}"])

    return UserStore()


def wrapped_part(cache: Cache, Session: sessionmaker[Session]) -> None:
    store = build_user_store(cache, Session)
    store.find(11)
    store.members_of(1)
    store.members_of(2)
    moving = store.members_of(1)[0]["id"]
    store.move(moving, 2)
    expect(all(m["id"] != moving for m in store.members_of(1)), "left the old org's list")
    expect(any(m["id"] == moving for m in store.members_of(2)), "joined the new one's")


def main() -> None:
    args = parse_args()
    backend = make_backend(args)
    cache = Cache(backend, namespace=f"example-sqlalchemy-{uuid.uuid4().hex[:8]}", ttl=300)
    with open_database(args.postgres) as engine:
        Base.metadata.create_all(engine)
        Session = sessionmaker(engine)
        with Session.begin() as session:
            session.add_all([User(id=i, name=f"user {i}", org=i % 5) for i in range(1, USERS + 1)])
        selects = SelectCounter(engine)
        print(f"SQLAlchemy repository on {type(backend).__name__} and {engine.dialect.name}")
        repository_part(cache, Session, selects)
        wrapped_part(cache, Session)
        stats = cache.stats()
        print(f"  SELECTs issued in all: {selects.count}")
        print(f"  {stats} hit ratio {stats.hit_ratio:.1%}")
        expect(stats.errors == 0, "no backend errors (cachekit fails open, so they would hide)")
        with Session() as session:
            rows = {u.id: u.name for u in session.scalars(select(User))}
        for pk in range(1, USERS + 2):
            cached = cache.get(f"users:{pk}")
            expect(cached is MISSING or cached["name"] == rows.get(pk), f"user {pk} agrees")
        print("  the cache agrees with the database")
    backend.close()


if __name__ == "__main__":
    main()
