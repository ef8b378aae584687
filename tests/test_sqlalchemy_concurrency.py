"""Writers and readers at once: at quiescence, no cached entry disagrees with the database.

Writer threads mix committed updates (through the repository and through plain
sessions), rolled-back updates, rolled-back SAVEPOINTs, re-inserts, ORM bulk UPDATEs and
``delete_where`` bulk deletes; reader threads read through the repository the whole
time (``get``, ``get_many``, cached queries), so fills race every invalidation. Once
every thread has finished, each entity and query entry a reader could be served is
compared with a fresh read of the database.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from cachekit import Cache
from cachekit.backends.base import Backend
from tests.test_sqlalchemy_repository import (
    DATABASES,
    QUERIES,
    Database,
    User,
    assert_cache_agrees,
    make_database,
    make_repository,
    new_user,
)

ROWS = 60
UNIVERSE = list(range(1, ROWS + 6))  # a few ids that only re-inserts create
WRITERS = 3
READERS = 3
ROUNDS = 12  # per writer
PAUSE = 0.005  # seconds a write transaction stays open after its last statement


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> Iterator[Database]:
    # SQLite in WAL mode: readers load while a write transaction is open, as they do
    # on PostgreSQL (READ COMMITTED), so fills race every commit.
    with make_database(request.param, tmp_path, namespace, wal=True) as database:
        yield database


class Writer:
    """One writer thread's script: a random mix of transactions, counted by outcome."""

    def __init__(self, db: Database, repo: Any, seed: int) -> None:
        self.db, self.repo, self.seed = db, repo, seed
        self.rng = random.Random(seed)
        self.outcomes: Counter[str] = Counter()
        self.actions: list[Callable[[], None]] = [
            self.commit_plain, self.commit_through_repository, self.rollback,
            self.savepoint_rollback, self.reinsert, self.orm_bulk_update, self.delete_where,
        ]  # fmt: skip

    def run(self) -> None:
        for _ in range(ROUNDS):
            action = self.rng.choice(self.actions)
            try:
                action()
            except (DBAPIError, StaleDataError):  # rolled back: a deadlock, or a row that a
                self.outcomes["conflict, rolled back"] += 1  # concurrent delete removed
                continue
            self.outcomes[action.__name__] += 1

    def _some(self, n: int = 3) -> list[int]:
        return sorted(self.rng.sample(UNIVERSE, n))  # one lock order: fewer deadlocks

    def _touch(self, session: Any, pks: list[int]) -> None:
        for pk in pks:
            user = session.get(User, pk)
            if user is not None:
                user.name = f"writer {self.seed} {self.rng.random():.6f}"
                user.version += 1

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A write transaction that stays open a moment after its last statement, so
        readers load the old rows from the database right before the commit."""
        with self.db.writer() as session, session.begin():
            yield session
            session.flush()
            time.sleep(PAUSE)

    def commit_plain(self) -> None:
        with self.transaction() as session:
            self._touch(session, self._some())

    def commit_through_repository(self) -> None:
        with self.transaction() as session:
            for pk in self._some(2):
                user = session.get(User, pk)
                if user is not None:
                    user.org = self.rng.randrange(5)
                    self.repo.update(user, session=session)

    def rollback(self) -> None:
        with self.db.writer() as session:
            self._touch(session, self._some())
            session.flush()
            time.sleep(PAUSE)
            session.rollback()

    def savepoint_rollback(self) -> None:
        with self.transaction() as session:
            self._touch(session, self._some(1))
            savepoint = session.begin_nested()
            self._touch(session, self._some(2))
            session.flush()
            savepoint.rollback()

    def reinsert(self) -> None:
        pk = self.rng.choice(UNIVERSE)
        with self.transaction() as session:
            if session.get(User, pk) is None:
                session.add(new_user(pk, name=f"reinserted by {self.seed}"))

    def orm_bulk_update(self) -> None:
        with self.transaction() as session:
            org = self.rng.randrange(5)
            session.execute(update(User).where(User.org == org).values(version=User.version + 1))

    def delete_where(self) -> None:
        first = self.rng.choice(UNIVERSE)
        with self.transaction() as session:
            self.repo.delete_where(User.id.between(first, first + 2), session=session, chunk=2)


def read_until(stop: threading.Event, repo: Any, seed: int, errors: list[BaseException]) -> None:
    rng = random.Random(seed)
    names = list(QUERIES)
    try:
        while not stop.is_set():
            repo.get_many(rng.sample(UNIVERSE, 10))
            repo.get(rng.choice(UNIVERSE))
            name = rng.choice(names)
            repo.query(name, QUERIES[name]())
    except BaseException as exc:  # reported by the test, with its traceback
        errors.append(exc)


def test_no_cached_entry_disagrees_with_the_database_at_quiescence(
    backend: Backend, namespace: str, db: Database
) -> None:
    db.seed(ROWS)
    repo = make_repository(Cache(backend, namespace=namespace, ttl=300), db)
    errors: list[BaseException] = []
    stop = threading.Event()
    readers = [
        threading.Thread(target=read_until, args=(stop, repo, 100 + i, errors))
        for i in range(READERS)
    ]
    scripts = [Writer(db, repo, i) for i in range(WRITERS)]
    writers = [threading.Thread(target=script.run) for script in scripts]
    for thread in [*readers, *writers]:
        thread.start()
    for thread in writers:
        thread.join(timeout=60)
    stop.set()
    for thread in readers:
        thread.join(timeout=60)
    assert not errors, f"a reader failed: {errors[0]!r}"
    assert not any(thread.is_alive() for thread in [*readers, *writers])
    outcomes = sum((script.outcomes for script in scripts), Counter[str]())
    assert sum(outcomes.values()) == WRITERS * ROUNDS
    assert outcomes["rollback"] + outcomes["savepoint_rollback"] > 0, outcomes
    assert outcomes["delete_where"] > 0 and outcomes["commit_plain"] > 0, outcomes
    # Quiescence: every entry a reader could be served equals the database.
    assert assert_cache_agrees(repo, db, UNIVERSE) > 0, "the check compared nothing"
    repo.close()
