"""What the sync and async repositories share: keys, tags, entities, SQL and commit work.

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

The methods here that take a ``Session`` run SQL on a synchronous session:
:class:`~cachekit.sqlalchemy.CachedRepository` calls them directly,
:class:`~cachekit.sqlalchemy.AsyncCachedRepository` through ``AsyncSession.run_sync``,
so each statement and each commit rule is written once. Cache I/O goes through two
hooks, :meth:`RepositoryBase._drop` and :meth:`RepositoryBase._reload`, which each
repository implements.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Generic, Literal, TypeVar, cast

from sqlalchemy import ColumnElement, CursorResult, Executable, delete
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from cachekit.core.state import CacheCore
from cachekit.exceptions import CacheError, ConfigurationError
from cachekit.sqlalchemy.rows import Pk, Rows, Snapshot
from cachekit.sqlalchemy.tracking import OWN_STATEMENT, Pending, RowTags, WriteTracker

__all__ = ["IN_CHUNK", "PkKeys", "RepositoryBase", "WritePolicy"]

logger = logging.getLogger("cachekit")

M = TypeVar("M")

#: After a commit: invalidate and reload the written rows under a lease, or only invalidate.
WritePolicy = Literal["write-through", "invalidate"]

#: Keys per SELECT when loading misses; well under every driver's bound-parameter limit.
IN_CHUNK = 1000


class PkKeys:
    """The entity view's keys: a :class:`Pk`'s own text (``users:7``, ``users:1:"a:b"``).
    A Pk holds its columns' types, so its text is already one per row."""

    prefix: str

    def key(self, id: Pk) -> str:
        return f"{self.prefix}:{id}"


