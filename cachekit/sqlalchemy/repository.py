"""CachedRepository: one mapped class behind a cache that changes only after commits.

Keys and tags, for a repository with prefix ``users`` (the table name by default):

- ``users:7`` (``users:1:"a"`` for a composite key): an entity's column snapshot,
  tagged ``users:7`` (its *row tag*) and ``users:*`` (every entry of the repository);
- ``users:query:<name>``: a cached query, tagged with the row tag of each row it
  returned, ``users:*``, and either ``table:users`` or the finer tags it declared.

After a commit, each row written (inserted, updated or deleted) invalidates its row
tag (its entity and every query that returned it), ``table:users`` and its
``row_tags``: a write can change the result of a query that did not return the row
(the row now matches; an OFFSET page shifts; an aggregate moves). A query that
declares ``tags=`` instead of ``table:users`` is spared by writes of rows whose
``row_tags`` do not include them. A bulk statement whose rows are unknown invalidates
``users:*``: every entity and query.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any, Generic, Literal, TypeVar, cast

from sqlalchemy import ColumnElement, CursorResult, Executable, delete
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cachekit.cache import Cache
from cachekit.exceptions import CacheError, ConfigurationError
from cachekit.sqlalchemy.rows import Pk, Rows, Snapshot
from cachekit.sqlalchemy.tracking import OWN_STATEMENT, Pending, RowTags, WriteTracker
from cachekit.ttl import TTL, USE_DEFAULT, UseDefault
from cachekit.views import ReadThroughView

__all__ = ["CachedRepository", "WritePolicy"]

logger = logging.getLogger("cachekit")

M = TypeVar("M")
T = TypeVar("T")

#: After a commit: invalidate and reload the written rows under a lease, or only invalidate.
WritePolicy = Literal["write-through", "invalidate"]

# Keys per SELECT when loading misses; well under every driver's bound-parameter limit.
_IN_CHUNK = 1000


class _RowView(ReadThroughView[Pk, Snapshot | None]):
    """The entity view, keyed by a :class:`Pk`'s own text (``users:7``, ``users:1:"a:b"``):
    a Pk holds its columns' types, so its text is already one per row."""

    def key(self, id: Pk) -> str:
        return f"{self.prefix}:{id}"


