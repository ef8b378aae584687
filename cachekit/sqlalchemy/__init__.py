"""SQLAlchemy repositories: rows and queries cached as snapshots, changed only after commits.

The only part of cachekit that imports SQLAlchemy (``pip install
'cachekit-layer[sqlalchemy]'``)::

    from cachekit.sqlalchemy import CachedRepository

    users = CachedRepository(cache, User, session_factory=Session, ttl=300)
    users.get(7)
    users.get_many([1, 2, 3])  # misses: one SELECT ... WHERE id IN (...), one batch fill
    with Session.begin() as session:
        users.update(user, session=session)  # the cache changes after the commit

    users = AsyncCachedRepository(acache, User, session_factory=AsyncSessionMaker)
    await users.get(7)  # the same API on AsyncCache and AsyncSession, as coroutines

Modules: :mod:`~cachekit.sqlalchemy.rows` (keys, snapshots, detached instances),
:mod:`~cachekit.sqlalchemy.tracking` (session events, work per transaction),
:mod:`~cachekit.sqlalchemy.base` (keys, tags, SQL and commit work both share),
:mod:`~cachekit.sqlalchemy.repository` and :mod:`~cachekit.sqlalchemy.async_repository`.
"""

from cachekit.exceptions import missing_dependency

try:
    import sqlalchemy  # noqa: F401 - fail here, with the extra to install, not deeper
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_dependency("sqlalchemy", "sqlalchemy") from exc

from cachekit.sqlalchemy.async_repository import AsyncCachedRepository
from cachekit.sqlalchemy.repository import CachedRepository, WritePolicy

__all__ = ["AsyncCachedRepository", "CachedRepository", "WritePolicy"]
