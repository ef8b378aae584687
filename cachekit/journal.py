"""Invalidations that could not reach the server: kept, honoured locally, and replayed.

A delete, a tag invalidation or a replacing ``set`` that fails after the database
committed would leave the old entry readable as soon as the server answers again
(after a hang, or a node rejoining a pool). So a failed invalidation is recorded here
instead of being dropped. Until it is replayed, the cache that recorded it treats those
keys, and entries carrying those tags, as misses that are not filled.

Replays happen on two schedules, each at most once per ``retry`` seconds:

- before reads and writes of the cache, through its circuit breaker (so a caller never
  pays a timeout while the breaker is open);
- on a background thread of the journal's own, while it is not empty, straight to the
  server: it is the probe, whatever the breaker's cool-down, and its success closes the
  breaker. A process that only writes, or that is idle, still replays.

The bound that holds: once the server answers again, another process reading it can
see an old entry for at most ``retry`` (0.2 s) plus one server timeout (on a memcached
pool, up to its ``node_cooldown``), as long as the
process that journaled the invalidation is alive. A process that exits with a
non-empty journal tries one last replay and, if that fails, logs a WARNING with the
number lost. Past ``limit`` keys the journal refuses more, and the failed invalidation
raises, since it can no longer be kept.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable

from cachekit.exceptions import BackendError, CacheError
from cachekit.forks import reset_in_child

__all__ = ["Journal", "Replay"]

logger = logging.getLogger("cachekit")

#: Performs a replay: deletes backend keys, then invalidates tags; raises CacheError.
Replay = Callable[[list[str], list[str]], None]

_JOURNALS: weakref.WeakSet[Journal] = weakref.WeakSet()
# At exit, how long to wait for a replay already in flight before the last try.
_EXIT_WAIT = 2.0


class Journal:
    """Pending invalidations of one cache: backend keys to delete and tags to drop.

    Args:
        replay: how callers replay (through the circuit breaker).
        direct: how the background thread and the exit hook replay (straight to the
            server); ``None`` for no background replay.
        limit: the most keys and tags kept.
        retry: the least time between two replays.
        timer: a monotonic clock.
    """

    def __init__(
        self,
        replay: Replay,
        direct: Replay | None = None,
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
        self._replay = replay
        self._direct = direct
        self._next_try = 0.0
        self._next_direct = 0.0
        self._again_keys: set[str] = set()
        self._again_tags: set[str] = set()
        self._thread: threading.Thread | None = None
        self._after_fork()
        reset_in_child(self, Journal._after_fork)
        _JOURNALS.add(self)

    def _after_fork(self) -> None:
        # In a forked child another thread may have held these; start them afresh.
        self._lock = threading.Lock()
        self._replaying = threading.Lock()
        self._thread = None

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
            if self._direct is not None and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(
                    target=self._run, name="cachekit-journal", daemon=True
                )
                self._thread.start()

    def settle(self, *, direct: bool = False, force: bool = False, wait: float = 0.0) -> bool:
        """Replay pending invalidations if it is time to retry (or ``force``); return
        whether the journal is now empty. Never raises: a failed replay waits for the
        next try.

        Args:
            direct: go straight to the server, past the breaker (the background
                thread's schedule, kept apart from the callers' so that callers whose
                replays the open breaker refuses never push it back).
            force: replay even if the last try was less than ``retry`` ago.
            wait: how long to wait for a replay already in flight, in seconds.
        """
        if not self:
            return True
        now = self.timer()
        due = self._next_direct if direct else self._next_try
        if now < due and not force:
            return False
        lock = self._replaying
        if not (lock.acquire(timeout=wait) if wait else lock.acquire(blocking=False)):
            return False
        try:
            if direct:
                self._next_direct = now + self.retry
            else:
                self._next_try = now + self.retry
            return self._replay_once(self._direct if direct and self._direct else self._replay)
        finally:
            self._replaying.release()

    def _replay_once(self, replay: Replay) -> bool:
        with self._lock:
            keys, tags = set(self.keys), set(self.tags)
            self._again_keys.clear()
            self._again_tags.clear()
        # Keys and tags apart: a key on a dead server must not hold up every tag.
        keys_done = not keys or _replayed(replay, sorted(keys), [])
        tags_done = not tags or _replayed(replay, [], sorted(tags))
        with self._lock:
            if keys_done:
                self.keys -= keys - self._again_keys
            if tags_done:
                self.tags -= tags - self._again_tags
            return not self

    def _run(self) -> None:
        """The background replayer: a try whenever one is due, until the journal is empty."""
        while True:
            with self._lock:
                if not self:
                    self._thread = None
                    return
            wait = self._next_direct - self.timer()
            if wait > 0:
                time.sleep(min(wait, self.retry))
            elif not self.settle(direct=True) and self._next_direct <= self.timer():
                time.sleep(self.retry)  # a caller's replay was in flight: don't spin

    def at_exit(self) -> None:
        """One last replay, then a WARNING with what is lost if the journal is not empty."""
        if not self:
            return
        # At exit, a backend that is already torn down only means "lost", logged below.
        with contextlib.suppress(Exception):
            self.settle(direct=True, force=True, wait=_EXIT_WAIT)
        if self:
            logger.warning(
                "cachekit: exiting with %d invalidations not replayed (%d keys, %d tags); "
                "other processes may read the old entries until they expire",
                len(self),
                len(self.keys),
                len(self.tags),
            )


def _replayed(replay: Replay, keys: list[str], tags: list[str]) -> bool:
    try:
        replay(keys, tags)
    except CacheError:
        return False
    return True


def _settle_all_at_exit() -> None:
    for journal in list(_JOURNALS):
        journal.at_exit()


atexit.register(_settle_all_at_exit)
