"""What the examples share: the command line, the backend it picks, and a SQLite catalog."""

from __future__ import annotations

import argparse
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from cachekit import Backend, Cache
from cachekit.backends.memory import MemoryBackend

Product = dict[str, Any]
PRODUCTS = 300  # rows in the catalog, ids 1..300


def parse_args(description: str) -> argparse.Namespace:
    """The examples' options: memory by default, or ``--redis URL`` / ``--memcached HOST:PORT``."""
    parser = argparse.ArgumentParser(description=description)
    server = parser.add_mutually_exclusive_group()
    server.add_argument("--redis", metavar="URL", help="e.g. redis://127.0.0.1:6379/0")
    server.add_argument("--memcached", metavar="HOST:PORT", help="e.g. 127.0.0.1:11211")
    return parser.parse_args()


def make_backend(args: argparse.Namespace) -> Backend:
    """The backend the command line asked for; drivers are imported only when chosen.

    The timeouts are longer than the 0.1 s defaults because the examples check exact
    query counts, and a read that timed out would be answered as a miss and reloaded.
    """
    if args.redis:
        from cachekit.backends.redis import RedisBackend  # noqa: PLC0415 - optional driver

        return RedisBackend.from_url(args.redis, timeout=1.0)
    if args.memcached:
        from cachekit.backends.memcached import MemcachedBackend  # noqa: PLC0415 - likewise

        return MemcachedBackend([args.memcached], timeout=1.0, connect_timeout=1.0)
    return MemoryBackend(maxsize=10_000)


@contextmanager
def open_cache(args: argparse.Namespace, name: str, *, ttl: float = 60) -> Iterator[Cache]:
    """A cache in a namespace of its own, so runs sharing a server never see each other."""
    backend = make_backend(args)
    try:
        yield Cache(backend, namespace=f"example-{name}-{uuid.uuid4().hex[:8]}", ttl=ttl)
    finally:
        backend.close()


class Catalog:
    """An in-memory SQLite ``products`` table that counts the statements sent to it."""

    def __init__(self, rows: int = PRODUCTS) -> None:
        self.conn = sqlite3.connect(":memory:")
        self.conn.row_factory = sqlite3.Row
        self.conn.execute(
            "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " price_cents INTEGER NOT NULL CHECK (price_cents >= 0), stock INTEGER NOT NULL)"
        )
        self.conn.executemany(
            "INSERT INTO products VALUES (?, ?, ?, ?)",
            [(i, f"Product {i}", 100 + (i * 37) % 9_900, (i * 7) % 50) for i in range(1, rows + 1)],
        )
        self.conn.commit()
        self.reads = 0
        self.writes = 0

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Product]:
        """Run one SELECT and return its rows as plain dicts (JSON-serializable)."""
        self.reads += 1
        return [dict(row) for row in self.conn.execute(sql, params)]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write in its own transaction; return the number of rows changed."""
        self.writes += 1
        with self.conn:
            return self.conn.execute(sql, params).rowcount

    def find(self, product_id: int) -> Product | None:
        """One product by id, or ``None``: the single-row loader every strategy uses."""
        rows = self.query("SELECT * FROM products WHERE id = ?", (product_id,))
        return rows[0] if rows else None

    def row(self, product_id: int) -> Product | None:
        """The row as stored now, for the examples' own checks; not counted as a read."""
        row = self.conn.execute("SELECT * FROM products WHERE id = ?", (product_id,)).fetchone()
        return None if row is None else dict(row)


def expect(condition: bool, failure: str) -> None:
    """Fail the run unless ``condition`` holds; unlike ``assert``, ``python -O`` keeps it."""
    if not condition:
        raise AssertionError(failure)


def report(title: str, cache: Cache, db: Catalog, *, lookups: int) -> None:
    """Print what the cache saved: ``lookups`` reads were asked for, ``db.reads`` reached SQL."""
    stats = cache.stats()
    print(f"{title} on {type(cache.backend).__name__} (namespace {cache.namespace})")
    print(f"  lookups: {lookups}, SELECTs issued: {db.reads}, writes: {db.writes}")
    print(f"  queries saved: {lookups - db.reads}")
    print(f"  {stats} hit ratio {stats.hit_ratio:.1%}")
    expect(stats.errors == 0, "no backend errors (cachekit fails open, so they would hide)")
