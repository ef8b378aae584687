"""Lease test workloads: a system of record, and the threads and processes that race on it.

Process entry points live here, at module level, so that "spawn" children can import
them; every child builds its own backend and Cache and reports an :class:`Outcome`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import multiprocessing
import queue
import random
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from psycopg import sql

from cachekit import MISSING, Cache
from cachekit.backends.base import Backend
from cachekit.backends.memcached import MemcachedBackend
from cachekit.backends.redis import RedisBackend
from cachekit.markers import is_marker

# Fresh interpreters: a forked child would inherit the parent's sockets and locks.
SPAWN = multiprocessing.get_context("spawn")
# Generous per-command timeout: a loaded machine must not turn slowness into errors.
SERVER_TIMEOUT = 2.0
# The longest any thread or process may take to start, meet the others or stop.
JOIN_TIMEOUT = 30.0
# A child process still running after this long is hung: it dumps its stacks and exits.
CHILD_DEADLINE = 60.0
# How long a test waits for all its processes to report: past CHILD_DEADLINE.
PROCESS_TIMEOUT = CHILD_DEADLINE + 15.0
HOT_KEYS = tuple(f"k{i}" for i in range(8))


@dataclass(frozen=True)
class Server:
    """A cache server that each process connects to on its own."""

    kind: str  # "redis" or "memcached"
    address: str  # a redis:// URL or memcached's "host:port"

    def backend(self) -> Backend:
        if self.kind == "redis":
            return RedisBackend.from_url(self.address, timeout=SERVER_TIMEOUT)
        return MemcachedBackend(
            self.address, timeout=SERVER_TIMEOUT, connect_timeout=SERVER_TIMEOUT
        )


@dataclass
class Outcome:
    """What one worker (a process or a group of threads) reports back."""

    stats: dict[str, Any] = field(default_factory=dict)  # CacheStats as a dict
    errors: list[str] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)


def total(outcomes: Sequence[Outcome], counter: str) -> int:
    """One CacheStats counter summed over every worker."""
    return sum(outcome.stats.get(counter, 0) for outcome in outcomes)


# -- the system of record -----------------------------------------------------------


class Record(Protocol):
    """The database the cache fronts: one version number per key."""

    def read(self, key: str) -> int: ...
    def bump(self, key: str) -> int: ...


class DictRecord:
    """An in-process record, for workloads made of threads only."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._versions = dict.fromkeys(keys, 0)
        self._lock = threading.Lock()

    def read(self, key: str) -> int:
        return self._versions[key]

    def bump(self, key: str) -> int:
        with self._lock:
            self._versions[key] += 1
            return self._versions[key]


class PostgresRecord:
    """A PostgreSQL table shared by processes; each thread commits on its own connection."""

    def __init__(self, dsn: str, table: str) -> None:
        if not table.isidentifier():
            raise ValueError(f"not a table name: {table!r}")
        self.dsn = dsn
        self.table = sql.Identifier(table)
        self._local = threading.local()
        self._connections: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    def _connection(self) -> psycopg.Connection[Any]:
        connection: psycopg.Connection[Any] | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = psycopg.connect(self.dsn, autocommit=True)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def create(self, keys: Sequence[str]) -> None:
        connection = self._connection()
        connection.execute(
            sql.SQL("CREATE TABLE {} (key text PRIMARY KEY, version bigint NOT NULL)").format(
                self.table
            )
        )
        with connection.cursor() as cursor:
            cursor.executemany(
                sql.SQL("INSERT INTO {} (key, version) VALUES (%s, 0)").format(self.table),
                [(key,) for key in keys],
            )

    def drop(self) -> None:
        self._connection().execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self.table))

    def read(self, key: str) -> int:
        query = sql.SQL("SELECT version FROM {} WHERE key = %s").format(self.table)
        row = self._connection().execute(query, (key,)).fetchone()
        assert row is not None, key
        return int(row[0])

    def bump(self, key: str) -> int:
        """Increment the version and commit (autocommit): the write is durable on return."""
        query = sql.SQL("UPDATE {} SET version = version + 1 WHERE key = %s RETURNING version")
        row = self._connection().execute(query.format(self.table), (key,)).fetchone()
        assert row is not None, key
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()


# -- the stale-set workload ---------------------------------------------------------


