"""Invalidations that could not reach the server: kept, honoured locally, and replayed.

A delete, a tag invalidation or a replacing ``set`` that fails after the database
committed would leave the old entry readable as soon as the server answers again
(after a hang, or a node rejoining a pool). So a failed invalidation is recorded here
instead of being dropped. Until it is replayed, the cache that recorded it treats those
keys, and entries carrying those tags, as misses that are not filled.

Replays happen on two schedules, each at most once per ``retry`` seconds:

- before reads and writes of the cache, through its circuit breaker (so a caller never
  pays a timeout while the breaker is open);
- on a background runner (a thread for ``Cache``, a task for ``AsyncCache``), while
  it is not empty, straight to the server: it is the probe, whatever the breaker's
  cool-down, and its success closes the breaker. A process that only writes, or
  that is idle, still replays.

The bound that holds: once the server answers again, another process reading it can
see an old entry for at most ``retry`` (0.2 s) plus one server timeout (on a memcached
pool, up to its ``node_cooldown``), as long as the
process that journaled the invalidation is alive. A process that exits with a
non-empty journal tries one last replay (``Cache``; an ``AsyncCache`` replays in
``aclose()``, since no event loop runs at exit) and, if that fails, logs a WARNING with
the number lost. Past ``limit`` keys the journal refuses more, and the failed
invalidation raises, since it can no longer be kept.

:class:`Journal` is the state machine (what is pending, when the next try is due, who
replays); :func:`settle` and :func:`background` are the flows the facades drive.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from cachekit.core import tags as tag_flows
from cachekit.core.ops import Call, Flow, Sleep
from cachekit.exceptions import BackendError, CacheError
from cachekit.forks import reset_in_child

if TYPE_CHECKING:
    from cachekit.core.state import CacheCore

__all__ = ["Journal", "background", "settle"]

logger = logging.getLogger("cachekit")

_JOURNALS: weakref.WeakSet[Journal] = weakref.WeakSet()
# At exit, how long to wait for a replay already in flight before the last try.
EXIT_WAIT = 2.0


class Journal:
    """Pending invalidations of one cache: backend keys to delete and tags to drop.

    Args:
        limit: the most keys and tags kept.
        retry: the least time between two replays.
        timer: a monotonic clock.

    Attributes:
        wake: set by the facade: starts its background runner, which drives
            :func:`background` (the flow ends once the journal is empty) and calls
            :meth:`stopped` only if it ends otherwise (raised, cancelled).
        alive: set by the facade: whether the runner it started can still run (a task
            whose event loop is gone cannot).
        on_exit: set by the facade: one last replay at interpreter exit, or ``None``.
    """

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
        self.wake: Callable[[], None] | None = None
        self.alive: Callable[[], bool] = lambda: True
        #: Which runner is the current one: :meth:`stopped` from an older one is ignored.
        self.generation = 0
        self.on_exit: Callable[[], object] | None = None
        self._next_try = 0.0
        self._next_direct = 0.0
        self._again_keys: set[str] = set()
        self._again_tags: set[str] = set()
        self._after_fork()
        reset_in_child(self, Journal._after_fork)
        _JOURNALS.add(self)

    def _after_fork(self) -> None:
        # In a forked child another thread may have held these; start them afresh. The
        # parent's runner does not exist in the child either.
        self._lock = threading.Lock()
        self._replaying = threading.Lock()
        self._running = False

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
            start = self.wake is not None and not (self._running and self.alive())
            if start:
                self._running = True
                self.generation += 1
        if start and self.wake is not None:
            try:
                self.wake()
            except BaseException:
                self.stopped()  # the next record tries again
                raise

    def stopped(self, generation: int | None = None) -> None:
        """The background runner of ``generation`` (the current one if ``None``) ended
        without its flow returning (it raised, or was cancelled). A flow that returns
        has already said so, under the lock that :meth:`record` takes; an older runner
        that ends late must not stop the one started since."""
        with self._lock:
            if generation is None or generation == self.generation:
                self._running = False

    def _keep_running(self) -> bool:
        with self._lock:
            if not self:
                self._running = False
            return self._running

    def begin(
        self, *, direct: bool, force: bool, wait: float = 0.0
    ) -> tuple[list[str], list[str]] | None:
        """Start a replay if one is due (or ``force``) and none is in flight: return
        the keys and tags to replay, or ``None``. :meth:`finish` must follow."""
        now = self.timer()
        if now < (self._next_direct if direct else self._next_try) and not force:
            return None
        lock = self._replaying
        if not (lock.acquire(timeout=wait) if wait else lock.acquire(blocking=False)):
            return None
        if direct:
            self._next_direct = now + self.retry
        else:
            self._next_try = now + self.retry
        with self._lock:
            keys, tags = sorted(self.keys), sorted(self.tags)
            self._again_keys.clear()
            self._again_tags.clear()
        return keys, tags

    def finish(self, keys: list[str], tags: list[str], *, keys_done: bool, tags_done: bool) -> bool:
        """End the replay :meth:`begin` started; return whether the journal is empty."""
        try:
            with self._lock:
                if keys_done:
                    self.keys -= set(keys) - self._again_keys
                if tags_done:
                    self.tags -= set(tags) - self._again_tags
                return not self
        finally:
            self._replaying.release()

    def at_exit(self) -> None:
        """One last replay, then a WARNING with what is lost if the journal is not empty."""
        if not self:
            return
        if self.on_exit is not None:
            # At exit, a backend that is already torn down only means "lost", logged below.
            with contextlib.suppress(Exception):
                self.on_exit()
        if self:
            logger.warning(
                "cachekit: exiting with %d invalidations not replayed (%d keys, %d tags); "
                "other processes may read the old entries until they expire",
                len(self),
                len(self.keys),
                len(self.tags),
            )


def settle(
    core: CacheCore, *, direct: bool = False, force: bool = False, wait: float = 0.0
) -> Flow[bool]:
    """Replay pending invalidations if it is time to retry (or ``force``); return
    whether the journal is now empty. Never raises a backend error: a failed replay
    waits for the next try.

    Args:
        direct: go straight to the server, past the breaker (the background runner's
            schedule, kept apart from the callers' so that callers whose replays the
            open breaker refuses never push it back); its success closes the breaker.
        force: replay even if the last try was less than ``retry`` ago.
        wait: how long to wait for a replay already in flight, in seconds (blocking:
            only at exit).
    """
    journal = core.journal
    if not journal:
        return True
    batch = journal.begin(direct=direct, force=force, wait=wait)
    if batch is None:
        return False
    keys, tags = batch
    keys_done = tags_done = False
    try:
        # Keys and tags apart: a key on a dead server must not hold up every tag.
        keys_done = not keys or (yield from _replayed(core, keys, [], direct))
        tags_done = not tags or (yield from _replayed(core, [], tags, direct))
    finally:
        empty = journal.finish(keys, tags, keys_done=keys_done, tags_done=tags_done)
    return empty


def _replayed(core: CacheCore, keys: list[str], tags: list[str], direct: bool) -> Flow[bool]:
    try:
        if keys:
            yield Call("delete_many", (keys,), direct)
        if tags:
            yield from tag_flows.invalidate(core, tags, direct=direct)
    except CacheError:
        return False
    if direct and core.breaker is not None:
        core.breaker.succeeded()  # the server answered: this was the breaker's probe
    return True


def background(core: CacheCore) -> Flow[None]:
    """The background runner: a direct replay whenever one is due, until the journal
    is empty."""
    journal = core.journal
    while journal._keep_running():
        wait = journal._next_direct - journal.timer()
        if wait > 0:
            yield Sleep(min(wait, journal.retry))
        elif not (yield from settle(core, direct=True)) and journal._next_direct <= journal.timer():
            yield Sleep(journal.retry)  # a caller's replay was in flight: don't spin


def _settle_all_at_exit() -> None:
    for journal in list(_JOURNALS):
        journal.at_exit()


atexit.register(_settle_all_at_exit)
