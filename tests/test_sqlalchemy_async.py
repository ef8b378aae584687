"""AsyncCachedRepository: the sync repository's scenarios on AsyncSession and AsyncCache.

Each scenario runs on SQLite (aiosqlite) and, marked ``postgres``, PostgreSQL (psycopg
async), with the memory backend and, marked ``redis``, ``AsyncRedisBackend`` on the
real Redis. A second ``AsyncCache`` on the same storage plays another process: what it
reads is what the server holds, not what the committing process's journal hides.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, inspect, update
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from cachekit import MISSING, AsyncCache
from cachekit.backends.base import AsyncBackend
from cachekit.backends.counting import AsyncCountingBackend
from cachekit.backends.memory import MemoryBackend
from cachekit.backends.proxy import InProcessAsync
from cachekit.backends.redis_async import AsyncRedisBackend
from cachekit.exceptions import BackendError, ConfigurationError
from cachekit.sqlalchemy import AsyncCachedRepository
from tests.conftest import SERVER_TIMEOUT, RedisCommands, aforget_namespace
from tests.test_sqlalchemy_repository import (
    DATABASES,
    EPOCH,
    GET_MANY_CALLS,
    IMMEDIATE,
    QUERIES,
    Database,
    User,
    compare_with_database,
    make_database,
    new_user,
    snapshot,
    sqlite_transactions,
)

GUARD = 60.0  # seconds: a hang guard, never a measure


@dataclass
class Hold:
    reached: asyncio.Event
    released: asyncio.Event


class Controlled(AsyncCountingBackend):
    """One process's connection to the test's storage: it counts its calls, can be taken
    down (every call fails as a dead server's does), and can hold the next call of a
    method until the test releases it."""

    def __init__(self, inner: AsyncBackend) -> None:
        super().__init__(inner)
        self.down = False
        self._holds: dict[str, Hold] = {}

    def hold(self, name: str) -> Hold:
        hold = self._holds[name] = Hold(asyncio.Event(), asyncio.Event())
        return hold

    async def _call(self, name: str, *args: Any) -> Any:
        self.calls[name] += 1
        hold = self._holds.pop(name, None)
        if hold is not None:
            hold.reached.set()
            await hold.released.wait()
        if self.down:
            raise BackendError(f"{name}: connection refused")
        return await getattr(self.inner, name)(*args)


# -- databases and caches -------------------------------------------------------------------


@dataclass
class AsyncDatabase:
    """The test's tables through an async engine; ``db`` is the sync side (seeds, and
    the fresh reads the checks compare with) and counts the statements of both."""

    db: Database
    engine: AsyncEngine
    Session: async_sessionmaker[AsyncSession]

    def writer(self) -> AsyncSession:
        """A session of the tracked factory that locks for writing at BEGIN on SQLite."""
        return self.Session(bind=self.engine.execution_options(**{IMMEDIATE: True}))


@asynccontextmanager
async def make_async_database(
    kind: str, tmp_path: Path, namespace: str, *, wal: bool = False
) -> AsyncIterator[AsyncDatabase]:
    with make_database(kind, tmp_path, namespace, wal=wal) as db:
        driver = "sqlite+aiosqlite" if kind == "sqlite" else "postgresql+psycopg_async"
        url = db.engine.url.set(drivername=driver)
        if kind == "sqlite":
            base = create_async_engine(url, connect_args={"timeout": 30})
            sqlite_transactions(base.sync_engine, wal=wal)
            engine = base
        else:
            base = create_async_engine(url, pool_size=10)
            engine = base.execution_options(schema_translate_map={None: namespace})
        statements = db.statements
        event.listen(base.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
        try:
            yield AsyncDatabase(db, engine, async_sessionmaker(engine, expire_on_commit=False))
        finally:
            await base.dispose()


@pytest.fixture(params=DATABASES)
async def adb(
    request: pytest.FixtureRequest, tmp_path: Path, namespace: str
) -> AsyncIterator[AsyncDatabase]:
    async with make_async_database(request.param, tmp_path, namespace) as database:
        yield database


@pytest.fixture
async def sqlite_adb(tmp_path: Path, namespace: str) -> AsyncIterator[AsyncDatabase]:
    async with make_async_database("sqlite", tmp_path, namespace) as database:
        yield database


STORAGES = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]


@asynccontextmanager
async def connections(
    request: pytest.FixtureRequest, namespace: str
) -> AsyncIterator[Callable[[], Controlled]]:
    """Connects to one storage (``request.param``, one of :data:`STORAGES`): each call
    is another process's connection. The test's keys are deleted afterwards."""
    memory = MemoryBackend()
    opened: list[AsyncRedisBackend] = []

    def new() -> Controlled:
        if request.param == "memory":
            return Controlled(InProcessAsync(memory))
        url = request.getfixturevalue("redis_server")
        opened.append(AsyncRedisBackend.from_url(url, timeout=SERVER_TIMEOUT))
        return Controlled(opened[-1])

    yield new
    for backend in opened:
        await aforget_namespace(backend, namespace)
        await backend.aclose()


@pytest.fixture(params=STORAGES)
async def connect(
    request: pytest.FixtureRequest, namespace: str
) -> AsyncIterator[Callable[[], Controlled]]:
    async with connections(request, namespace) as new:
        yield new


@pytest.fixture
def local(namespace: str) -> Callable[[], Controlled]:
    """For behaviour no backend changes: in-process storage only."""
    memory = MemoryBackend()
    return lambda: Controlled(InProcessAsync(memory))


async def open_cache(backend: Controlled, namespace: str) -> AsyncCache:
    return AsyncCache(backend, namespace=namespace, ttl=300)


@asynccontextmanager
async def repository(
    backend: Controlled, adb: AsyncDatabase, namespace: str, **options: Any
) -> AsyncIterator[AsyncCachedRepository[Any]]:
    cache = AsyncCache(backend, namespace=namespace, ttl=300)
    model = options.pop("model", User)
    repo = AsyncCachedRepository(cache, model, session_factory=adb.Session, ttl=300, **options)
    try:
        yield repo
    finally:
        await repo.aclose()
        await cache.aclose()


async def warm(repo: AsyncCachedRepository[User], pks: list[int]) -> None:
    await repo.get_many(pks)
    for name, stmt in QUERIES.items():
        await repo.query(name, stmt())


async def assert_cache_agrees(
    repo: AsyncCachedRepository[User], adb: AsyncDatabase, pks: list[int]
) -> int:
    """The sync suite's check: every entry a reader could be served equals the database."""
    cached = await repo.cache.get_many([repo.key(pk) for pk in pks])
    queries = {name: await repo.cache.get(repo.query_key(name)) for name in QUERIES}
    return compare_with_database(adb.db, repo, pks, cached, queries)