@dataclass(frozen=True)
class StaleWorkload:
    """Readers, writers and deleters on a few hot keys, with delays that widen the race.

    A writer commits a new version to the record, then deletes the cache key
    (invalidation after commit). A reader whose loader read the record before that
    commit and fills after that delete stores a stale version, unless a lease stops it.
    Readers run ``read_tail`` seconds past the writers, as traffic outlives a write:
    a stale fill racing the last write to a key then stays for the audit to find.
    """

    namespace: str
    lease_ttl: float | None
    seconds: float = 1.0
    read_tail: float = 0.2
    readers: int = 3
    writers: int = 2
    deleters: int = 1
    load_delay: float = 0.02  # the most a loader waits between reading and returning
    write_delay: float = 0.005  # the most a writer or deleter waits between operations
    keys: tuple[str, ...] = HOT_KEYS

    def cache(self, backend: Backend) -> Cache:
        return Cache(backend, namespace=self.namespace, ttl=60, lease_ttl=self.lease_ttl)


def run_stale_roles(cache: Cache, record: Record, workload: StaleWorkload) -> Outcome:
    """Run the workload's threads on ``cache`` for ``workload.seconds``, then stop them."""
    stop_writes = threading.Event()
    stop_reads = threading.Event()
    errors: list[str] = []

    def read(rng: random.Random) -> None:
        key = rng.choice(workload.keys)

        def load() -> int:
            version = record.read(key)
            time.sleep(rng.uniform(0, workload.load_delay))
            return version

        cache.get_or_load(key, load)

    def write(rng: random.Random) -> None:
        time.sleep(rng.uniform(0, workload.write_delay))
        key = rng.choice(workload.keys)
        record.bump(key)  # committed first...
        cache.delete(key)  # ...then invalidated, as cache-aside prescribes

    def delete(rng: random.Random) -> None:
        time.sleep(rng.uniform(0, workload.write_delay))
        cache.delete(rng.choice(workload.keys))

    def loop(role: Callable[[random.Random], None], stop: threading.Event) -> None:
        rng = random.Random()
        try:
            while not stop.is_set():
                role(rng)
        except BaseException:  # reported to the test, which fails on any
            errors.append(traceback.format_exc())

    roles = [(read, stop_reads)] * workload.readers
    roles += [(write, stop_writes)] * workload.writers + [(delete, stop_writes)] * workload.deleters
    threads = [threading.Thread(target=loop, args=role, daemon=True) for role in roles]
    try:
        for thread in threads:
            thread.start()
        stop_writes.wait(workload.seconds)
        stop_writes.set()
        stop_reads.wait(workload.read_tail)
    finally:
        stop_writes.set()
        stop_reads.set()
        errors.extend(join_all(threads))
    return Outcome(stats=dataclasses.asdict(cache.stats()), errors=errors)


@dataclass(frozen=True)
class StaleJob:
    """What each process of the stale-set workload needs to build its own clients."""

    server: Server
    workload: StaleWorkload
    dsn: str  # the PostgreSQL record
    table: str


def stale_process(job: StaleJob, barrier: Any, results: Any) -> None:
    """One process of the stale-set workload: its own backend, Cache and connections."""
    watchdog()
    backend = job.server.backend()
    record = PostgresRecord(job.dsn, job.table)
    try:
        cache = job.workload.cache(backend)
        barrier.wait(JOIN_TIMEOUT)  # every process starts racing at the same moment
        results.put(run_stale_roles(cache, record, job.workload))
    except BaseException:
        results.put(Outcome(errors=[traceback.format_exc()]))
    finally:
        record.close()
        backend.close()


@dataclass
class Audit:
    """The cache compared with the record, key by key, once nothing runs."""

    stale: dict[str, tuple[Any, int]]  # key: (cached value, record's version)
    cached: int
    markers: int


def audit(cache: Cache, record: Record, keys: Sequence[str]) -> Audit:
    """Read every key raw from the backend, decode it, and compare it with the record."""
    found = Audit(stale={}, cached=0, markers=0)
    for key in keys:
        bkey = cache.backend_key(key)
        raw = cache.backend.get(bkey)
        if raw is MISSING:
            continue
        if is_marker(raw):
            found.markers += 1
            continue
        value = (
            raw if cache.backend.capabilities.stores_objects else cache.serializer.loads(raw, bkey)
        )
        found.cached += 1
        version = record.read(key)
        if value != version:
            found.stale[key] = (value, version)
    return found


# -- stampedes and dead holders -----------------------------------------------------


