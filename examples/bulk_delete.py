"""A bulk DELETE that the cache follows: select the primary keys, invalidate, delete by key.

``DELETE FROM events WHERE created < :cutoff`` touches rows nobody named, so nothing
would know which cache entries to drop. ``CachedRepository.delete_where`` selects the
matching rows in chunks (their keys; whole rows here, since ``row_tags`` reads their
columns), invalidates every entry that depends on them, deletes those rows by primary
key, and invalidates them again after the commit, in case a reader cached one in
between. The entities of the other 900 rows stay cached, and so does the query that
declared tags none of the deleted rows carry; queries tagged with the table are
dropped, since a delete can change a result it did not contribute to (a page shifts).

Run: python examples/bulk_delete.py [--postgres URL] [--redis URL | --memcached HOST:PORT]
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from _common import expect, make_backend
from sqlalchemy import DateTime, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy_repository import SelectCounter, open_database, parse_args

from cachekit import MISSING, Cache
from cachekit.sqlalchemy import CachedRepository

ROWS = 1_000
START = datetime(2024, 1, 1)


class Base(DeclarativeBase):
    pass


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    created: Mapped[datetime] = mapped_column(DateTime)


QUERIES = {
    "logins": select(Event).where(Event.kind == "login").order_by(Event.id),
    "latest": select(Event).order_by(Event.created.desc()).limit(20),
    "first": select(Event).order_by(Event.created).limit(20),
}
# "logins" declares the tag its rows carry (see row_tags below), so only writes of
# login events drop it; the others carry the table tag, which every write drops.
DECLARED = {"logins": ["kind:login"]}


def snapshot(event: Event) -> dict[str, object]:
    return {"id": event.id, "kind": event.kind, "created": event.created}


def check(events: CachedRepository[Event], Session: sessionmaker[Any], deleted: int) -> None:
    """Every cached entity and query equals a fresh read of the database."""
    cache = events.cache
    with Session() as session:
        rows = {e.id: snapshot(e) for e in session.scalars(select(Event))}
        fresh = {
            name: [snapshot(e) for e in session.scalars(stmt)] for name, stmt in QUERIES.items()
        }
    cached = {pk: cache.get(events.key(pk)) for pk in range(1, ROWS + 1)}
    stale = [pk for pk, value in cached.items() if value is not MISSING and value != rows.get(pk)]
    kept = sum(value is not MISSING for value in cached.values())
    print(f"  entities still cached: {kept} (the 900 rows left), disagreeing: {len(stale)}")
    expect(not stale and kept == ROWS - deleted, "every cached entity is the row as stored")
    for name in QUERIES:
        entry = cache.get(events.query_key(name))
        state = "dropped" if entry is MISSING else "kept"
        print(f"  query {name!r} (tags {DECLARED.get(name, ['table:events'])}): {state}")
        expect(entry is MISSING or entry == fresh[name], f"query {name} agrees")
    expect(cache.get(events.query_key("logins")) is not MISSING, "no login was deleted")
    expect(cache.get(events.query_key("latest")) is MISSING, "the table tag drops it")
    expect(len(events.query("first", QUERIES["first"])) == 20, "reloaded on the next read")


def main() -> None:
    args = parse_args()
    backend = make_backend(args)
    cache = Cache(backend, namespace=f"example-bulk-{uuid.uuid4().hex[:8]}", ttl=300)
    with open_database(args.postgres) as engine:
        Base.metadata.create_all(engine)
        Session = sessionmaker(engine)
        with Session.begin() as session:
            kinds = ["login", "view", "click", "logout"]
            session.add_all(
                # The 100 oldest came from an import; those are the ones to clean up.
                Event(
                    id=i,
                    kind="import" if i <= 100 else kinds[i % 4],
                    created=START + timedelta(hours=i),
                )
                for i in range(1, ROWS + 1)
            )
        events = CachedRepository(
            cache, Event, session_factory=Session, ttl=300,
            row_tags=lambda row: [f"kind:{row['kind']}"],
        )  # fmt: skip
        events.get_many(range(1, ROWS + 1))  # every row cached: one SELECT
        for name, stmt in QUERIES.items():
            events.query(name, stmt, tags=DECLARED.get(name))

        selects = SelectCounter(engine)
        cutoff = START + timedelta(hours=101)  # the 100 oldest events
        deleted = events.delete_where(Event.created < cutoff, chunk=40)
        print(f"Bulk delete on {type(backend).__name__} and {engine.dialect.name}")
        print(f"  deleted {deleted} of {ROWS} rows; SELECTs of the rows to delete: {selects.count}")
        expect(deleted == 100 and selects.count == 3, "100 rows, selected 40 at a time")

        check(events, Session, deleted)
        print("  the cache agrees with the database")
        events.close()
    backend.close()


if __name__ == "__main__":
    main()