async def rename(adb: AsyncDatabase, pk: int, name: str) -> None:
    """A committed UPDATE in a plain session of the tracked factory."""
    async with adb.Session.begin() as session:
        user = await session.get(User, pk)
        assert user is not None
        user.name = name


async def name_of(repo: AsyncCachedRepository[User], pk: int) -> str | None:
    user = await repo.get(pk)
    return None if user is None else user.name


# -- reads ----------------------------------------------------------------------------------


async def test_entities_are_snapshots_returned_detached(
    local: Callable[[], Controlled], adb: AsyncDatabase, namespace: str
) -> None:
    adb.db.seed(10)
    async with repository(local(), adb, namespace) as repo:
        first = await repo.get(3)
        assert first is not None and inspect(first).detached
        adb.db.statements.clear()
        again = await repo.get(3)
        assert adb.db.selects() == 0, "a hit reads no row"
        assert again is not None and snapshot(again) == adb.db.users()[3]
        assert await repo.cache.get(repo.key(3)) == adb.db.users()[3]
        assert await repo.get(404) is None
        async with adb.Session() as session:
            adb.db.statements.clear()
            merged = await repo.get(3, session=session)
            assert adb.db.selects() == 0 and merged in session, "merged without a SELECT"
            assert await repo.get(3, session=session) is merged
            found = await repo.get_many([3, 4], session=session)
            assert found[3] is merged and found[4] in session
            assert merged is not None
            merged.name = "renamed in session"
            await session.commit()
        assert await name_of(repo, 3) == "renamed in session"


