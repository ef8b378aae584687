"""Session events that collect a transaction's writes and apply them to the cache after commit.

Work is recorded per ``SessionTransaction`` (in ``session.info``), in the innermost one
open when the write happened: a flush (``after_flush``), an ORM bulk statement
(``do_orm_execute``) or a repository call. Only a commit moves it on:

- a released SAVEPOINT (``after_commit`` while a nested transaction is current) merges
  its work into the enclosing transaction;
- the outermost commit hands everything left to ``committed`` (the invalidation) and,
  once the session has given its connections back, to ``settled`` (the write-through
  refill). If ``committed`` raises (or is cancelled), the error reaches
  ``session.commit()`` then, in place of the refill: raised from ``after_commit`` it
  would leave the committed transaction open, holding its connection;
- a transaction that ends any other way (``after_transaction_end``: ROLLBACK, ROLLBACK
  TO SAVEPOINT, ``close()``) was not committed, and its work is dropped with it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, sessionmaker

from cachekit.sqlalchemy.rows import Pk, Rows

__all__ = ["OWN_STATEMENT", "Pending", "WriteTracker"]

#: Execution option marking the repository's own statements, already accounted for.
OWN_STATEMENT = "cachekit_repository"

#: Extra tags a written row invalidates, from its column values (see the repository).
RowTags = Callable[[dict[str, Any]], Iterable[str]]


@dataclass
class Pending:
    """What one transaction changed in one repository's table."""

    changed: set[Pk] = field(default_factory=set)  # inserted or updated
    deleted: set[Pk] = field(default_factory=set)
    tags: set[str] = field(default_factory=set)  # row_tags of the rows written
    everything: bool = False  # a bulk statement touched rows we cannot name

    def merge(self, other: Pending) -> None:
        self.changed |= other.changed
        self.deleted |= other.deleted
        self.tags |= other.tags
        self.everything = self.everything or other.everything

    def touches(self, pk: Pk) -> bool:
        return self.everything or pk in self.changed or pk in self.deleted

    def __bool__(self) -> bool:
        return bool(self.everything or self.changed or self.deleted or self.tags)


@dataclass
class _SessionWork:
    open: dict[SessionTransaction, Pending] = field(default_factory=dict)
    committed: Pending | None = None  # invalidated, waiting for the refill
    failed: BaseException | None = None  # from the invalidation, raised once closed


