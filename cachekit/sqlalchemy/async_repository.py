"""AsyncCachedRepository: CachedRepository for ``AsyncSession`` and ``AsyncCache``.

Reads are native coroutines: the cache through ``await``, misses loaded in sessions
of their own. Writes run the sync repository's code (:mod:`cachekit.sqlalchemy.base`)
on ``AsyncSession.run_sync``, and every session event runs where SQLAlchemy runs it:
synchronously, inside the greenlet that ``AsyncSession`` drives its sync session in.

How the invalidation after a commit runs. The ``after_commit`` handler, which fires
once the database has committed, starts the invalidation as a task on the running
loop and waits for it with SQLAlchemy's ``await_`` (``await_only`` before 2.1): the
greenlet is suspended, the loop runs other tasks meanwhile, and ``await
session.commit()`` returns only once the cache server has dropped the entries, as
``Session.commit()`` does for the sync repository. The alternative, recording the keys
in the event and invalidating them after ``await session.commit()`` returns, works
only for commits the repository makes itself; a session of the tracked
``async_sessionmaker`` committed by the application would return with its old rows
still served by other processes until some later call. Here:

- after, never before: the task is created in ``after_commit``, which SQLAlchemy
  calls only after COMMIT succeeded (a rollback, or a rolled-back SAVEPOINT, drops
  the work, see :mod:`cachekit.sqlalchemy.tracking`);
- the loop is never blocked: the greenlet waits by yielding to the loop, as the
  driver's own I/O does;
- nothing is lost: the task exists from the moment the event fires and is shielded,
  so it finishes even if the committing task is cancelled while it waits; a cache
  server that is down makes ``AsyncCache`` journal the invalidation (honoured at once
  in this process, replayed by its background task); only a full journal raises,
  through ``await session.commit()``, after the database committed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Executable
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from cachekit.async_cache import AsyncCache
from cachekit.async_views import AsyncReadThroughView
from cachekit.sqlalchemy.base import PkKeys, RepositoryBase, WritePolicy
from cachekit.sqlalchemy.rows import Pk, Snapshot
from cachekit.sqlalchemy.tracking import RowTags
from cachekit.ttl import TTL, USE_DEFAULT, UseDefault

try:
    from sqlalchemy.util import await_
except ImportError:  # pragma: no cover - SQLAlchemy 2.0 spells it await_only
    from sqlalchemy.util import await_only as await_

__all__ = ["AsyncCachedRepository"]

logger = logging.getLogger("cachekit")

M = TypeVar("M")
T = TypeVar("T")

# Each tracked async_sessionmaker's own sync Session subclass (see _sync_class).
_SYNC_CLASSES: weakref.WeakKeyDictionary[async_sessionmaker[Any], type[Session]] = (
    weakref.WeakKeyDictionary()
)


class _AsyncRowView(PkKeys, AsyncReadThroughView[Pk, Snapshot | None]):
    """The entity view, keyed by each :class:`Pk`'s own text."""