async def test_get_many_loads_30_misses_with_one_select_and_one_batch_fill(
    connect: Callable[[], Controlled], sqlite_adb: AsyncDatabase, namespace: str
) -> None:
    adb = sqlite_adb
    adb.db.seed(100)
    backend = connect()
    async with repository(backend, adb, namespace) as repo:
        ids = list(range(1, 101))
        await repo.get_many(ids[:70])
        adb.db.statements.clear()
        backend.calls.clear()
        found = await repo.get_many(ids)
        assert len(found) == 100 and list(found) == ids
        assert adb.db.selects() == 1
        assert dict(+backend.calls) == GET_MANY_CALLS, "the sync repository's round trips"


@pytest.mark.redis
async def test_get_many_is_8_round_trips_on_redis(
    redis_server: str, aredis_commands: RedisCommands, sqlite_adb: AsyncDatabase, namespace: str
) -> None:
    sqlite_adb.db.seed(100)
    backend = AsyncRedisBackend.from_url(redis_server, timeout=SERVER_TIMEOUT)
    try:
        async with repository(backend, sqlite_adb, namespace) as repo:  # type: ignore[arg-type]
            ids = list(range(1, 101))
            await repo.get_many(ids[:70])  # also the one-time persistence check and scripts
            aredis_commands.writes.clear()
            assert len(await repo.get_many(ids)) == 100
            assert aredis_commands.writes["writes"] == sum(GET_MANY_CALLS.values()) == 8
    finally:
        await aforget_namespace(backend, namespace)
        await backend.aclose()


# -- commits, rollbacks, SAVEPOINTs -----------------------------------------------------------


@pytest.mark.parametrize("policy", ["write-through", "invalidate"])
async def test_commit_invalidates_then_refills(
    connect: Callable[[], Controlled], adb: AsyncDatabase, namespace: str, policy: str
) -> None:
    adb.db.seed(20)
    other = await open_cache(connect(), namespace)  # another process, on the same server
    async with repository(connect(), adb, namespace, write_policy=policy) as repo:
        cache = repo.cache
        await warm(repo, list(range(1, 21)))
        async with adb.Session.begin() as session:
            user = await session.get(User, 4)
            assert user is not None
            user.org = 1  # moves into the "org:1" query
            await repo.update(user, session=session)
            repo.add(new_user(100), session=session)
            generated = User(name="no id given", org=2, seen=EPOCH, token=uuid.uuid4())
            repo.add(generated, session=session)
            await session.flush()
            generated_id = generated.id
            assert await repo.delete(7, session=session)
            assert (await cache.get(repo.key(4)))["org"] == 4, "nothing changes before the commit"
            assert await other.get(repo.query_key("org:1")) is not MISSING
            adb.db.statements.clear()
        reloads = adb.db.selects()
        rows = adb.db.users()
        if policy == "write-through":
            assert reloads == 1, "one SELECT reloads every row the transaction wrote"
            assert await other.get(repo.key(4)) == rows[4]
            assert await other.get(repo.key(generated_id)) == rows[generated_id]
        else:
            assert reloads == 0 and await other.get(repo.key(4)) is MISSING
        assert await other.get(repo.key(7)) is MISSING
        assert await other.get(repo.query_key("org:1")) is MISSING
        assert [u.id for u in await repo.query("org:1", QUERIES["org:1"]())] == [1, 4, 6, 11, 16]
        assert await assert_cache_agrees(repo, adb, [*range(1, 21), 100, generated_id]) > 0
    await other.aclose()