class WriteTracker:
    """Listens to sessions for writes to one mapped class; see the module docstring."""

    def __init__(
        self,
        rows: Rows[Any],
        *,
        committed: Callable[[Pending], None],
        settled: Callable[[Pending], None],
        row_tags: RowTags | None = None,
    ) -> None:
        self._rows = rows
        self._committed = committed
        self._settled = settled
        self._row_tags = row_tags
        # The same bound-method objects each time, so event.contains/remove find them.
        self._listeners: dict[str, Callable[..., Any]] = {
            "after_flush": self._after_flush,
            "do_orm_execute": self._on_execute,
            "after_commit": self._after_commit,
            "after_transaction_end": self._after_transaction_end,
        }
        self._classes: list[type[Session]] = []
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()

    # -- registration ---------------------------------------------------------------------

    def track(self, target: Session | sessionmaker[Any] | type[Session]) -> None:
        """Listen to one session, or to every session of a class: a sessionmaker's
        own ``class_``, or the ``sync_session_class`` of an ``async_sessionmaker``.

        A session whose class is tracked already is left alone: listening twice
        would apply each commit's work twice.
        """
        if isinstance(target, sessionmaker):
            target = target.class_
        if isinstance(target, type):
            if target not in self._classes:
                self._listen(target)
                self._classes.append(target)
            return
        if not self.tracks(target):
            self._listen(target)
            self._sessions.add(target)

    def tracks(self, session: Session) -> bool:
        return session in self._sessions or isinstance(session, tuple(self._classes))

    def _listen(self, target: Any) -> None:
        for name, listener in self._listeners.items():
            event.listen(target, name, listener)

    def close(self) -> None:
        """Stop listening everywhere; pending work of open transactions is dropped."""
        for target in [*self._classes, *self._sessions]:
            for name, listener in self._listeners.items():
                if event.contains(target, name, listener):
                    event.remove(target, name, listener)
        self._classes.clear()
        self._sessions = weakref.WeakSet()

    # -- recording ------------------------------------------------------------------------

    def record(self, session: Session, pending: Pending) -> None:
        """Add work to the innermost transaction of ``session``.

        A session with no transaction has nothing to roll back: the work is applied
        at once, as if just committed.
        """
        if not pending:
            return
        current = session.get_nested_transaction() or session.get_transaction()
        if current is None:
            self._committed(pending)
            self._settled(pending)
            return
        self._work(session).open.setdefault(current, Pending()).merge(pending)

    def written(self, session: Session, pk: Pk | None = None) -> bool:
        """Whether this session's open transactions wrote ``pk`` (or, without one, any row)."""
        work: _SessionWork | None = session.info.get(self)
        if work is None:
            return False
        return any(p.touches(pk) if pk is not None else bool(p) for p in work.open.values())

    def changed_row(self, obj: Any) -> Pending:
        """The work of one inserted or updated instance, read from memory (no SQL).
        A row whose key is unknown cannot be named: it counts as a change to every row."""
        pk = self._rows.pk_of_instance(obj)
        if pk is None:
            return Pending(everything=True, tags=self.row_tags(obj))
        return Pending(changed={pk}, tags=self.row_tags(obj))

    def row_tags(self, row: Any) -> set[str]:
        """The ``row_tags`` of an instance (its columns in memory) or of a snapshot."""
        if self._row_tags is None:
            return set()
        return set(self._row_tags(row if isinstance(row, dict) else self._rows.loaded(row)))

    @property
    def wants_rows(self) -> bool:
        """Whether deleting rows needs their columns (for their ``row_tags``)."""
        return self._row_tags is not None

    def _work(self, session: Session) -> _SessionWork:
        work: _SessionWork | None = session.info.get(self)
        if work is None:
            work = session.info[self] = _SessionWork()
        return work

    # -- listeners ------------------------------------------------------------------------

    def _after_flush(self, session: Session, flush_context: Any) -> None:
        """Collect flushed instances; ``new``/``dirty``/``deleted`` are still pre-flush."""
        model, rows = self._rows.model, self._rows
        pending = Pending()
        for obj in session.new:
            if isinstance(obj, model):
                pending.merge(self.changed_row(obj))
        for obj in session.dirty:
            if isinstance(obj, model) and session.is_modified(obj, include_collections=False):
                row = self.changed_row(obj)
                pending.merge(row)
                old = _identity(obj)  # a changed primary key leaves its old row behind
                if old is not None and rows.pk(old) not in row.changed:
                    pending.deleted.add(rows.pk(old))
        for obj in session.deleted:
            old = _identity(obj)
            if isinstance(obj, model) and old is not None:
                pending.merge(Pending(deleted={rows.pk(old)}, tags=self.row_tags(obj)))
        self.record(session, pending)

    def _on_execute(self, state: ORMExecuteState) -> Any:
        """An ORM bulk INSERT/UPDATE/DELETE on the table: the rows it touches are
        unknown, so it counts as a change to every row. Recorded once it succeeded."""
        if not (state.is_insert or state.is_update or state.is_delete):
            return None
        if state.execution_options.get(OWN_STATEMENT) or not self._targets(state):
            return None
        result = state.invoke_statement()
        self.record(state.session, Pending(everything=True))
        return result

    def _targets(self, state: ORMExecuteState) -> bool:
        mapper = self._rows.mapper
        if any(mapper.isa(other) or other.isa(mapper) for other in state.all_mappers):
            return True
        table = getattr(state.statement, "table", None)  # Core DML on the Table itself
        return any(table is own for own in mapper.tables)

    def _after_commit(self, session: Session) -> None:
        work: _SessionWork | None = session.info.get(self)
        if work is None or not work.open:
            return
        nested = session.get_nested_transaction()
        if nested is not None:  # RELEASE SAVEPOINT: the work joins the enclosing transaction
            released = work.open.pop(nested, None)
            parent = nested.parent
            if released is not None and parent is not None:
                work.open.setdefault(parent, Pending()).merge(released)
            return
        done = Pending()
        for pending in work.open.values():
            done.merge(pending)
        work.open.clear()
        try:
            self._committed(done)
        except BaseException as exc:  # the caller of commit() hears of it once closed
            work.failed = exc
            return
        work.committed = done

    def _after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        work: _SessionWork | None = session.info.get(self)
        if work is None:
            return
        work.open.pop(transaction, None)  # ended without a commit: rolled back
        if transaction.parent is None:
            work.open.clear()
            done, work.committed = work.committed, None
            failed, work.failed = work.failed, None
            if failed is not None:
                raise failed
            if done is not None:
                self._settled(done)


def _identity(obj: Any) -> tuple[Any, ...] | None:
    identity: tuple[Any, ...] | None = sa_inspect(obj).identity
    return identity
