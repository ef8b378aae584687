"""The bench's tables for one run: opened before the work, dropped (and a scratch file
removed) after it unless ``--keep``."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

from cachekit.bench.config import BenchConfig
from cachekit.bench.database import Database, scratch_file

__all__ = ["run_tables"]


@contextlib.contextmanager
def run_tables(config: BenchConfig, out: Any) -> Iterator[Database]:
    """The bench's tables for the run, dropped after it unless ``--keep``; a temporary
    SQLite file (or one the bench had to create) goes too."""
    scratch = tempfile.mkdtemp(prefix="cachekit-bench-") if config.db is None else None
    try:
        url = scratch_file(scratch) if scratch else config.db
        assert url is not None  # noqa: S101 - one of the two is set; narrows the type
        created = url.kind == "sqlite" and not os.path.exists(url.path)
        db = Database(url, prefix=f"cachekit_bench_{uuid.uuid4().hex[:8]}_")
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:
        yield db
    finally:
        _clean_up(config, db, scratch, created, out)


def _clean_up(
    config: BenchConfig, db: Database, scratch: str | None, created: bool, out: Any
) -> None:
    if config.keep:
        print(f"kept the tables {db.products} and {db.reviews} in {db.where}", file=out)
        db.close()
        return
    try:
        db.drop()
    finally:
        db.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        elif created:
            with contextlib.suppress(OSError):
                os.remove(db.url.path)
