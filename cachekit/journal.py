"""Invalidations that could not reach the server: kept, honoured locally, and replayed.

A delete that fails after the database committed would leave the old entry readable
as soon as the server answers again (after a hang, or a node rejoining a pool). So a
failed invalidation is recorded here instead of being dropped. Until it is replayed,
the cache that recorded it treats those keys, and entries carrying those tags, as
misses that are not filled; before each read it retries the replay (at most once per
``retry`` seconds), so the first read after the server returns deletes the old
entries before anything is read.

Limits: the journal lives in the process that failed to invalidate. Another process
reading the same server between its recovery and this process's replay can still see
the old entry, for at most one ``retry`` interval of this process's activity; a
process that exits with a non-empty journal loses it (logged). Past ``limit`` keys
the journal refuses more, and the failed invalidation raises, since it can no longer
be kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from cachekit.exceptions import BackendError, CacheError
from cachekit.forks import renew_locks_in_child
from cachekit.invalidation import invalidate_tags

if TYPE_CHECKING:
    from cachekit.cache import Cache

__all__ = ["Journal"]


class Journal:
    """Pending invalidations of one cache: backend keys to delete and tags to drop."""

    def __init__(
        self,
        *,
        limit: int = 100_000,
        retry: float = 0.2,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.retry = retry
        self.timer = timer
        self.keys: set[str] = set()
        self.tags: set[str] = set()
        self._next_try = 0.0
        self._again_keys: set[str] = set()
        self._again_tags: set[str] = set()
        self._lock = threading.Lock()
        renew_locks_in_child(self, "_lock")  # a child inherits the journal, not a held lock

    def __bool__(self) -> bool:
        return bool(self.keys or self.tags)

    def __len__(self) -> int:
        return len(self.keys) + len(self.tags)

    def record(self, *, keys: Iterable[str] = (), tags: Iterable[str] = ()) -> None:
        """Keep invalidations that failed, to honour and replay them.

        Raises:
            BackendError: the journal is full; this invalidation is lost.
        """
        keys, tags = set(keys), set(tags)
        with self._lock:
            if len(self) + len(keys) + len(tags) > self.limit:
                raise BackendError(
                    f"invalidation journal full ({self.limit} entries): "
                    f"{len(keys) + len(tags)} invalidations lost"
                )
            self.keys |= keys
            self.tags |= tags
            # Recorded again while a replay is in flight: that replay may have run before
            # this failure's write, so it must not clear them.
            self._again_keys |= keys
            self._again_tags |= tags

    def settle(self, cache: Cache) -> bool:
        """Replay pending invalidations if it is time to retry; return whether the
        journal is now empty. Never raises: a failed replay waits for the next try."""
        now = self.timer()
        if now < self._next_try:
            return False
        self._next_try = now + self.retry
        with self._lock:
            keys, tags = set(self.keys), set(self.tags)
            self._again_keys.clear()
            self._again_tags.clear()
        try:
            if keys:
                cache.store.delete_many(list(keys))
            if tags:
                invalidate_tags(cache, tags)
        except CacheError:
            return False
        with self._lock:
            self.keys -= keys - self._again_keys
            self.tags -= tags - self._again_tags
            return not self