class RepositoryBase(Generic[M]):
    """The I/O-free half of a repository, and its SQL on a synchronous session.

    Arguments as documented on :class:`~cachekit.sqlalchemy.CachedRepository`.
    """

    _view: PkKeys  # the entity view, made by each repository

    def __init__(
        self,
        core: CacheCore,
        model: type[M],
        *,
        write_policy: WritePolicy,
        prefix: str | None,
        row_tags: RowTags | None,
    ) -> None:
        if write_policy not in ("write-through", "invalidate"):
            raise ConfigurationError(
                f"write_policy must be 'write-through' or 'invalidate', got {write_policy!r}"
            )
        self.model = model
        self.write_policy = write_policy
        self._rows: Rows[M] = Rows(model)
        self.prefix = prefix or self._rows.table_name
        self.table_tag = f"table:{self._rows.table_name}"
        self.any_tag = f"{self.prefix}:*"
        self._stores_objects = core.capabilities.stores_objects
        self._tracker = WriteTracker(
            self._rows, committed=self._committed, settled=self._settled, row_tags=row_tags
        )

    # -- keys and tags ----------------------------------------------------------------------

    def key(self, pk: Any) -> str:
        """The logical key of an entity (``"users:7"``), usable with ``cache.get()``."""
        return self._view.key(self._rows.pk(pk))

    def pk_tag(self, pk: Any) -> str:
        """The tag on the entity and on every cached query that returned the row."""
        return self._row_tag(self._rows.pk(pk))

    def query_key(self, name: str) -> str:
        """The logical key of a named query: JSON key text never starts with ``query``."""
        return f"{self.prefix}:query:{name}"

    def _row_tag(self, pk: Pk) -> str:
        return f"{self.prefix}:{pk}"

    def _entity_tags(self, pk: Pk, snapshot: Snapshot | None) -> list[str]:
        # Absent rows (cached None) carry the tags too: an insert must drop them.
        return [self._row_tag(pk), self.any_tag]

    def _query_tags(self, tags: Iterable[str] | None) -> Callable[[list[Snapshot]], list[str]]:
        """The tags of a query's entry, from the snapshots it returned."""
        declared = [self.table_tag] if tags is None else list(tags)

        def of(snapshots: list[Snapshot]) -> list[str]:
            rows = [self._row_tag(self._rows.pk_of(snapshot)) for snapshot in snapshots]
            return [*rows, self.any_tag, *declared]

        return of

    def _invalidation_tags(self, pks: Iterable[Pk], tags: Iterable[str]) -> list[str]:
        """What invalidating rows drops by tag: their row tags, and ``tags``."""
        return [*(self._row_tag(pk) for pk in pks), *tags]

    # -- entities -------------------------------------------------------------------------

    def _entity(self, snapshot: Snapshot, session: Session | None) -> M:
        if self._stores_objects:  # the snapshot is the cached object itself
            snapshot = self._rows.unshared(snapshot)
        if session is None:
            return self._rows.instance(snapshot)
        return self._rows.attach(snapshot, session)

    def _in_order(self, wanted: dict[Pk, Any], found: dict[Pk, M]) -> dict[Any, M]:
        """``{pk as asked: entity}`` for the keys found, in the order asked."""
        return {wanted[key]: found[key] for key in wanted if key in found}

    def _own(self, session: Session | None, wanted: Iterable[Pk]) -> set[Pk]:
        """The keys among ``wanted`` that ``session`` wrote in its open transaction."""
        if session is None or not self._tracker.written(session):
            return set()
        return {key for key in wanted if self._tracker.written(session, key)}

    def _entities(self, cached: dict[Pk, Snapshot | None], session: Session | None) -> dict[Pk, M]:
        return {key: self._entity(value, session) for key, value in cached.items() if value}

    # -- SQL on a synchronous session -----------------------------------------------------------

    def _select_own(self, session: Session, pks: set[Pk]) -> dict[Pk, M]:
        """The session's own instances of rows it wrote, read through it."""
        found = session.execute(self._rows.select_entities(pks)).scalars()
        mapper = self._rows.mapper
        return {self._rows.pk(mapper.primary_key_from_instance(obj)): obj for obj in found}

    def _select_snapshots(self, session: Session, pks: list[Pk]) -> dict[Pk, Snapshot]:
        """The loader's work: snapshots of these rows, one SELECT per :data:`IN_CHUNK`."""
        found = {}
        for start in range(0, len(pks), IN_CHUNK):
            chunk = self._rows.select_snapshots(pks[start : start + IN_CHUNK])
            for row in session.execute(chunk):
                snapshot = dict(row._mapping)
                found[self._rows.pk_of(snapshot)] = snapshot
        return found

    def _query_snapshots(self, session: Session, stmt: Executable) -> list[Snapshot]:
        entities = session.execute(stmt).scalars().all()
        for obj in entities:
            if not isinstance(obj, self.model):
                raise TypeError(
                    f"query must select {self.model.__name__} entities, got {type(obj).__name__}"
                )
        return [self._rows.snapshot(obj) for obj in entities]

    def _record_update(self, session: Session, entity: M) -> None:
        if sa_inspect(entity).has_identity:
            self._tracker.record(session, self._tracker.changed_row(entity))

    def _record_written(self, session: Session, pks: Iterable[Any] | None) -> None:
        if pks is None:
            self._tracker.record(session, Pending(everything=True))
        else:
            self._tracker.record(session, Pending(changed={self._rows.pk(pk) for pk in pks}))

    def _remove(self, session: Session, key: Pk) -> bool:
        """Delete one row through the ORM (so cascades run); whether it existed."""
        obj = session.get(self.model, tuple(key))
        if obj is None:
            return False
        session.delete(obj)
        self._tracker.record(session, Pending(deleted={key}))
        return True

    def _chunk(self, chunk: int) -> int:
        if chunk < 1:
            raise ConfigurationError(f"chunk must be a positive number of rows, got {chunk!r}")
        return chunk

    def _delete_chunks(self, session: Session, condition: ColumnElement[bool], chunk: int) -> int:
        """``delete_where``'s work: per chunk, select the keys, invalidate them, delete."""
        deleted = 0
        while True:
            pks, tags = self._matching(session, condition, chunk)
            if not pks:
                return deleted
            self._drop(pks, [self.table_tag, *tags])
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

    # -- after the commit -------------------------------------------------------------------

    def _committed(self, pending: Pending) -> None:
        """After the commit: invalidate what the transaction wrote (may raise)."""
        tags = set(pending.tags)
        if pending.changed or pending.deleted:
            tags.add(self.table_tag)
        if pending.everything:
            tags.add(self.any_tag)
        self._drop(pending.changed | pending.deleted, tags)

    def _settled(self, pending: Pending) -> None:
        """Write-through: reload the rows written, under leases (one SELECT). Never
        raises: the commit and the invalidation are done; a refill only saves misses."""
        pks = pending.changed - pending.deleted
        if self.write_policy != "write-through" or not pks:
            return
        try:
            self._reload(pks)
        except (SQLAlchemyError, CacheError) as exc:
            logger.warning(
                "refill of %d %s rows after commit failed: %r", len(pks), self.prefix, exc
            )

    def _drop(self, pks: Iterable[Pk], tags: Iterable[str]) -> None:
        """Invalidate, now, the entities of ``pks`` and every entry tagged with their
        row tags or ``tags`` (raises if that cannot even be journaled)."""
        raise NotImplementedError

    def _reload(self, pks: set[Pk]) -> None:
        """Load these rows into the cache under leases."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop listening to sessions (the cache and its entries are left as they are)."""
        self._tracker.close()