async def test_rollback_leaves_the_cache_alone(
    connect: Callable[[], Controlled], adb: AsyncDatabase, namespace: str
) -> None:
    adb.db.seed(20)
    async with repository(connect(), adb, namespace) as repo:
        await warm(repo, list(range(1, 21)))
        before = await repo.cache.get_many([repo.key(pk) for pk in range(1, 21)])
        async with adb.Session() as session:
            user = await session.get(User, 5)
            assert user is not None
            user.name = "never committed"
            session.add(new_user(200))
            await session.execute(update(User).where(User.org == 2).values(name="bulk"))
            await session.flush()
            own = await repo.get(5, session=session)
            assert own is not None and own.name == "never committed", "reads its own writes"
            assert await name_of(repo, 5) == "user 5", "others read the committed row"
            in_session = await repo.query("org:1", QUERIES["org:1"](), session=session)
            assert [u.id for u in in_session][-1] == 16
            await session.rollback()
        assert await repo.cache.get_many([repo.key(pk) for pk in range(1, 21)]) == before
        assert await assert_cache_agrees(repo, adb, [*range(1, 21), 200]) == 20 + len(QUERIES)


async def test_savepoint_rollback_drops_only_its_own_changes(
    connect: Callable[[], Controlled], adb: AsyncDatabase, namespace: str
) -> None:
    adb.db.seed(20)

    async def set_name(session: AsyncSession, pk: int, name: str) -> None:
        user = await session.get(User, pk)
        assert user is not None
        user.name = name

    async with repository(connect(), adb, namespace) as repo:
        await warm(repo, list(range(1, 21)))
        async with adb.Session.begin() as session:
            await set_name(session, 1, "outer")
            async with session.begin_nested():
                await set_name(session, 2, "released")
            savepoint = await session.begin_nested()
            await set_name(session, 3, "rolled back")
            await session.execute(update(User).where(User.org == 4).values(name="bulk"))
            await session.flush()
            await savepoint.rollback()
            async with session.begin_nested():
                inner = await session.begin_nested()
                await set_name(session, 5, "rolled back inside a released one")
                await session.flush()
                await inner.rollback()
                await set_name(session, 6, "released inside a released one")
        names = {pk: (await repo.cache.get(repo.key(pk)))["name"] for pk in range(1, 7)}
        assert names == {
            1: "outer",
            2: "released",
            3: "user 3",
            4: "user 4",
            5: "user 5",
            6: "released inside a released one",
        }
        assert await assert_cache_agrees(repo, adb, list(range(1, 21))) == 20


async def test_writes_outside_the_repository_are_caught(
    local: Callable[[], Controlled], adb: AsyncDatabase, namespace: str
) -> None:
    adb.db.seed(20)
    async with repository(local(), adb, namespace) as repo:
        cache = repo.cache
        await warm(repo, [*range(1, 21), 300])
        assert await cache.get(repo.key(300)) is None, "absence is cached..."
        async with adb.Session.begin() as session:  # plain ORM work: flushes
            await session.delete(await session.get(User, 9))
            session.add(new_user(300))
        assert await cache.get(repo.key(300)) == adb.db.users()[300], "...an insert replaces it"
        assert await cache.get(repo.key(9)) is MISSING
        await warm(repo, list(range(1, 21)))
        async with adb.Session.begin() as session:  # ORM bulk UPDATE: every entry
            await session.execute(update(User).where(User.org == 3).values(version=1))
        assert await cache.get_many([repo.key(pk) for pk in range(1, 21)]) == {}
        await warm(repo, list(range(1, 21)))
        async with adb.Session.begin() as session:  # Core DML through the session
            row = {**snapshot(new_user(301)), "version": 0}
            await session.execute(insert(User.__table__).values(row))
        assert await cache.get(repo.query_key("all")) is MISSING
        await warm(repo, list(range(1, 21)))
        async with adb.Session.begin() as session:  # on its connection: no event sees it
            raw = update(User.__table__).where(User.__table__.c.id == 10).values(name="raw")
            await (await session.connection()).execute(raw)
            await repo.mark_written(session, [10])
        assert (await cache.get(repo.key(10)))["name"] == "raw"
        assert await assert_cache_agrees(repo, adb, [*range(1, 21), 300, 301]) > 0


# -- bulk deletes ---------------------------------------------------------------------------


