"""The sync concurrency scenario as asyncio tasks: at quiescence no entry disagrees.

Writer tasks mix the same transactions as tests/test_sqlalchemy_concurrency.py
(committed, rolled back, rolled-back SAVEPOINTs, re-inserts, ORM bulk UPDATEs,
``delete_where``) on ``AsyncSession``; reader tasks read through an
``AsyncCachedRepository`` the whole time, on the same loop, so every fill races every
commit's invalidation. Then each entry a reader could be served is compared with the
database.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from tests.test_sqlalchemy_async import (
    GUARD,
    STORAGES,
    AsyncDatabase,
    assert_cache_agrees,
    connections,
    make_async_database,
    repository,
)
from tests.test_sqlalchemy_concurrency import PAUSE, READERS, ROUNDS, ROWS, UNIVERSE, WRITERS
from tests.test_sqlalchemy_repository import DATABASES, QUERIES, User, new_user


@pytest.fixture(params=STORAGES)
async def connect(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Any]:
    async with connections(request, namespace) as new:
        yield new


@pytest.fixture(params=DATABASES)
async def adb(
    request: pytest.FixtureRequest, tmp_path: Path, namespace: str
) -> AsyncIterator[AsyncDatabase]:
    # SQLite in WAL mode: readers load while a write transaction is open.
    async with make_async_database(request.param, tmp_path, namespace, wal=True) as database:
        yield database


class Writer:
    """One writer task's script, as the sync suite's Writer thread runs it."""

    def __init__(self, adb: AsyncDatabase, repo: Any, seed: int) -> None:
        self.adb, self.repo, self.seed = adb, repo, seed
        self.rng = random.Random(seed)
        self.outcomes: Counter[str] = Counter()
        self.actions: list[Callable[[], Any]] = [
            self.commit_plain, self.commit_through_repository, self.rollback,
            self.savepoint_rollback, self.reinsert, self.orm_bulk_update, self.delete_where,
        ]  # fmt: skip

    async def run(self) -> None:
        for _ in range(ROUNDS):
            action = self.rng.choice(self.actions)
            try:
                await action()
            except (DBAPIError, StaleDataError):  # a deadlock, or a row deleted meanwhile
                self.outcomes["conflict, rolled back"] += 1
                continue
            self.outcomes[action.__name__] += 1

    def _some(self, n: int = 3) -> list[int]:
        return sorted(self.rng.sample(UNIVERSE, n))  # one lock order: fewer deadlocks

    async def _touch(self, session: AsyncSession, pks: list[int]) -> None:
        for pk in pks:
            user = await session.get(User, pk)
            if user is not None:
                user.name = f"writer {self.seed} {self.rng.random():.6f}"
                user.version += 1

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """Open a moment after its last statement, so readers load the old rows."""
        async with self.adb.writer() as session, session.begin():
            yield session
            await session.flush()
            await asyncio.sleep(PAUSE)

    async def commit_plain(self) -> None:
        async with self.transaction() as session:
            await self._touch(session, self._some())

    async def commit_through_repository(self) -> None:
        async with self.transaction() as session:
            for pk in self._some(2):
                user = await session.get(User, pk)
                if user is not None:
                    user.org = self.rng.randrange(5)
                    await self.repo.update(user, session=session)

    async def rollback(self) -> None:
        async with self.adb.writer() as session:
            await self._touch(session, self._some())
            await session.flush()
            await asyncio.sleep(PAUSE)
            await session.rollback()

    async def savepoint_rollback(self) -> None:
        async with self.transaction() as session:
            await self._touch(session, self._some(1))
            savepoint = await session.begin_nested()
            await self._touch(session, self._some(2))
            await session.flush()
            await savepoint.rollback()

    async def reinsert(self) -> None:
        pk = self.rng.choice(UNIVERSE)
        async with self.transaction() as session:
            if await session.get(User, pk) is None:
                session.add(new_user(pk, name=f"reinserted by {self.seed}"))

    async def orm_bulk_update(self) -> None:
        async with self.transaction() as session:
            org = self.rng.randrange(5)
            stmt = update(User).where(User.org == org).values(version=User.version + 1)
            await session.execute(stmt)

    async def delete_where(self) -> None:
        first = self.rng.choice(UNIVERSE)
        async with self.transaction() as session:
            condition = User.id.between(first, first + 2)
            await self.repo.delete_where(condition, session=session, chunk=2)


async def read_until(stop: asyncio.Event, repo: Any, seed: int) -> None:
    rng = random.Random(seed)
    names = list(QUERIES)
    while not stop.is_set():
        await repo.get_many(rng.sample(UNIVERSE, 10))
        await repo.get(rng.choice(UNIVERSE))
        name = rng.choice(names)
        await repo.query(name, QUERIES[name]())
        # Hits on in-process storage never suspend: without a pause, readers would hold
        # the loop, and each writer's transaction (and SQLite's write lock) with it.
        await asyncio.sleep(0.001)


async def test_no_cached_entry_disagrees_with_the_database_at_quiescence(
    connect: Callable[[], Any], adb: AsyncDatabase, namespace: str
) -> None:
    adb.db.seed(ROWS)
    async with repository(connect(), adb, namespace) as repo:
        stop = asyncio.Event()
        readers = [asyncio.create_task(read_until(stop, repo, 100 + i)) for i in range(READERS)]
        scripts = [Writer(adb, repo, i) for i in range(WRITERS)]
        try:
            await asyncio.wait_for(asyncio.gather(*(s.run() for s in scripts)), GUARD)
        finally:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*readers), GUARD)  # a reader's error fails here
        outcomes = sum((script.outcomes for script in scripts), Counter[str]())
        assert sum(outcomes.values()) == WRITERS * ROUNDS
        assert outcomes["rollback"] + outcomes["savepoint_rollback"] > 0, outcomes
        assert outcomes["delete_where"] > 0 and outcomes["commit_plain"] > 0, outcomes
        assert await assert_cache_agrees(repo, adb, UNIVERSE) > 0, "the check compared nothing"
