"""CachedRepository: one mapped class behind a cache that changes only after commits.

Keys, tags and what a commit invalidates are described in :mod:`cachekit.sqlalchemy.base`,
which holds everything this repository shares with its async twin.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Executable
from sqlalchemy.orm import Session, sessionmaker

from cachekit.cache import Cache
from cachekit.sqlalchemy.base import PkKeys, RepositoryBase, WritePolicy
from cachekit.sqlalchemy.rows import Pk, Snapshot
from cachekit.sqlalchemy.tracking import RowTags
from cachekit.ttl import TTL, USE_DEFAULT, UseDefault
from cachekit.views import ReadThroughView

__all__ = ["CachedRepository", "WritePolicy"]

M = TypeVar("M")
T = TypeVar("T")


class _RowView(PkKeys, ReadThroughView[Pk, Snapshot | None]):
    """The entity view, keyed by each :class:`Pk`'s own text."""


class CachedRepository(RepositoryBase[M]):
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

    _view: _RowView

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
        super().__init__(cache, model, write_policy=write_policy, prefix=prefix, row_tags=row_tags)
        self.cache = cache
        self._factory = session_factory
        self._view = _RowView(
            cache, self.prefix, load=self._load_one, load_many=self._load_many,
            policy=cache.policy(ttl), tags=self._entity_tags,
        )  # fmt: skip
        if track and isinstance(session_factory, sessionmaker):
            self._tracker.track(session_factory)

    def __repr__(self) -> str:
        return f"CachedRepository({self.cache!r}, {self.model.__name__}, prefix={self.prefix!r})"

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
        own = self._own(session, wanted)
        found = self._entities(self._view.get_many([k for k in wanted if k not in own]), session)
        if own and session is not None:
            found.update(self._select_own(session, own))
        return self._in_order(wanted, found)

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
        snapshots: list[Snapshot] = self.cache.get_or_load(
            self.query_key(name),
            functools.partial(self._run_query, stmt),
            ttl,
            tags=self._query_tags(tags),
        )
        return [self._entity(snapshot, session) for snapshot in snapshots]

    # -- loaders: always a fresh session, so only committed rows are ever cached --------------

    def _load_one(self, pk: Pk) -> Snapshot | None:
        return self._load_many([pk]).get(pk)

    def _load_many(self, pks: list[Pk]) -> dict[Pk, Snapshot]:
        with self._factory() as session:
            return self._select_snapshots(session, pks)

    def _run_query(self, stmt: Executable) -> list[Snapshot]:
        with self._factory() as session:
            return self._query_snapshots(session, stmt)

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
        self._record_update(session, entity)

    def delete(self, pk: Any, *, session: Session | None = None) -> bool:
        """Delete the row (one SELECT unless ``session`` holds it, so ORM cascades run);
        return whether it existed. In a transaction of its own without ``session``."""
        key = self._rows.pk(pk)
        return self._in_transaction(session, lambda active: self._remove(active, key))

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
        chunk = self._chunk(chunk)
        return self._in_transaction(
            session, lambda active: self._delete_chunks(active, condition, chunk)
        )

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
        self._record_written(session, pks)

    def invalidate(self, pks: Iterable[Any]) -> None:
        """Drop, now, the entities and cached queries that depend on these rows."""
        self._drop([self._rows.pk(pk) for pk in pks], ())

    def invalidate_all(self) -> None:
        """Drop, now, every entity and query of this repository (two round trips)."""
        self.cache.invalidate_tags([self.any_tag])

    def _drop(self, pks: Iterable[Pk], tags: Iterable[str]) -> None:
        keys = set(pks)
        self.cache.invalidate_tags(self._invalidation_tags(keys, tags))
        self._view.invalidate_many(keys)

    def _reload(self, pks: set[Pk]) -> None:
        self._view.get_many(pks)