class CachedRepository(Generic[M]):
    """Rows of ``model`` by primary key, and named queries over it, through ``cache``.

    Args:
        cache: where snapshots live.
        model: a mapped class (single table); composite primary keys work, as tuples.
        session_factory: makes the sessions that load misses, and the transaction of
            ``delete_where`` without ``session=``. A ``sessionmaker`` is also
            *tracked*: every session it makes reports its commits (see :meth:`track`).
        ttl: time to live of entity entries; the cache's default if left out.
        write_policy: ``"write-through"`` reloads written rows after the commit (one
            SELECT per commit, and readers find them cached); ``"invalidate"`` only drops
            them.
        prefix: the first part of every key and tag; the table name by default.
        row_tags: the tags a written row invalidates besides its own, from its column
            values (as flushed, or as deleted); a query declaring some of them
            (``tags=`` of :meth:`query`) is dropped by writes of those rows only.
        track: listen to ``session_factory`` if it is a ``sessionmaker``.
    """

    def __init__(
        self,
        cache: Cache,
        model: type[M],
        *,
        session_factory: Callable[[], Session],
        ttl: TTL | UseDefault = USE_DEFAULT,
        write_policy: WritePolicy = "write-through",
        prefix: str | None = None,
        row_tags: RowTags | None = None,
        track: bool = True,
    ) -> None:
        if write_policy not in ("write-through", "invalidate"):
            raise ConfigurationError(
                f"write_policy must be 'write-through' or 'invalidate', got {write_policy!r}"
            )
        self.cache = cache
        self.model = model
        self.write_policy = write_policy
        self._rows: Rows[M] = Rows(model)
        self.prefix = prefix or self._rows.table_name
        self.table_tag = f"table:{self._rows.table_name}"
        self.any_tag = f"{self.prefix}:*"
        self._factory = session_factory
        self._view = _RowView(
            cache, self.prefix, load=self._load_one, load_many=self._load_many,
            policy=cache.policy(ttl), tags=self._entity_tags,
        )  # fmt: skip
        self._tracker = WriteTracker(
            self._rows, committed=self._apply, settled=self._refill, row_tags=row_tags
        )
        if track and isinstance(session_factory, sessionmaker):
            self._tracker.track(session_factory)

    def __repr__(self) -> str:
        return f"CachedRepository({self.cache!r}, {self.model.__name__}, prefix={self.prefix!r})"

    # -- keys and tags ----------------------------------------------------------------------

    def key(self, pk: Any) -> str:
        """The logical key of an entity (``"users:7"``), usable with ``cache.get()``."""
        return self._view.key(self._rows.pk(pk))

    def pk_tag(self, pk: Any) -> str:
        """The tag on the entity and on every cached query that returned the row."""
        return f"{self.prefix}:{self._rows.pk(pk)}"

    def query_key(self, name: str) -> str:
        """The logical key of a named query: JSON key text never starts with ``query``."""
        return f"{self.prefix}:query:{name}"

    def _entity_tags(self, pk: Pk, snapshot: Snapshot | None) -> list[str]:
        # Absent rows (cached None) carry the tags too: an insert must drop them.
        return [f"{self.prefix}:{pk}", self.any_tag]

    # -- reads ----------------------------------------------------------------------------

    def get(self, pk: Any, *, session: Session | None = None) -> M | None:
        """The row with this primary key, or ``None``; detached, or in ``session``.

        A session that wrote the row in its open transaction reads it from the
        database instead: the cache holds only committed rows.
        """
        key = self._rows.pk(pk)
        if session is not None and self._tracker.written(session, key):
            return session.get(self.model, tuple(key))
        snapshot = self._view.get(key)
        return None if snapshot is None else self._entity(snapshot, session)

    def get_many(self, pks: Iterable[Any], *, session: Session | None = None) -> dict[Any, M]:
        """``{pk: entity}`` for the keys that exist, in the order asked.

        One cache read for all of them; the misses are loaded with one
        ``SELECT ... WHERE pk IN (...)`` (per 1,000) and stored with one batch fill.
        """
        wanted = {self._rows.pk(pk): pk for pk in pks}
        own: set[Pk] = set()
        if session is not None and self._tracker.written(session):
            own = {key for key in wanted if self._tracker.written(session, key)}
        cached = self._view.get_many([key for key in wanted if key not in own])
        found = {
            key: self._entity(snapshot, session) for key, snapshot in cached.items() if snapshot
        }
        if own and session is not None:
            select_own = self._rows.select_entities(own)
            for obj in session.execute(select_own).scalars():
                found[self._rows.pk(self._rows.mapper.primary_key_from_instance(obj))] = obj
        return {wanted[key]: found[key] for key in wanted if key in found}

    def query(
        self,
        name: str,
        stmt: Executable,
        *,
        ttl: TTL | UseDefault = 60,
        tags: Iterable[str] | None = None,
        session: Session | None = None,
    ) -> list[M]:
        """The entities ``stmt`` (a ``select(Model)...``) returns, cached under ``name``.

        ``name`` is the whole key: put the statement's parameters in it
        (``f"org:{org_id}"``). The entry is dropped when a row it returned changes, and
        on any other write to the table; with ``tags``, only on writes of rows whose
        ``row_tags`` include one of them.
        """
        if session is not None and self._tracker.written(session):
            return list(session.execute(stmt).scalars().all())
        declared = None if tags is None else list(tags)
        snapshots: list[Snapshot] = self.cache.get_or_load(
            self.query_key(name),
            functools.partial(self._run_query, stmt),
            ttl,
            tags=functools.partial(self._query_tags, declared),
        )
        return [self._entity(snapshot, session) for snapshot in snapshots]

    def _query_tags(self, declared: list[str] | None, snapshots: list[Snapshot]) -> list[str]:
        rows = [f"{self.prefix}:{self._rows.pk_of(snapshot)}" for snapshot in snapshots]
        return [*rows, self.any_tag, *([self.table_tag] if declared is None else declared)]

    def _entity(self, snapshot: Snapshot, session: Session | None) -> M:
        if self.cache.store.capabilities.stores_objects:  # the snapshot is the cached object itself
            snapshot = self._rows.unshared(snapshot)
        if session is None:
            return self._rows.instance(snapshot)
        return self._rows.attach(snapshot, session)

    # -- loaders: always a fresh session, so only committed rows are ever cached --------------

    def _load_one(self, pk: Pk) -> Snapshot | None:
        return self._load_many([pk]).get(pk)

    def _load_many(self, pks: list[Pk]) -> dict[Pk, Snapshot]:
        found = {}
        with self._factory() as session:
            for start in range(0, len(pks), _IN_CHUNK):
                chunk = self._rows.select_snapshots(pks[start : start + _IN_CHUNK])
                for row in session.execute(chunk):
                    snapshot = dict(row._mapping)
                    found[self._rows.pk_of(snapshot)] = snapshot
        return found

    def _run_query(self, stmt: Executable) -> list[Snapshot]:
        with self._factory() as session:
            entities = session.execute(stmt).scalars().all()
            for obj in entities:
                if not isinstance(obj, self.model):
                    raise TypeError(
                        f"query must select {self.model.__name__} entities, "
                        f"got {type(obj).__name__}"
                    )
            return [self._rows.snapshot(obj) for obj in entities]

    # -- writes ---------------------------------------------------------------------------

    def add(self, entity: M, *, session: Session) -> None:
        """Add a new entity; the cache learns of it when ``session`` commits."""
        self.track(session)
        session.add(entity)

    def update(self, entity: M, *, session: Session) -> None:
        """Save changes to an entity (loaded in ``session``, or detached from this
        repository); its entry is invalidated, and with write-through reloaded, after
        the commit, even if the flush found nothing to write."""
        self.track(session)
        session.add(entity)
        if sa_inspect(entity).has_identity:
            self._tracker.record(session, self._tracker.changed_row(entity))

    def delete(self, pk: Any, *, session: Session | None = None) -> bool:
        """Delete the row (one SELECT unless ``session`` holds it, so ORM cascades run);
        return whether it existed. In a transaction of its own without ``session``."""
        key = self._rows.pk(pk)

        def remove(active: Session) -> bool:
            obj = active.get(self.model, tuple(key))
            if obj is None:
                return False
            active.delete(obj)
            self._tracker.record(active, Pending(deleted={key}))
            return True

        return self._in_transaction(session, remove)

    def delete_where(
        self, condition: ColumnElement[bool], *, session: Session | None = None, chunk: int = 1000
    ) -> int:
        """Delete every row matching ``condition``; return how many were deleted.

        In chunks of ``chunk`` rows: select their primary keys, invalidate every entry
        that depends on them, delete them by primary key. After the commit (its own
        transaction unless ``session`` is given) they are invalidated again, since a
        reader may have cached a row between the first invalidation and the commit.

        Raises:
            BackendError: the cache could not be invalidated; the transaction is rolled
                back when it is this method's own, and should be by the caller otherwise.
        """
        if chunk < 1:
            raise ConfigurationError(f"chunk must be a positive number of rows, got {chunk!r}")
        return self._in_transaction(
            session, functools.partial(self._delete_chunks, condition, chunk)
        )

    def _delete_chunks(self, condition: ColumnElement[bool], chunk: int, session: Session) -> int:
        deleted = 0
        while True:
            pks, tags = self._matching(session, condition, chunk)
            if not pks:
                return deleted
            self._invalidate(pks, {self.table_tag, *tags})
            self._tracker.record(session, Pending(deleted=set(pks), tags=tags))
            stmt = delete(self.model).where(self._rows.where_pks(pks))
            options = {"synchronize_session": "evaluate", OWN_STATEMENT: True}
            result = session.execute(stmt, execution_options=options)
            deleted += cast(CursorResult[Any], result).rowcount
            if len(pks) < chunk:
                return deleted

    def _matching(
        self, session: Session, condition: ColumnElement[bool], chunk: int
    ) -> tuple[list[Pk], set[str]]:
        """The keys of up to ``chunk`` matching rows, and their ``row_tags`` (for which
        whole rows are read; without ``row_tags``, only the keys)."""
        if not self._tracker.wants_rows:
            found = session.execute(self._rows.select_pks(condition).limit(chunk)).all()
            return [self._rows.pk(tuple(row)) for row in found], set()
        matching = session.execute(self._rows.select_rows(condition).limit(chunk))
        rows = [dict(row._mapping) for row in matching]
        tags = {tag for row in rows for tag in self._tracker.row_tags(row)}
        return [self._rows.pk_of(row) for row in rows], tags

    def _in_transaction(self, session: Session | None, action: Callable[[Session], T]) -> T:
        """Run ``action`` in ``session``, or in a tracked transaction of its own."""
        if session is not None:
            self.track(session)
            return action(session)
        with self._factory() as own:
            self.track(own)
            with own.begin():
                return action(own)

    # -- tracking and manual invalidation -------------------------------------------------

    def track(self, target: Session | sessionmaker[Any]) -> None:
        """Apply the writes of a session, or of every session a sessionmaker makes, to
        the cache after each commit: flushes of added, changed and deleted entities,
        and ORM bulk ``insert()``/``update()``/``delete()`` statements on the table.
        Repository methods track the sessions they are given on their own."""
        self._tracker.track(target)

    def mark_written(self, session: Session, pks: Iterable[Any] | None = None) -> None:
        """Record writes the session events cannot see (``session.connection()``,
        ``text()``): these rows, or with ``None`` every row, change after the commit."""
        self.track(session)
        if pks is None:
            self._tracker.record(session, Pending(everything=True))
        else:
            self._tracker.record(session, Pending(changed={self._rows.pk(pk) for pk in pks}))

    def invalidate(self, pks: Iterable[Any]) -> None:
        """Drop, now, the entities and cached queries that depend on these rows."""
        self._invalidate([self._rows.pk(pk) for pk in pks])

    def invalidate_all(self) -> None:
        """Drop, now, every entity and query of this repository (two round trips)."""
        self.cache.invalidate_tags([self.any_tag])

    def close(self) -> None:
        """Stop listening to sessions (the cache and its entries are left as they are)."""
        self._tracker.close()

    def _invalidate(self, pks: Iterable[Pk], tags: Iterable[str] = ()) -> None:
        keys = set(pks)
        self.cache.invalidate_tags([*(f"{self.prefix}:{pk}" for pk in keys), *tags])
        self._view.invalidate_many(keys)

    def _apply(self, pending: Pending) -> None:
        """After the commit: invalidate what the transaction wrote (may raise)."""
        tags = set(pending.tags)
        if pending.changed or pending.deleted:
            tags.add(self.table_tag)
        if pending.everything:
            tags.add(self.any_tag)
        self._invalidate(pending.changed | pending.deleted, tags)

    def _refill(self, pending: Pending) -> None:
        """Write-through: reload the rows written, under leases (one SELECT). Never
        raises: the commit and the invalidation are done; a refill only saves misses."""
        pks = pending.changed - pending.deleted
        if self.write_policy != "write-through" or not pks:
            return
        try:
            self._view.get_many(pks)
        except (SQLAlchemyError, CacheError) as exc:
            logger.warning(
                "refill of %d %s rows after commit failed: %r", len(pks), self.prefix, exc
            )