def stampede_threads(
    cache: Cache, count: int, barrier: Any, loader: Callable[[], Any], key: str = "hot"
) -> Outcome:
    """``count`` threads that meet at ``barrier``, then all ask for one cold key."""
    values: list[Any] = []
    errors: list[str] = []

    def call() -> None:
        try:
            barrier.wait(JOIN_TIMEOUT)
            values.append(cache.get_or_load(key, loader))
        except BaseException:  # reported to the test, which fails on any
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=call, daemon=True) for _ in range(count)]
    try:
        for thread in threads:
            thread.start()
    finally:
        errors.extend(join_all(threads))
    return Outcome(stats=dataclasses.asdict(cache.stats()), errors=errors, values=values)


@dataclass(frozen=True)
class StampedeJob:
    """One process of a stampede: ``threads`` callers, a loader of ``load_seconds``."""

    server: Server
    namespace: str
    threads: int
    load_seconds: float


def stampede_process(job: StampedeJob, barrier: Any, calls: Any, results: Any) -> None:
    """Run one process's callers; ``calls`` (a shared Value) counts every loader call."""
    watchdog()
    backend = job.server.backend()
    try:

        def load() -> str:
            with calls.get_lock():
                calls.value += 1
            time.sleep(job.load_seconds)
            return "loaded"

        cache = Cache(backend, namespace=job.namespace, lease_ttl=5.0)
        results.put(stampede_threads(cache, job.threads, barrier, load))
    except BaseException:
        results.put(Outcome(errors=[traceback.format_exc()]))
    finally:
        backend.close()


def hold_lease(server: Server, namespace: str, key: str, lease_ttl: float, holding: Any) -> None:
    """Take the lease on ``key`` and load for a minute: the test kills this process."""
    backend = server.backend()
    cache = Cache(backend, namespace=namespace, lease_ttl=lease_ttl)

    def load() -> str:
        holding.set()
        time.sleep(60)
        return "never stored"

    cache.get_or_load(key, load)


# -- starting and stopping ----------------------------------------------------------


def join_all(threads: Sequence[threading.Thread], timeout: float = JOIN_TIMEOUT) -> list[str]:
    """Join every started thread within one shared deadline; name those still running."""
    deadline = time.monotonic() + timeout
    stuck = []
    for thread in threads:
        if thread.ident is None:
            continue  # never started
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            stuck.append(f"{thread.name} still running after {timeout} s")
    return stuck


def run_processes(
    target: Callable[..., None],
    args: Sequence[tuple[Any, ...]],
    timeout: float,
    barrier: Any = None,
) -> list[Outcome]:
    """Run one spawned process per argument tuple; each puts one Outcome on the queue.

    A process that dies without reporting (say, cachekit failed to import) aborts
    ``barrier``, so the others stop waiting for it, and is reported as an error.
    Whatever happens, every process is joined or killed before this returns.
    """
    results = SPAWN.Queue()
    processes = [SPAWN.Process(target=target, args=(*a, results), daemon=True) for a in args]
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        outcomes = _collect(results, processes, deadline, barrier)
        for process in processes:
            process.join(max(0.1, deadline - time.monotonic()))
        if len(outcomes) < len(processes):
            codes = [p.exitcode for p in processes]
            missing = f"only {len(outcomes)} of {len(processes)} processes reported"
            detail = f"within {timeout} s (exit codes {codes}); see the captured stderr"
            outcomes.append(Outcome(errors=[f"{missing} {detail}"]))
        outcomes += [
            Outcome(errors=[f"process {p.pid} exited with {p.exitcode}"])
            for p in processes
            if p.exitcode != 0
        ]
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        results.close()
        results.join_thread()
    return outcomes


def _collect(results: Any, processes: list[Any], deadline: float, barrier: Any) -> list[Outcome]:
    """Gather one outcome per process, until all reported, all exited, or the deadline."""
    outcomes: list[Outcome] = []
    while len(outcomes) < len(processes):
        try:
            outcomes.append(results.get(timeout=0.2))
            continue
        except queue.Empty:
            pass
        if barrier is not None and any(p.exitcode not in (None, 0) for p in processes):
            barrier.abort()  # a process died: the others must not wait for it
        if all(p.exitcode is not None for p in processes) or time.monotonic() > deadline:
            break
    with contextlib.suppress(queue.Empty):  # exited processes may have left theirs in the pipe
        while len(outcomes) < len(processes):
            outcomes.append(results.get(timeout=1.0))
    return outcomes


def watchdog() -> None:
    """In a child process: if it is still running after CHILD_DEADLINE, print every
    thread's stack to stderr (the test shows it) and exit, rather than hang."""
    faulthandler.dump_traceback_later(CHILD_DEADLINE, exit=True)