async def test_delete_where_100_of_1000_rows(
    connect: Callable[[], Controlled], adb: AsyncDatabase, namespace: str
) -> None:
    adb.db.seed(1000)
    pks = list(range(1, 1001))
    async with repository(connect(), adb, namespace) as repo:
        await warm(repo, pks)
        adb.db.statements.clear()
        assert await repo.delete_where(User.id % 10 == 0, chunk=40) == 100
        assert adb.db.selects() == 3, "the primary keys in chunks of 40: 40 + 40 + 20"
        assert len(adb.db.users()) == 900
        gone = await repo.cache.get_many([repo.key(pk) for pk in range(10, 1001, 10)])
        assert gone == {}
        assert await assert_cache_agrees(repo, adb, pks) == 900, "the other rows stay cached"
        with pytest.raises(ConfigurationError):
            await repo.delete_where(User.org == 1, chunk=0)


async def test_delete_where_in_a_given_session_follows_its_transaction(
    connect: Callable[[], Controlled], adb: AsyncDatabase, namespace: str
) -> None:
    adb.db.seed(50)
    pks = list(range(1, 51))
    async with repository(connect(), adb, namespace) as repo:
        async with adb.Session() as session:
            assert await repo.delete_where(User.org == 0, session=session) == 10
            await warm(repo, pks)  # readers refill from the committed rows meanwhile
            await session.rollback()
        assert await assert_cache_agrees(repo, adb, pks) == 50 + len(QUERIES)
        async with adb.Session() as session:
            assert await repo.delete_where(User.org == 0, session=session) == 10
            await warm(repo, pks)
            assert await repo.cache.get(repo.key(5)) is not None, "refilled before the commit"
            await session.commit()
        assert await repo.cache.get(repo.key(5)) is MISSING, "invalidated again after it"
        assert await assert_cache_agrees(repo, adb, pks) == 40


# -- when the invalidation runs ---------------------------------------------------------------


async def test_a_reader_sees_the_old_row_until_the_commit_and_never_after(
    connect: Callable[[], Controlled], adb: AsyncDatabase, namespace: str
) -> None:
    adb.db.seed(10)
    reader_backend = connect()
    async with (
        repository(connect(), adb, namespace) as writer,
        repository(reader_backend, adb, namespace, track=False) as reader,
    ):
        assert await name_of(reader, 5) == "user 5"
        async with adb.Session.begin() as session:
            user = await session.get(User, 5)
            assert user is not None
            user.name = "new"
            await session.flush()
            assert await name_of(reader, 5) == "user 5", "cached: the committed row"
            await reader.invalidate([5])
            assert await name_of(reader, 5) == "user 5", "loaded: the committed row"
        assert await name_of(reader, 5) == "new", "the commit returned: the new row only"
        # A fill that loaded the old row before a commit and stores after it is refused.
        await reader.invalidate([5])
        fill = reader_backend.hold("compare_and_set")
        late = asyncio.create_task(reader.get(5))
        await asyncio.wait_for(fill.reached.wait(), GUARD)  # loaded, not yet stored
        await rename(adb, 5, "newer")
        fill.released.set()
        stale = await asyncio.wait_for(late, GUARD)
        assert stale is not None and stale.name == "new", "read before the commit"
        assert await name_of(reader, 5) == "newer"
        assert await name_of(writer, 5) == "newer"


async def test_the_loop_runs_while_a_commit_waits_for_its_invalidation(
    connect: Callable[[], Controlled], adb: AsyncDatabase, namespace: str
) -> None:
    adb.db.seed(10)
    writer_backend = connect()
    async with (
        repository(writer_backend, adb, namespace),
        repository(connect(), adb, namespace, track=False) as reader,
    ):
        await reader.get(5)
        epoch = writer_backend.hold("set")  # the invalidation's first call
        commit = asyncio.create_task(rename(adb, 5, "new"))
        await asyncio.wait_for(epoch.reached.wait(), GUARD)
        # This task runs, and so does the database, while the commit is suspended.
        async with adb.Session() as session:
            user = await session.get(User, 5)
            assert user is not None and user.name == "new", "COMMIT came first"
        assert not commit.done(), "commit() returns after the invalidation, not before"
        assert await name_of(reader, 5) == "user 5", "the server still holds the old row"
        epoch.released.set()
        await asyncio.wait_for(commit, GUARD)
        assert await name_of(reader, 5) == "new"
        assert writer_backend.calls["set"] >= 1