class AsyncCachedRepository(RepositoryBase[M]):
    """:class:`~cachekit.sqlalchemy.CachedRepository` over an ``AsyncCache`` and
    ``AsyncSession``: the same keys, tags and commit semantics, with coroutines for
    every method that may wait on the cache or the database.

    Args:
        cache: an :class:`~cachekit.AsyncCache`.
        session_factory: makes the ``AsyncSession`` that load misses and run
            ``delete`` and ``delete_where`` without ``session=``. An
            ``async_sessionmaker`` is also tracked (see :meth:`track`).

    The other arguments are :class:`~cachekit.sqlalchemy.CachedRepository`'s. The
    invalidation after a commit runs before ``await session.commit()`` returns; see
    the module docstring for how, and why there.
    """

    _view: _AsyncRowView

    def __init__(
        self,
        cache: AsyncCache,
        model: type[M],
        *,
        session_factory: Callable[[], AsyncSession],
        ttl: TTL | UseDefault = USE_DEFAULT,
        write_policy: WritePolicy = "write-through",
        prefix: str | None = None,
        row_tags: RowTags | None = None,
        track: bool = True,
    ) -> None:
        super().__init__(cache, model, write_policy=write_policy, prefix=prefix, row_tags=row_tags)
        self.cache = cache
        self._factory = session_factory
        self._view = _AsyncRowView(
            cache, self.prefix, load=self._load_one, load_many=self._load_many,
            policy=cache.policy(ttl), tags=self._entity_tags,
        )  # fmt: skip
        # Invalidations started by session events: held until done (see _wait).
        self._tasks: set[asyncio.Task[Any]] = set()
        if track and isinstance(session_factory, async_sessionmaker):
            self.track(session_factory)

    def __repr__(self) -> str:
        name = self.model.__name__
        return f"AsyncCachedRepository({self.cache!r}, {name}, prefix={self.prefix!r})"

    # -- reads ----------------------------------------------------------------------------

    async def get(self, pk: Any, *, session: AsyncSession | None = None) -> M | None:
        """The row with this primary key, or ``None``; detached, or in ``session``
        (read from the database if ``session`` wrote it in its open transaction)."""
        key = self._rows.pk(pk)
        sync = _sync(session)
        if session is not None and self._tracker.written(session.sync_session, key):
            return await session.get(self.model, tuple(key))
        snapshot = await self._view.get(key)
        return None if snapshot is None else self._entity(snapshot, sync)

    async def get_many(
        self, pks: Iterable[Any], *, session: AsyncSession | None = None
    ) -> dict[Any, M]:
        """``{pk: entity}`` for the keys that exist, in the order asked: one cache read,
        one SELECT and one batch fill for the misses (see ``CachedRepository.get_many``)."""
        wanted = {self._rows.pk(pk): pk for pk in pks}
        sync = _sync(session)
        own = self._own(sync, wanted)
        cached = await self._view.get_many([key for key in wanted if key not in own])
        found = self._entities(cached, sync)
        if own and session is not None:
            found.update(await session.run_sync(self._select_own, own))
        return self._in_order(wanted, found)

    async def query(
        self,
        name: str,
        stmt: Executable,
        *,
        ttl: TTL | UseDefault = 60,
        tags: Iterable[str] | None = None,
        session: AsyncSession | None = None,
    ) -> list[M]:
        """The entities ``stmt`` returns, cached under ``name`` (see
        ``CachedRepository.query``)."""
        sync = _sync(session)
        if session is not None and self._tracker.written(session.sync_session):
            return list((await session.execute(stmt)).scalars().all())
        snapshots: list[Snapshot] = await self.cache.get_or_load(
            self.query_key(name),
            functools.partial(self._run_query, stmt),
            ttl,
            tags=self._query_tags(tags),
        )
        return [self._entity(snapshot, sync) for snapshot in snapshots]

    # -- loaders: always a fresh session, so only committed rows are ever cached --------------

    async def _load_one(self, pk: Pk) -> Snapshot | None:
        return (await self._load_many([pk])).get(pk)

    async def _load_many(self, pks: list[Pk]) -> dict[Pk, Snapshot]:
        async with self._factory() as session:
            return await session.run_sync(self._select_snapshots, pks)

    async def _run_query(self, stmt: Executable) -> list[Snapshot]:
        async with self._factory() as session:
            return await session.run_sync(self._query_snapshots, stmt)

    # -- writes ---------------------------------------------------------------------------

    def add(self, entity: M, *, session: AsyncSession) -> None:
        """Add a new entity; the cache learns of it when ``session`` commits."""
        self.track(session)
        session.add(entity)

    async def update(self, entity: M, *, session: AsyncSession) -> None:
        """Save changes to an entity; it is invalidated (and with write-through
        reloaded) after the commit, even if the flush found nothing to write."""
        self.track(session)
        session.add(entity)
        await session.run_sync(self._record_update, entity)

    async def delete(self, pk: Any, *, session: AsyncSession | None = None) -> bool:
        """Delete the row through the ORM; return whether it existed. In a transaction
        of its own without ``session``."""
        key = self._rows.pk(pk)
        return await self._in_transaction(session, lambda active: self._remove(active, key))

    async def delete_where(
        self,
        condition: ColumnElement[bool],
        *,
        session: AsyncSession | None = None,
        chunk: int = 1000,
    ) -> int:
        """Delete every row matching ``condition``, in chunks; return how many. Each
        chunk is invalidated before its DELETE, and again after the commit (see
        ``CachedRepository.delete_where``).

        Raises:
            BackendError: the cache could not be invalidated; the transaction is rolled
                back when it is this method's own, and should be by the caller otherwise.
        """
        chunk = self._chunk(chunk)
        return await self._in_transaction(
            session, lambda active: self._delete_chunks(active, condition, chunk)
        )

    async def _in_transaction(
        self, session: AsyncSession | None, action: Callable[[Session], T]
    ) -> T:
        """Run ``action`` on the sync session of ``session``, or of a tracked
        transaction of its own, inside SQLAlchemy's greenlet (``run_sync``)."""
        if session is not None:
            self.track(session)
            return await session.run_sync(action)
        async with self._factory() as own:
            self.track(own)
            async with own.begin():
                return await own.run_sync(action)

    # -- tracking and manual invalidation -------------------------------------------------

    def track(self, target: AsyncSession | async_sessionmaker[Any]) -> None:
        """Apply the writes of an ``AsyncSession``, or of every session an
        ``async_sessionmaker`` makes from now on, to the cache after each commit.

        An ``async_sessionmaker`` is given a ``sync_session_class`` of its own (a
        subclass of its current one, through ``configure()``), as ``sessionmaker``
        makes for its sessions, so that listening hears its sessions only.

        Raises:
            TypeError: ``target`` is not async; a sync ``Session`` commits outside the
                greenlet the invalidation must wait in: use ``CachedRepository``.
        """
        if isinstance(target, async_sessionmaker):
            self._tracker.track(_sync_class(target))
        elif isinstance(target, AsyncSession):
            self._tracker.track(target.sync_session)
        else:
            raise TypeError(
                f"AsyncCachedRepository tracks AsyncSession and async_sessionmaker, not "
                f"{type(target).__name__}: use CachedRepository for sync sessions"
            )

    async def mark_written(self, session: AsyncSession, pks: Iterable[Any] | None = None) -> None:
        """Record writes the session events cannot see (``text()``, the session's
        connection): these rows, or with ``None`` every row, change after the commit."""
        self.track(session)
        await session.run_sync(self._record_written, None if pks is None else list(pks))

    async def invalidate(self, pks: Iterable[Any]) -> None:
        """Drop, now, the entities and cached queries that depend on these rows."""
        await self._adrop([self._rows.pk(pk) for pk in pks], ())

    async def invalidate_all(self) -> None:
        """Drop, now, every entity and query of this repository (two round trips)."""
        await self.cache.invalidate_tags([self.any_tag])

    async def aclose(self) -> None:
        """Stop listening to sessions, then wait for the invalidations still running
        (those of commits whose task was cancelled while waiting for them)."""
        self.close()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _adrop(self, pks: Iterable[Pk], tags: Iterable[str]) -> None:
        keys = set(pks)
        await self.cache.invalidate_tags(self._invalidation_tags(keys, tags))
        await self._view.invalidate_many(keys)

    # -- the base's hooks: called in SQLAlchemy's greenlet ---------------------------------

    def _drop(self, pks: Iterable[Pk], tags: Iterable[str]) -> None:
        self._wait(self._adrop(list(pks), list(tags)))

    def _reload(self, pks: set[Pk]) -> None:
        self._wait(self._view.get_many(pks))

    def _wait(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` as a task on the loop and wait for it from a sync call made in
        SQLAlchemy's greenlet (an event handler, or code under ``run_sync``).

        The task starts now, whatever happens to the caller: shielded, it finishes
        even if the waiting task is cancelled, and it is held until it is done.
        """
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            return await_(_shielded(task))
        except asyncio.CancelledError:
            task.add_done_callback(_report_unawaited)
            raise


def _sync(session: AsyncSession | None) -> Session | None:
    return None if session is None else session.sync_session


async def _shielded(task: Awaitable[T]) -> T:
    # A coroutine, not the shield itself: if await_ refuses it (no greenlet), it is
    # closed unstarted and no shield is left with an exception nobody retrieves.
    return await asyncio.shield(task)


def _report_unawaited(task: asyncio.Task[Any]) -> None:
    """A task whose waiter was cancelled: its failure would go unheard."""
    if not task.cancelled() and task.exception() is not None:
        logger.warning(
            "cachekit: invalidation after a cancelled commit failed: %r", task.exception()
        )


def _sync_class(factory: async_sessionmaker[Any]) -> type[Session]:
    """The factory's own sync Session subclass, made and configured on first use."""
    current = factory.kw.get("sync_session_class") or factory.class_.sync_session_class
    own = _SYNC_CLASSES.get(factory)
    if own is None or current is not own:
        own = type(current.__name__, (current,), {})
        factory.configure(sync_session_class=own)
        _SYNC_CLASSES[factory] = own
    return own