async def test_a_cancelled_commit_still_invalidates(
    connect: Callable[[], Controlled], adb: AsyncDatabase, namespace: str
) -> None:
    """``await session.commit()`` is cancelled while it waits for the invalidation:
    the database has committed, so the invalidation carries on without its waiter.
    (``async with Session.begin()`` runs its commit to completion on its own.)"""
    adb.db.seed(10)
    writer_backend = connect()

    async def commit_rename() -> None:
        async with adb.Session() as session:
            user = await session.get(User, 5)
            assert user is not None
            user.name = "new"
            await session.commit()

    async with repository(connect(), adb, namespace, track=False) as reader:
        await reader.get(5)
        async with repository(writer_backend, adb, namespace):
            epoch = writer_backend.hold("set")
            commit = asyncio.create_task(commit_rename())
            await asyncio.wait_for(epoch.reached.wait(), GUARD)
            commit.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(commit, GUARD)
            assert adb.db.users()[5]["name"] == "new"
            assert await name_of(reader, 5) == "user 5", "not yet"
            epoch.released.set()
        # aclose() waited for the invalidation the cancelled commit had started.
        assert await name_of(reader, 5) == "new"


async def test_a_dead_server_journals_the_invalidation(
    connect: Callable[[], Controlled], adb: AsyncDatabase, namespace: str
) -> None:
    adb.db.seed(10)
    writer_backend = connect()
    async with (
        repository(writer_backend, adb, namespace) as writer,
        repository(connect(), adb, namespace, track=False) as reader,
    ):
        await writer.get(5)
        await reader.get(5)
        writer_backend.down = True
        await rename(adb, 5, "new")  # the commit stands; the invalidation is journaled
        assert writer.cache.stats().pending_invalidations > 0
        assert await name_of(writer, 5) == "new", "this process honours its journal"
        assert await name_of(reader, 5) == "user 5", "the server was never told"
        writer_backend.down = False
        assert await writer.cache.replay_invalidations()
        assert await name_of(reader, 5) == "new"
        # A journal that cannot keep it: commit() raises, after the database committed.
        writer_backend.down = True
        writer.cache.journal.limit = 0
        with pytest.raises(BackendError, match="journal full"):
            await rename(adb, 6, "committed anyway")
        assert adb.db.users()[6]["name"] == "committed anyway"
        writer_backend.down = False
        await rename(adb, 7, "next")  # the session machinery is not left broken
        assert await name_of(reader, 7) == "next"


# -- tracking and configuration -------------------------------------------------------------


async def test_tracks_its_own_factory_and_only_async_sessions(
    local: Callable[[], Controlled], adb: AsyncDatabase, namespace: str
) -> None:
    adb.db.seed(10)
    other_factory = async_sessionmaker(adb.engine, expire_on_commit=False)
    async with (
        repository(local(), adb, namespace) as repo,
        repository(local(), adb, namespace + "b") as second,
    ):
        assert type(adb.Session().sync_session) is not Session, "a class of its own"
        assert type(other_factory().sync_session) is Session, "other factories untouched"
        for tracked in (repo, second):
            await tracked.get(1)
        await rename(adb, 1, "seen by both")
        assert await name_of(repo, 1) == await name_of(second, 1) == "seen by both"
        await repo.get(2)
        async with other_factory.begin() as session:  # untracked: nothing is invalidated
            user = await session.get(User, 2)
            assert user is not None
            user.name = "unseen"
        assert await name_of(repo, 2) == "user 2"
        async with other_factory.begin() as session:  # tracked once a method is given it
            await repo.update(await session.get(User, 2), session=session)
        assert await name_of(repo, 2) == "unseen"
        with pytest.raises(TypeError, match="CachedRepository"):
            repo.track(sessionmaker(adb.db.engine))  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="write_policy"):
            AsyncCachedRepository(repo.cache, User, session_factory=adb.Session, write_policy="x")  # type: ignore[arg-type]
